"""(a) ICL scoring throughput and peak memory: the harness's cached path vs its naive path vs an lm-eval-style loop.

For each random-initialised model (``--model random:NAME`` of the harness) and each k, every validation example of
one task/template is scored by

- ``cached``: the harness's ICL run (:func:`harness.icl_runner.run_icl`, the product's code path and timing:
  data, demonstrations, tokenization and scoring), KV-cached prefix, defaults for the device;
- ``naive``: the same run with ``kv_cache=False`` (``--no-kv-cache``): every (query, choice) as a full sequence;
- ``lmeval``: :mod:`benchmarks.lmeval_loop`, each (context, continuation) pair its own sequence, batched;
- ablations of the cached path (``--ablations``, causal models): ``cached_copy`` (a copy of the prefix cache per row instead of
  the shared-prefix attention, token-budget batches) and ``cached_b8`` (copies and fixed batches of
  ``--batch-size`` queries: the scorer before the GPU fast paths).

Reported per (model, k, path): examples/s (median of ``--repeats`` runs), peak CUDA memory (weights included),
achieved TFLOP/s from the harness's FLOPs formulas, and agreement of predictions and summed log-probs with the
naive path. ``--identity N`` also scores N examples at the largest k in float32 with every path and checks
that the predictions are identical (log-probs within 1e-3). Writes JSON to ``--out`` and prints a table.

    python -m benchmarks.icl_throughput --device cuda --data-dir .benchdata/data --out $OUT/icl.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks import lmeval_loop
from benchmarks.common import model_id
from benchmarks.common import Timer, environment, peak_bytes, peak_reset, print_table, profile, write_json
from harness import api, costs
from harness.data import few_shot_examples, load_split, resolve_data_dir
from harness.icl_runner import fit_demonstrations, run_icl
from harness.models import load_model
from harness.scoring import argmax_first, score_prompts
from harness.tasks import load_task

GIB = 2**30


def prompts_and_prefix(lm, task, template, seed: int, k: int, limit: int | None, data_dir):
    """What the ICL runner scores for (task, template, seed, k): prompts, demonstration prefix, k used."""
    data_dir = resolve_data_dir(data_dir)  # default: the embedded data ('hub': None)
    examples = load_split(task, task.eval_split, data_dir)
    examples = examples[:limit] if limit else examples
    prompts = [task.render(template, ex) for ex in examples]
    demos = few_shot_examples(task, seed, data_dir, n=k) if k else []
    prefix, k_used = fit_demonstrations(lm, task, template, demos, prompts)
    return prompts, prefix, k_used


def lmeval_flops(dims, rows) -> float:
    """Forward FLOPs of the lm-eval loop: every pair's full sequence minus its last token, logits everywhere;
    encoder-decoder: the prompt encoded once per choice, the choice decoded (the naive path's work)."""
    if dims.enc_params:
        from harness.scoring import uncached_work

        return costs.forward_flops(dims, uncached_work(rows, dims))
    work = costs.Work()
    for r in rows:
        for c in r.continuations:
            n = len(r.context) + len(c) - 1
            work.add_tokens(n, 0, dims.windows)
            work.logit_positions += n
    return costs.forward_flops(dims, work)


def run_path(lm, path: str, spec, prompts, prefix, data_dir, batch_size: int) -> dict:
    """One timed evaluation; returns seconds, peak bytes, per-example log-probs and FLOPs."""
    dev = lm.device
    if path in ("cached", "naive"):
        res = run_icl(lm, spec, resolve_data_dir(data_dir), batch_size=batch_size)
        if res.status != "finished":
            raise RuntimeError(f"{path}: {res.error}\n{res.extra.get('traceback', '')}")
        m = res.metrics
        return {"seconds": m["eval_seconds"], "peak": m["peak_memory_bytes"] if dev.type == "cuda" else None,
                "logprobs": [e.logprobs for e in res.examples], "prefix_tokens": m["prefix_tokens"],
                "flops": m["infer_flops_per_example"] * m["n_eval"]}
    peak_reset(dev)
    with Timer(dev) as t:
        if path == "lmeval":
            logprobs = lmeval_loop.loglikelihoods(lm.model, lm.tokenizer, prompts, prefix, batch_size=batch_size)
            out = None
        else:
            kw = {"cached_copy": dict(shared_prefix=False), "cached_b8": dict(shared_prefix=False, budget=None),
                  "cached_shared_b8": dict(shared_prefix=True, budget=None)}[path]
            out = score_prompts(lm.model, lm.tokenizer, prompts, prefix, batch_size=batch_size, **kw)
            logprobs = [e.logprobs for e in out.examples]
    dims = costs.ModelDims.from_model(lm.model)
    if out is None:
        from harness.scoring import tokenize_prompts

        flops = lmeval_flops(dims, tokenize_prompts(lm.tokenizer, prompts, prefix))
    else:
        flops = costs.forward_flops(dims, out.work)
    return {"seconds": t.seconds, "peak": peak_bytes(dev), "logprobs": logprobs,
            "prefix_tokens": out.prefix_tokens if out else 0, "flops": flops}


def compare(a: list[list[float]], b: list[list[float]]) -> tuple[float, float]:
    """(fraction of identical predictions, max |difference| of summed log-probs)."""
    same = sum(argmax_first(x) == argmax_first(y) for x, y in zip(a, b)) / max(len(a), 1)
    diff = max((abs(u - v) for x, y in zip(a, b) for u, v in zip(x, y)), default=0.0)
    return same, diff


def bench_model(name: str, args, env: dict) -> list[dict]:
    t0 = time.perf_counter()
    lm = load_model(model_id(name), args.device, args.dtype)
    load_s = time.perf_counter() - t0
    task = load_task(args.task)
    template = task.template(args.template)
    seq2seq = bool(getattr(lm.model.config, "is_encoder_decoder", False))  # cached = encoder once per query
    paths = ["cached", "naive", "lmeval"] + (["cached_copy", "cached_b8"] if args.ablations and not seq2seq else [])
    rows = []
    # warm-up: CUDA context, cuBLAS handles, kernels of every path (small)
    wp, wprefix, _ = prompts_and_prefix(lm, task, template, args.seed, 2, 4, args.data_dir)
    for path in paths:
        spec = _spec(name, args, 2, path != "naive", limit=4)
        run_path(lm, path, spec, wp, wprefix, args.data_dir, args.batch_size)
    for k in args.ks:
        prompts, prefix, k_used = prompts_and_prefix(lm, task, template, args.seed, k, args.limit, args.data_dir)
        results = {}
        for path in paths:
            spec = _spec(name, args, k, path != "naive")
            reps = args.repeats if path.startswith("cached") else 1
            runs = [run_path(lm, path, spec, prompts, prefix, args.data_dir, args.batch_size) for _ in range(reps)]
            res = runs[-1] | {"seconds": statistics.median(r["seconds"] for r in runs),
                              "all_seconds": [r["seconds"] for r in runs]}
            results[path] = res
        for path, res in results.items():
            agree, diff = compare(res["logprobs"], results["naive"]["logprobs"])
            rows.append({
                "model": name, "k": k, "k_used": k_used, "path": path, "n": len(prompts),
                "prefix_tokens": res["prefix_tokens"], "seconds": res["seconds"], "all_seconds": res["all_seconds"],
                "examples_per_s": len(prompts) / res["seconds"],
                "peak_gib": res["peak"] / GIB if res["peak"] is not None else None,
                "tflops": res["flops"] / res["seconds"] / 1e12,
                "agree_vs_naive": agree, "max_abs_dlogprob_vs_naive": diff, "load_seconds": load_s,
                "params": costs.ModelDims.from_model(lm.model).total_params,
            })
        base = {r["path"]: r for r in rows if r["model"] == name and r["k"] == k}
        for r in base.values():
            r["speedup_vs_naive"] = base["naive"]["seconds"] / r["seconds"]
            r["speedup_vs_lmeval"] = base["lmeval"]["seconds"] / r["seconds"]
            if r["peak_gib"] is not None:
                r["memory_vs_naive"] = r["peak_gib"] / base["naive"]["peak_gib"]
        print(f"# {name} k={k}: " + ", ".join(f"{p} {r['examples_per_s']:.1f}/s" for p, r in base.items()),
              flush=True)
    if args.profile and name == args.models.split(",")[-1] and lm.device.type == "cuda":
        prompts, prefix, _ = prompts_and_prefix(lm, task, template, args.seed, max(args.ks), args.limit,
                                                args.data_dir)
        for r in rows:
            if r["model"] == name and r["k"] == max(args.ks) and r["path"] == "cached":
                r["profile"] = profile_cached(lm, prompts, prefix, args.batch_size)
    del lm
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def profile_cached(lm, prompts, prefix, batch_size: int) -> dict:
    """Where the cached path's time goes: wall vs GPU kernel time, top kernels, and tokenization alone."""
    from harness.scoring import tokenize_prompts

    with Timer(lm.device) as t:
        tokenize_prompts(lm.tokenizer, prompts, prefix)
    out = profile(lambda: score_prompts(lm.model, lm.tokenizer, prompts, prefix, batch_size=batch_size),
                  lm.device, reps=2)
    return out | {"tokenize_ms": t.seconds * 1e3}


def _spec(name: str, args, k: int, kv_cache: bool, limit: int | None = None):
    return api.plan([args.task], ["icl"], templates=[args.template], seeds=[args.seed], k=k, model=model_id(name),
                    limit=limit or args.limit, data_dir=args.data_dir, device=args.device, dtype=args.dtype,
                    kv_cache=kv_cache)[0]


def identity_check(name: str, args) -> dict:
    """Float32: every path on ``args.identity`` examples at the largest k; predictions must be identical."""
    lm = load_model(model_id(name), args.device, "float32")
    task = load_task(args.task)
    template = task.template(args.template)
    k = max(args.ks)
    prompts, prefix, k_used = prompts_and_prefix(lm, task, template, args.seed, k, args.identity, args.data_dir)
    ref = score_prompts(lm.model, lm.tokenizer, prompts, prefix, use_cache=False, batch_size=args.batch_size)
    ref_lp = [e.logprobs for e in ref.examples]
    out = {"model": name, "k": k, "k_used": k_used, "n": len(prompts), "dtype": "float32"}
    variants = {
        "cached_shared": lambda: score_prompts(lm.model, lm.tokenizer, prompts, prefix, batch_size=args.batch_size,
                                               shared_prefix=True),
        "cached_copy": lambda: score_prompts(lm.model, lm.tokenizer, prompts, prefix, batch_size=args.batch_size,
                                             shared_prefix=False),
    }
    for key, fn in variants.items():
        agree, diff = compare([e.logprobs for e in fn().examples], ref_lp)
        out[key] = {"agree": agree, "max_abs_dlogprob": diff}
    lp = lmeval_loop.loglikelihoods(lm.model, lm.tokenizer, prompts, prefix, batch_size=args.batch_size)
    agree, diff = compare(lp, ref_lp)
    out["lmeval"] = {"agree": agree, "max_abs_dlogprob": diff}
    out["identical"] = all(out[k_]["agree"] == 1.0 and out[k_]["max_abs_dlogprob"] < 1e-3
                           for k_ in ("cached_shared", "cached_copy", "lmeval"))
    print(f"# identity {name} fp32 k={k} n={len(prompts)}: " + ", ".join(
        f"{k_} agree {out[k_]['agree']:.3f} max|d| {out[k_]['max_abs_dlogprob']:.2e}"
        for k_ in ("cached_shared", "cached_copy", "lmeval")), flush=True)
    del lm
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m,qwen2.5-0.5b,llama-1b")
    p.add_argument("--ks", default="0,8,32")
    p.add_argument("--task", default="rte")
    p.add_argument("--template", default="gpt3_style")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="validation examples (default: all)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="runs of each cached path (median reported)")
    p.add_argument("--ablations", action="store_true")
    p.add_argument("--profile", action="store_true", help="profile the cached path of the last model at max k")
    p.add_argument("--identity", type=int, default=0, help="float32 identity check on N examples (0: skip)")
    p.add_argument("--identity-only", action="store_true", help="only the float32 identity check")
    p.add_argument("--out", default="benchmarks/results/icl.json")
    args = p.parse_args(argv)
    args.ks = [int(x) for x in args.ks.split(",")]
    env = environment(torch.device(args.device))
    rows, identity = [], []
    for name in args.models.split(",") if not args.identity_only else []:
        rows += bench_model(name, args, env)
        write_json(args.out, {"env": env, "args": vars(args), "results": rows, "identity": identity})
    if args.identity:
        for name in args.models.split(","):
            identity.append(identity_check(name, args))
            write_json(args.out, {"env": env, "args": vars(args), "results": rows, "identity": identity})
    print_table(rows, ["model", "k", "path", "n", "prefix_tokens", "seconds", "examples_per_s", "peak_gib",
                       "tflops", "speedup_vs_naive", "speedup_vs_lmeval", "memory_vs_naive", "agree_vs_naive",
                       "max_abs_dlogprob_vs_naive"])


if __name__ == "__main__":
    main()
