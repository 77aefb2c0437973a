"""Cached scoring of a sliding-window model (Gemma 3): queries batched inside the first window
(:func:`harness.batching.plan_window_batches`, the default) against one query per micro-batch (what the harness did
before, and still does past the window), in one process, one after the other, per template:

    python -m benchmarks.window_batches --model gemma3-270m --task wic --limit 64 \
        --out benchmarks/results/window_batches_cpu.json

Records per template and path the scoring seconds (best of ``--reps``), the max |d log-prob| between the paths
and whether every prediction agrees. ``--k`` > 0 puts that many demonstrations before each query (past Gemma 3's
512-slot window both paths are one query at a time).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import environment, print_table, sync, write_json
from harness import scoring
from harness.data import few_shot_examples, load_split, resolve_data_dir
from harness.models import load_model
from harness.tasks import load_task


def _one_query_per_batch(query_lens, choice_lens, n_prefix, window, batch_size, budget):
    return [[i] for i in range(len(query_lens))]


def time_path(model, tokenizer, prompts, prefix, batch_size, reps, device, single: bool):
    planner = scoring.plan_window_batches
    if single:
        scoring.plan_window_batches = _one_query_per_batch
    try:
        best, out = float("inf"), None
        for _ in range(reps):
            sync(device)
            start = time.perf_counter()
            out = scoring.score_prompts(model, tokenizer, prompts, prefix, batch_size=batch_size)
            sync(device)
            best = min(best, time.perf_counter() - start)
    finally:
        scoring.plan_window_batches = planner
    return best, out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--task", default="wic")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--k", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    window = min((w for w in scoring.ModelDims.from_model(model).windows if w), default=None)
    task = load_task(args.task)
    data_dir = resolve_data_dir(None)
    examples = load_split(task, task.eval_split, data_dir)[:args.limit]
    rows = []
    for template in task.templates:
        prompts = [task.render(template, ex) for ex in examples]
        prefix = task.demonstrations(template, few_shot_examples(task, 0, data_dir, args.k)) if args.k else ""
        batched_s, batched = time_path(model, tokenizer, prompts, prefix, args.batch_size, args.reps, device, False)
        single_s, single = time_path(model, tokenizer, prompts, prefix, args.batch_size, args.reps, device, True)
        diff = max(abs(x - y) for a, b in zip(batched.examples, single.examples) for x, y in zip(a.logprobs, b.logprobs))
        agree = sum(a.prediction == b.prediction for a, b in zip(batched.examples, single.examples))
        rows.append({"template": template.name, "examples": len(prompts), "window_batched_s": round(batched_s, 3),
                     "one_query_s": round(single_s, 3), "speedup": round(single_s / batched_s, 2),
                     "max_abs_d_logprob": diff, "same_predictions": f"{agree}/{len(prompts)}"})
    print_table(rows, list(rows[0]))
    payload = {"benchmark": "window_batches", "model": args.model, "task": args.task, "k": args.k,
               "limit": args.limit, "batch_size": args.batch_size, "sliding_window": window,
               "dtype": str(next(model.parameters()).dtype), "environment": environment(device), "rows": rows}
    if args.out:
        write_json(args.out, payload)


if __name__ == "__main__":
    main()
