"""Execution of a checked mixed run (:func:`harness.mixed.plan.plan_mixed`): per method, the base model loaded
(once per model, device and dtype: every mode leaves it as it found it), each task's queries rebuilt from its
run's stored config, every serving mode of :mod:`harness.mixed.modes` timed, and one ``mixed_runs`` row per
(method, mode) written (:mod:`harness.mixed.records`).
"""

from __future__ import annotations

import hashlib
import json
import statistics

from tqdm.auto import tqdm

from harness.errors import HarnessError
from harness.mixed.modes import (MERGEABLE, TaskInput, max_abs_diff, serve_merged, serve_mixed,
                                 serve_task_by_task)
from harness.mixed.plan import MethodPlan
from harness.mixed.records import write_mixed
from harness.store import Store

EQUALITY_TOLERANCE = 1e-4  # float32: largest |mixed - single-task| log-prob expected
CHECKED_MODES = ("mixed", "task_by_task")  # held to the tolerance (merging rounds the weights differently)


def mixed_id(plans: list[MethodPlan], limit: int | None, batch_size: int, device: str) -> str:
    """16 hex digits naming one mixed run: its runs, limit, batch size and device."""
    blob = json.dumps({"runs": {p.method: [r["run_id"] for r in p.runs] for p in plans}, "limit": limit,
                       "batch_size": batch_size, "device": device}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def quantile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (linear interpolation between closest ranks); None of no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mode_row(result, plan: MethodPlan, n_examples: int, max_diff: float, common: dict) -> dict:
    """The ``mixed_runs`` row of one mode's result (:class:`harness.mixed.modes.ModeResult`)."""
    seconds = sum(result.latencies)
    return {**common, "method": plan.method, "mode": result.mode, "n_examples": n_examples,
            "examples_per_second": n_examples / seconds if seconds > 0 else None,
            "latency_mean_s": statistics.fmean(result.latencies) if result.latencies else None,
            "latency_median_s": quantile(result.latencies, 0.5), "latency_p90_s": quantile(result.latencies, 0.9),
            "seconds": seconds, "setup_seconds": result.setup_seconds, "peak_memory_bytes": result.peak_memory_bytes,
            "state_bytes": result.state_bytes, "flops_per_example": result.flops / max(n_examples, 1),
            "tasks_per_batch": statistics.fmean(result.tasks_per_batch) if result.tasks_per_batch else None,
            "max_abs_diff": max_diff, "run_ids": {r["task"]: r["run_id"] for r in plan.runs}}


def failed_checks(rows: list[dict]) -> list[str]:
    """One line per float32 row of :data:`CHECKED_MODES` whose ``max_abs_diff`` exceeds the tolerance."""
    return [f"{r['method']} {r['mode']}: max |log-prob - single-task| = {r['max_abs_diff']:.3g} > "
            f"{EQUALITY_TOLERANCE:g}" for r in rows
            if r["dtype"] == "float32" and r["mode"] in CHECKED_MODES and not r["max_abs_diff"] <= EQUALITY_TOLERANCE]


def task_inputs(lm, plan: MethodPlan, limit: int | None, data_dir) -> list[TaskInput]:
    """Per task of ``plan``: its queries (the first ``limit`` of those its run evaluated), its demonstrations
    (ICL: drawn again from the run's config) and its adapter folder (PEFT)."""
    from harness.data import load_split
    from harness.icl_runner import run_prefix
    from harness.peft_runner import spec_from_config

    inputs = []
    for run in plan.runs:
        spec = spec_from_config(run["config"])
        task = spec.load_task()
        template = task.template(spec.template)
        rows = load_split(task, task.eval_split, data_dir)
        prompts = [task.render(template, ex) for ex in rows[:spec.limit]]
        prefix = run_prefix(lm, spec, task, template, prompts, data_dir)[0] if plan.kind == "ICL" else ""
        inputs.append(TaskInput(spec.task, prompts[:limit], prefix,
                                None if plan.kind == "ICL" else run["artifact_path"]))
    return inputs


def stored_scores(db: Store, plan: MethodPlan) -> list[dict[str, list[float]]]:
    """Per task of ``plan``: example id -> the log-probs its run stored."""
    out = []
    for run in plan.runs:
        out.append({e["example_id"]: [c["logprob"] for c in e["choices"]] for e in db.examples([run["run_id"]])})
    return out


def _warm_up(lm, inputs: list[TaskInput], dims) -> None:
    """One untimed batch, so that the first mode does not pay for first-call costs (allocations, kernels)."""
    from harness.mixed.scorer import TaskQueries, score_mixed
    from harness.mixed.serving import Serving

    score_mixed(Serving(lm.model, 1), lm.tokenizer, [TaskQueries("warm-up", inputs[0].prompts[:1])], 1, dims)


def execute_plans(db: Store, plans: list[MethodPlan], *, limit: int | None = None, batch_size: int = 8,
                  device: str | None = None, data_dir=None, progress: bool = False) -> list[dict]:
    """Serve every plan in every mode, write the rows to ``db`` and return them."""
    from harness.costs import ModelDims
    from harness.data import resolve_data_dir
    from harness.environment import describe
    from harness.methods import method_overhead
    from harness.models import load_model

    folder = resolve_data_dir(data_dir)
    first = plans[0].runs[0]["config"]
    lm = load_model(first.get("model_path") or first["model"], device or first.get("device", "auto"),
                    first.get("dtype", "auto"))
    dims = ModelDims.from_model(lm.model)
    mid = mixed_id(plans, limit, batch_size, str(lm.device))
    steps = sum(3 if p.kind in MERGEABLE else 2 for p in plans)
    bar = tqdm(total=steps, disable=not progress, desc="harness mixed", leave=False)
    rows, env = [], describe(lm.device)
    for plan in plans:
        inputs = task_inputs(lm, plan, limit, folder)
        expected = stored_scores(db, plan)
        if any(not t.prompts for t in inputs):
            raise HarnessError(f"{plan.method}: a task has no queries to serve")
        _warm_up(lm, inputs, dims)
        settings = dict(plan.runs[0]["config"].get("train") or {})
        per_token = 0 if plan.kind == "ICL" else method_overhead(lm.model, plan.method, settings).per_token
        common = {"mixed_id": mid, "tasks": ",".join(t.name for t in inputs), "n_tasks": len(inputs),
                  "model": plan.runs[0].get("model"), "device": str(lm.device),
                  "dtype": str(lm.dtype).removeprefix("torch."), "batch_size": batch_size, "env": env,
                  "config": {"limit": limit, "batch_size": batch_size, "data_dir": str(folder),
                             "seeds": [r.get("seed") for r in plan.runs],
                             "templates": [r.get("template") for r in plan.runs], "kind": plan.kind}}
        n = sum(len(t.prompts) for t in inputs)
        modes = [lambda: serve_mixed(lm.model, lm.tokenizer, plan.kind, inputs, batch_size, dims, per_token),
                 lambda: serve_task_by_task(lm.model, lm.tokenizer, plan.kind, inputs, batch_size, dims, per_token)]
        if plan.kind in MERGEABLE:
            modes.append(lambda: serve_merged(lm.model, lm.tokenizer, plan.kind, inputs, batch_size, dims))
        for serve in modes:
            result = serve()
            rows.append(mode_row(result, plan, n, max_abs_diff(result.examples, expected), common))
            bar.set_postfix_str(f"{plan.method} {result.mode}")
            bar.update()
    bar.close()
    write_mixed(db, rows)
    return rows
