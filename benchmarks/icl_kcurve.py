"""k-curve from one cache (issue 15): one ``--k 0,1,2,...,32`` command against one command per k.

For each task: the harness's own path (:func:`harness.api.plan` and :func:`harness.api.run`, the model loaded once
and handed to both) runs

- ``curve``: every k in one call; the runs of one (template, seed) share the largest k's prefix KV cache
  (:func:`harness.icl_runner.run_icl_curve`);
- ``separate``: one call per k, each into its own fresh store (no sharing),

and reports the wall time of each, the accuracy per k, and the largest absolute difference of a per-example
summed log-prob between the two (the runs are the same run ids). ``--calibrate`` adds a curve run with
``calibrate=True`` (accuracy_calibrated, accuracy_mutual_info), timed apart. Writes JSON to ``--out``.

    python -m benchmarks.icl_kcurve --tasks cb,rte --ks 0,1,2,4,8,16,32 --limit 8 --device cpu \
        --out benchmarks/results/icl_kcurve_cpu.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import environment, print_table, write_json
from harness import api
from harness.models import load_model
from harness.spec import parse_int_list, parse_name_list
from harness.store import Store


def _logprobs(store: Store) -> dict[str, list[list[float]]]:
    out: dict[str, list[list[float]]] = {}
    for row in store.examples():
        out.setdefault(row["run_id"], []).append([c["logprob"] for c in row["choices"]])
    return out


def bench_task(lm, task: str, ks: list[int], args, folder: Path) -> dict:
    common = dict(templates=[args.template] if args.template else "all", seeds=[args.seed], limit=args.limit,
                  data_dir=args.data_dir, device=args.device, dtype=args.dtype, model=args.model)
    loader = lambda spec: lm  # noqa: E731 - one loaded model for every call

    specs = api.plan([task], ["icl"], k=ks, **common)
    # warm-up (threads, kernels, tokenizer caches), not timed: the smallest k once, into a store of its own
    api.run(api.plan([task], ["icl"], k=min(ks), **common), store=Store(folder / f"{task}-warmup.sqlite"),
            data_dir=args.data_dir, progress=False, loader=loader, batch_size=args.batch_size)
    separate_s, per_k_s = 0.0, {}
    separate_lps: dict[str, list[list[float]]] = {}
    separate_flops = 0.0
    for k in ks:  # separate runs first, then the curve (a later call has no advantage from an earlier one's data)
        store = Store(folder / f"{task}-k{k}.sqlite")
        start = time.perf_counter()
        done = api.run(api.plan([task], ["icl"], k=k, **common), store=store, data_dir=args.data_dir,
                       progress=False, loader=loader, batch_size=args.batch_size)
        per_k_s[k] = time.perf_counter() - start
        separate_s += per_k_s[k]
        separate_lps |= _logprobs(store)
        separate_flops += sum(r.metrics["infer_flops_per_example"] * r.metrics["n_eval"] for r in done)
    curve_store = Store(folder / f"{task}-curve.sqlite")
    start = time.perf_counter()
    curve = api.run(specs, store=curve_store, data_dir=args.data_dir, progress=False, loader=loader,
                    batch_size=args.batch_size)
    curve_s = time.perf_counter() - start
    curve_flops = sum(r.metrics.get("infer_flops_per_example_shared", r.metrics["infer_flops_per_example"])
                      * r.metrics["n_eval"] for r in curve)
    curve_lps = _logprobs(curve_store)
    diff = max(abs(a - b) for rid, rows in curve_lps.items() for ra, rb in zip(rows, separate_lps[rid])
               for a, b in zip(ra, rb))
    runs = sorted(curve_store.runs(), key=lambda r: (r["template"], r["k"]))
    out = {
        "task": task, "template": args.template or "all", "seed": args.seed, "limit": args.limit, "ks": ks,
        "curve_seconds": curve_s, "separate_seconds": separate_s, "separate_seconds_per_k": per_k_s,
        "speedup": separate_s / curve_s, "max_abs_logprob_diff": diff,
        "curve_flops": curve_flops, "separate_flops": separate_flops, "flops_ratio": separate_flops / curve_flops,
        "failed": [r.run_id for r in curve if r.status != "finished"],
        "runs": [{"k": r["k"], "template": r["template"], "k_used": r.get("k_used"), "accuracy": r["accuracy"],
                  "infer_flops_per_example": r["infer_flops_per_example"],
                  "infer_flops_per_example_shared": r.get("infer_flops_per_example_shared"),
                  "prefix_reused_tokens": r.get("prefix_reused_tokens"), "eval_seconds": r["eval_seconds"]}
                 for r in runs],
    }
    if args.calibrate:
        cal_store = Store(folder / f"{task}-calibrated.sqlite")
        start = time.perf_counter()
        api.run(api.plan([task], ["icl"], k=ks, calibrate=True, **common), store=cal_store,
                data_dir=args.data_dir, progress=False, loader=loader, batch_size=args.batch_size)
        out["calibrated_curve_seconds"] = time.perf_counter() - start
        out["calibrated"] = [{"k": r["k"], "template": r["template"], "accuracy": r["accuracy"],
                              "accuracy_calibrated": r.get("accuracy_calibrated"),
                              "accuracy_mutual_info": r.get("accuracy_mutual_info"),
                              "calibration_flops_per_example": r.get("calibration_flops_per_example")}
                             for r in sorted(cal_store.runs(), key=lambda r: (r["template"], r["k"]))]
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="cb,rte")
    parser.add_argument("--ks", default="0,1,2,4,8,16,32")
    parser.add_argument("--template", default="gpt3_style", help="one template ('' for all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--calibrate", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    ks = parse_int_list(args.ks, "--ks")
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    payload = {"environment": environment(lm.device), "command": " ".join(["python -m benchmarks.icl_kcurve",
                                                                            *(argv or [])]), "tasks": []}
    with tempfile.TemporaryDirectory() as tmp:
        for task in parse_name_list(args.tasks):
            payload["tasks"].append(bench_task(lm, task, ks, args, Path(tmp)))
            if args.out:
                write_json(args.out, payload)
    rows = [{"task": t["task"], "curve s": t["curve_seconds"], "separate s": t["separate_seconds"],
             "speedup": t["speedup"], "FLOPs separate/curve": t["flops_ratio"],
             "max |d logprob|": t["max_abs_logprob_diff"]} for t in payload["tasks"]]
    print_table(rows, list(rows[0]))  # prints
    for t in payload["tasks"]:
        print_table([{"task": t["task"], **r} for r in t["runs"]], ["task", "k", "k_used", "accuracy"])
        if "calibrated" in t:
            print_table([{"task": t["task"], **r} for r in t["calibrated"]],
                        ["task", "k", "accuracy", "accuracy_calibrated", "accuracy_mutual_info"])
    return payload


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
