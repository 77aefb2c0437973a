"""Why random-weight bfloat16 training diverges on CUDA: train a few groups and report the step of any NaN.

Each (method, seed, padding, compile) cell trains ``random:smollm2-135m`` on rte's few-shot set of the seed with the
paper preset's settings for ``--steps`` steps and records whether, and at which step, it raised
``TrainingDiverged`` (left padding makes fully masked query rows in SDPA; right padding has none).

    python -m benchmarks.nan_probe --data-dir .benchdata/data --out $OUT/nan_probe.json
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import environment, print_table, write_json
from harness.data import few_shot_examples
from harness.methods import apply_method, training_settings
from harness.models import load_model
from harness.tasks import load_task
from harness.training import TrainingDiverged, train


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default="lora:0,ia3:32,lora:32,ia3:0", help="method:seed,...")
    p.add_argument("--paddings", default="left,right")
    p.add_argument("--compile", default="off")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="benchmarks/results/nan_probe.json")
    args = p.parse_args(argv)
    task = load_task("rte")
    rows = []
    for cell in args.cells.split(","):
        method, seed = cell.split(":")
        for padding in args.paddings.split(","):
            lm = load_model("random:smollm2-135m", "cuda", "auto")
            settings = training_settings(method, "paper", {"steps": args.steps})
            torch.manual_seed(int(seed))
            model = apply_method(lm.model, method, settings)
            examples = few_shot_examples(task, int(seed), args.data_dir)
            t0 = time.perf_counter()
            try:
                stats = train(model, lm.tokenizer, examples, task, settings, int(seed), method=method,
                              compile=args.compile, padding=padding)
                times = sorted(stats.step_seconds[1:]) or [0.0]
                row = {"diverged_at": None, "loss_last": stats.losses[-1], "first_step_s": stats.step_seconds[0],
                       "median_step_ms": 1e3 * times[len(times) // 2], "compiled": stats.compiled}
            except TrainingDiverged as exc:
                row = {"diverged_at": exc.step, "error": str(exc)}
            rows.append({"method": method, "seed": int(seed), "padding": padding, "compile": args.compile,
                         "seconds": time.perf_counter() - t0} | row)
            print(f"# {rows[-1]}", flush=True)
            del lm, model
    write_json(args.out, {"env": environment(torch.device("cuda")), "args": vars(args), "results": rows})
    print_table(rows, ["method", "seed", "padding", "compile", "diverged_at", "loss_last", "seconds", "first_step_s",
                       "median_step_ms"])


if __name__ == "__main__":
    main()
