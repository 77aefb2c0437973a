"""Wall time of ``harness run --workers N`` with each worker's torch threads split (the default) against every worker
running one thread per core (``OMP_NUM_THREADS`` = this machine's threads, what the workers did before).

Both are the same command in a fresh store each, one after the other (nothing else should run):

    python -m benchmarks.worker_threads --workers 2 --out benchmarks/results/worker_threads_cpu.json

The run ids, accuracies and losses of the two must agree (float32 on the CPU: up to the order of sums); the JSON
records each command's wall time, the threads each worker recorded, and the per-run train seconds.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import environment, print_table, write_json


def run_once(args, threads_env: str | None, store: Path) -> dict:
    """One ``harness run`` in a subprocess; ``threads_env``: OMP_NUM_THREADS for it (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads_env is not None:
        env["OMP_NUM_THREADS"] = threads_env
    cmd = [sys.executable, "-m", "harness.cli", "run", "--methods", args.methods, "--tasks", args.task,
           "--limit", str(args.limit), "--steps", str(args.steps), "--seeds", args.seeds, "--templates",
           args.templates, "--preset", "quick", "--workers", str(args.workers), "--store", str(store), "--quiet"]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    db = sqlite3.connect(store)
    rows = db.execute("SELECT run_id, accuracy, train_seconds, json_extract(env_json, '$.torch_threads') FROM runs "
                      "ORDER BY run_id").fetchall()
    return {"wall_s": round(wall, 1), "runs": [{"run_id": r[0], "accuracy": r[1], "train_s": round(r[2], 1),
                                                "torch_threads": r[3]} for r in rows]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", default="ia3")
    parser.add_argument("--task", default="cb")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--templates", default="gpt3_style")
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    cores = torch.get_num_threads()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, threads_env in (("split (default)", None), (f"{cores} each (OMP_NUM_THREADS={cores})", str(cores))):
            results[name] = run_once(args, threads_env, Path(tmp) / f"{len(results)}.sqlite")
    ids = [[r["run_id"] for r in v["runs"]] for v in results.values()]
    assert ids[0] == ids[1], "the two commands planned different runs"
    rows = [{"threads": name, "wall_s": v["wall_s"], "worker_threads": sorted({r["torch_threads"] for r in v["runs"]}),
             "train_s": [r["train_s"] for r in v["runs"]], "accuracy": [r["accuracy"] for r in v["runs"]]}
            for name, v in results.items()]
    print_table(rows, ["threads", "wall_s", "worker_threads", "train_s", "accuracy"])
    payload = {"benchmark": "worker_threads", "args": vars(args), "host_threads": cores,
               "env": environment(torch.device("cpu")), "rows": rows}
    if args.out:
        write_json(args.out, payload)


if __name__ == "__main__":
    main()
