"""(c) Wall time of the whole paper-preset run ``--methods lora,ia3,icl --tasks rte`` (5 seeds, all templates).

Runs the harness's command line exactly as a user would, in a fresh store, and times it end to end (process
start, model build, training, evaluation, store writes). Then reads the store: runs per method and status, and
the summed per-run seconds. With ``--timeout`` the command is stopped when it runs past it, and the remaining
runs are estimated from the finished ones of the same method (marked as an estimate). With ``--extra "--steps S"``
the run trains S steps instead of the preset's 1000 and the full run's time is extrapolated from the measured
training seconds (training time is linear in steps; everything else is run in full; trainings side by side under
``--workers`` / ``--pack`` count once per unit that ran at the same time: ``steps_extrapolation``).

    python -m benchmarks.paper_run --model random:smollm2-135m --device cuda --data-dir .benchdata/data \\
        --store $OUT/paper.sqlite --out $OUT/paper.json
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict

from benchmarks.common import print_table, write_json
from harness.spec import DEFAULT_SEEDS
from harness.store import Store
from harness.tasks import load_task


def group_summary(runs: list[dict]) -> dict:
    """Per trained group ("method/seed"): what its stored runs say of the training (the same on each of its runs)."""
    out = {}
    for r in runs:
        if r["method"] != "icl" and r["status"] == "finished":
            peak = r.get("train_peak_memory_bytes")
            out[f"{r['method']}/{r['seed']}"] = {
                "steps": r.get("steps"), "train_seconds": r.get("train_seconds"), "loss_first": r.get("loss_first"),
                "loss_last": r.get("loss_last"), "train_peak_memory_gib": peak / 2**30 if peak else None,
                "first_step_seconds": r.get("first_step_seconds"),
                "workers": r.get("env", {}).get("workers")}  # None: not recorded (before --workers was)
    return dict(sorted(out.items()))


def option(extra: list[str], name: str) -> int | None:
    """The integer value of ``name`` in the extra CLI options (None when absent)."""
    return int(extra[extra.index(name) + 1]) if name in extra else None


def steps_extrapolation(train_seconds: dict, steps: int, full_steps: int, workers: int = 1, pack: int = 1,
                        first_step_seconds: dict | None = None) -> float:
    """Seconds to add to a ``--steps S`` run's wall time for the preset's ``full_steps``.

    Training time scales with steps (fixed shapes per step). With ``first_step_seconds`` (per group, stored as
    ``first_step_seconds`` since session 34) the first step's one-time costs (compiling under ``--compile on``,
    allocator warm-up) are kept out of the scaling: the S - 1 later steps' seconds scale to full - 1; without it
    every step scales and the estimate errs high by (full / S - 1) x the first step. ``train_seconds`` maps each
    trained group ``(method, seed)`` to its stored training seconds (a packed group stores its pack's time / N, so a pack's groups
    sum to the pack's time). A unit is one training process's work: a group, or a pack of up to ``pack`` groups of
    one method (``harness.packed_runner.make_packs``); ``workers`` units run at a time, so the added time is
    (full / S - 1) x the summed training seconds / the number of units that ran side by side (each unit's seconds
    were measured while it shared the device with the others).
    """
    per_method = Counter(method for method, _seed in train_seconds)
    units = sum(-(-n // max(pack, 1)) for n in per_method.values())
    side_by_side = max(1, min(workers, units))
    if first_step_seconds is not None and steps > 1:
        later = sum(t - first_step_seconds[key] for key, t in train_seconds.items())
        return (full_steps - steps) / (steps - 1) * later / side_by_side
    return (full_steps / steps - 1) * sum(train_seconds.values()) / side_by_side


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:smollm2-135m")
    p.add_argument("--methods", default="lora,ia3,icl")
    p.add_argument("--tasks", default="rte")
    p.add_argument("--device", default="cuda")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--timeout", type=float, default=None, help="stop after this many seconds and estimate the rest")
    p.add_argument("--extra", default="", help="more CLI options, space-separated (e.g. --steps 100)")
    p.add_argument("--full-steps", type=int, default=1000, help="the preset's steps, for the --steps estimate")
    p.add_argument("--out", default="benchmarks/results/paper.json")
    args = p.parse_args(argv)
    cmd = [sys.executable, "-m", "harness.cli", "run", "--methods", args.methods, "--tasks", args.tasks,
           "--model", args.model, "--device", args.device, "--data-dir", args.data_dir, "--store", args.store,
           "--quiet", *args.extra.split()]
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    timed_out = False
    proc = subprocess.Popen(cmd, env=os.environ.copy(), start_new_session=True)  # its own group: workers too
    try:
        rc = proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the command and its --workers processes
        proc.wait()
        timed_out, rc = True, None
    wall = time.perf_counter() - start
    runs = Store(args.store).runs() if os.path.exists(args.store) else []
    per = defaultdict(lambda: {"finished": 0, "failed": 0, "seconds": 0.0, "train_seconds": 0.0})
    for r in runs:
        m = per[r["method"]]
        m[r["status"]] = m.get(r["status"], 0) + 1
        m["seconds"] += r.get("seconds") or 0.0
        m["train_seconds"] += r.get("train_seconds") or 0.0
    n_templates = sum(len(load_task(t).templates) for t in args.tasks.split(","))
    expected = {m: n_templates * len(DEFAULT_SEEDS) for m in args.methods.split(",")}
    estimate = wall
    if timed_out:  # the rest at the finished runs' mean seconds (training is stored on every run of a group)
        for method, n in expected.items():
            done = per[method]["finished"]
            mean = per[method]["seconds"] / done if done else None
            if mean is not None and method != "icl":
                mean = per[method]["seconds"] / done / n_templates  # a group's 4 runs share one training
            estimate += (n - done) * mean if mean is not None else float("nan")
    trained = {(r["method"], r["seed"]): r.get("train_seconds") or 0.0 for r in runs if r["method"] != "icl"}
    first = {(r["method"], r["seed"]): r.get("first_step_seconds") for r in runs if r["method"] != "icl"}
    first = first if first and None not in first.values() else None  # None: runs before it was stored
    groups = group_summary(runs)
    extra = args.extra.split()
    steps = option(extra, "--steps")
    if steps is not None and not timed_out:
        estimate = wall + steps_extrapolation(trained, steps, args.full_steps, option(extra, "--workers") or 1,
                                              option(extra, "--pack") or 1, first)
    rows = [{"method": m, "expected_runs": expected.get(m), **v} for m, v in sorted(per.items())]
    summary = {"command": " ".join(cmd), "wall_seconds": wall, "returncode": rc, "timed_out": timed_out,
               "estimated_total_seconds": estimate, "train_seconds_per_group": {f"{m}/{s}": v for (m, s), v in
                                                                                trained.items()},
               "groups": groups, "runs": rows}
    write_json(args.out, summary)
    print_table(rows, ["method", "expected_runs", "finished", "failed", "seconds", "train_seconds"])
    print(f"wall {wall:.1f} s ({wall / 60:.2f} min), rc {rc}, timed out {timed_out}, "
          f"estimated total {estimate / 60:.2f} min", flush=True)


if __name__ == "__main__":
    main()
