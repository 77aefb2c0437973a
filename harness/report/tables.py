"""Report tables from run dicts: T-Few Table 1 style summary, per-task accuracy, and per-method costs.

Runs are grouped by (model, method). When one method of one model was run with several ``k`` or presets, each
variant gets its own group, labelled e.g. ``icl k=4`` or ``lora preset=quick``, so different experiments are
never pooled into one median. In-context methods (no training) are recognised by name: ``icl...`` (k-shot) and
``zeroshot``; every other method is taken to be a trained (PEFT) method.

Per-run cost figures (FLOPs, bytes, seconds) are summarized by their median over runs. PEFT runs of one
(task, method, seed) share a single trained adapter across templates, so their ``train_flops`` and
``train_seconds`` repeat the same training on each template's row: they are never summed across templates.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable

from harness.report import stats
from harness.report.format import (Table, fmt_acc, fmt_bytes, fmt_flops, fmt_interval, fmt_params,
                                   fmt_seconds)

METRICS = ("accuracy", "accuracy_norm", "accuracy_norm_char")
# One line per metric, said under every table that shows it (docs/metrics.md has the full definitions).
METRIC_DEFINITIONS = {
    "accuracy": "accuracy: the choice with the highest summed log-prob",
    "accuracy_norm": "accuracy_norm: the choice with the highest log-prob per token (T-Few)",
    "accuracy_norm_char": "accuracy_norm_char: the choice with the highest log-prob per character of the choice "
                          "without the target delimiter (lm-evaluation-harness acc_norm)",
}
_RUN_ORDER = ("model", "task", "method", "k", "preset", "template", "seed", "run_id")


ZERO_SHOT_NAMES = ("zeroshot", "zero-shot", "zero_shot")


def is_icl(method: str | None) -> bool:
    """k-shot in-context learning methods are named ``icl`` or ``icl...`` (case-insensitive)."""
    return str(method or "").lower().startswith("icl")


def is_in_context(method: str | None) -> bool:
    """In-context methods train nothing: k-shot ICL and zero-shot."""
    return is_icl(method) or str(method or "").lower() in ZERO_SHOT_NAMES


def _sort_value(v) -> tuple:
    """A key that orders None last, numbers numerically, and anything else by its string."""
    if v is None:
        return (2, 0)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, v)
    return (1, str(v))


def run_sort_key(run: dict) -> tuple:
    return tuple(_sort_value(run.get(k)) for k in _RUN_ORDER)


# Config fields that fingerprint a run's inputs (harness/identity.py) or say where they were found. Two finished runs
# whose configs differ only in these are the same experiment made twice with changed inputs (a task file, the data,
# the weights, the scoring code): only the later one is current.
INPUT_FIELDS = ("task_hash", "data_hash", "train_data_hash", "model_fingerprint", "scoring_version",
                "template_fingerprint", "task_source", "model_path", "data_source")


def experiment_key(run: dict) -> str:
    """The run's config without :data:`INPUT_FIELDS`: equal for re-runs of one experiment with changed inputs."""
    import json

    config = {k: v for k, v in (run.get("config") or {}).items() if k not in INPUT_FIELDS}
    return json.dumps(config, sort_keys=True, default=str)


def latest_runs(runs: Iterable[dict]) -> tuple[list[dict], int]:
    """Per experiment (:func:`experiment_key`) the most recently finished run; and how many older ones were
    dropped. Reports never pool a stale result with the one that replaced it."""
    best: dict[str, dict] = {}
    runs = list(runs)
    for r in runs:
        key = experiment_key(r)
        if key not in best or (r.get("finished_at") or 0) > (best[key].get("finished_at") or 0):
            best[key] = r
    return list(best.values()), len(runs) - len(best)


def select_runs(runs: Iterable[dict], include_random: bool = False, tasks: Iterable[str] | None = None) -> list[dict]:
    """Finished runs (random-init models dropped unless ``include_random``; only ``tasks`` when given), the latest
    of each experiment only (:func:`latest_runs`), in a deterministic order."""
    wanted = set(tasks) if tasks is not None else None
    out = [r for r in runs if r.get("status") == "finished" and (include_random or not r.get("is_random"))
           and (wanted is None or r.get("task") in wanted)]
    return sorted(latest_runs(out)[0], key=run_sort_key)


@dataclasses.dataclass(frozen=True, order=True)
class Group:
    """One (model, method variant) group; ``label`` names it in tables and legends."""

    model: str
    icl_rank: int  # 0 for in-context methods (listed first), 1 for trained ones
    method: str
    k: int | None
    preset: str | None
    label: str


def group_runs(runs: Iterable[dict]) -> dict[Group, list[dict]]:
    """Runs grouped by (model, method), split by ``k``/preset where those vary within a method; sorted keys."""
    runs = list(runs)
    seen: dict[tuple, dict[str, set]] = defaultdict(lambda: {"k": set(), "preset": set()})
    for r in runs:
        cell = seen[(str(r.get("model")), str(r.get("method")))]
        cell["k"].add(r.get("k"))
        cell["preset"].add(r.get("preset"))
    groups: dict[Group, list[dict]] = defaultdict(list)
    for r in runs:
        model, method = str(r.get("model")), str(r.get("method"))
        vary = seen[(model, method)]
        k = r.get("k") if len(vary["k"]) > 1 else None
        preset = r.get("preset") if len(vary["preset"]) > 1 else None
        label = method + (f" k={k}" if k is not None else "") + (f" preset={preset}" if preset is not None else "")
        groups[Group(model, 0 if is_in_context(method) else 1, method, k, preset, label)].append(r)
    return {g: sorted(groups[g], key=run_sort_key) for g in sorted(groups, key=_group_key)}


def _group_key(g: Group) -> tuple:
    return (g.model, g.icl_rank, g.method, _sort_value(g.k), _sort_value(g.preset), g.label)


def values(runs: Iterable[dict], field: str) -> list[float]:
    return [float(r[field]) for r in runs if r.get(field) is not None]


def median_of(runs: Iterable[dict], field: str) -> float | None:
    vals = values(runs, field)
    return stats.median(vals) if vals else None


def mean_of_task_medians(runs: Iterable[dict], metric: str = "accuracy") -> float | None:
    """Mean over tasks of each task's median ``metric`` (every task weighs the same)."""
    by_task: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        if r.get(metric) is not None:
            by_task[str(r.get("task"))].append(float(r[metric]))
    if not by_task:
        return None
    return sum(stats.median(v) for v in by_task.values()) / len(by_task)


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def metric_notes(runs: list[dict], metric: str) -> tuple[str, ...]:
    """The metric's definition, and how many runs lack it (per-character: runs migrated from schema 1)."""
    notes = [f"Metric: {METRIC_DEFINITIONS[metric]}."]
    lacking = [r for r in runs if r.get(metric) is None]
    if lacking:
        why = ""
        if metric == "accuracy_norm_char" and any(r.get("n_chars_with_delimiter") for r in lacking):
            why = (" (runs from a schema-1 store: their character counts include the target delimiter, so no "
                   "per-character accuracy is computed for them)")
        notes.append(f"{len(lacking)} of {len(runs)} runs have no {metric}{why}; they are left out of its figures.")
    return tuple(notes)


def summary_table(runs: list[dict], metric: str = "accuracy") -> Table:
    """(a) Per (model, method), in the layout of T-Few's Table 1."""
    _check_metric(metric)
    rows = []
    for g, rs in group_runs(runs).items():
        rows.append((g.model, g.label, fmt_flops(median_of(rs, "infer_flops_per_example")),
                     fmt_flops(median_of(rs, "train_flops")), fmt_bytes(median_of(rs, "checkpoint_bytes")),
                     fmt_acc(median_of(rs, metric)), fmt_acc(mean_of_task_medians(rs, metric)),
                     str(len({r.get("task") for r in rs})), str(len(rs))))
    notes = (
        *metric_notes(runs, metric),
        f"{metric} in percent: *median* over all task/template/seed runs of the method; "
        "*mean of task medians*: the mean over tasks of each task's median.",
        "Inference FLOPs per evaluated example, training FLOPs and disk space (checkpoint bytes) are medians over "
        "runs. Training FLOPs are those of one trained adapter (shared by all templates of a task and seed), never "
        "summed over templates. Bytes are in decimal SI units (1 MB = 10^6 bytes).",
    )
    return Table(f"Summary per model and method (metric: {metric})",
                 ("Model", "Method", "Inference FLOPs/example", "Training FLOPs", "Disk space", f"{metric} median",
                  f"{metric} mean of task medians", "Tasks", "Runs"),
                 tuple(rows), "llrrrrrrr", notes, "tab:summary")


def task_table(runs: list[dict], metric: str = "accuracy", n_resamples: int = stats.DEFAULT_RESAMPLES,
               seed: int = stats.DEFAULT_SEED) -> Table:
    """(b) Per task x (model, method): median with IQR over templates and seeds, mean with bootstrap 95% CI."""
    _check_metric(metric)
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for g, rs in group_runs(runs).items():
        for r in rs:
            cells[(str(r.get("task")), g)].append(r)
    rows = []
    for (task, g) in sorted(cells, key=lambda c: (c[0], _group_key(c[1]))):
        vals = values(cells[(task, g)], metric)
        if vals:
            m = stats.median_iqr(vals)
            est = stats.bootstrap_mean_ci(vals, n_resamples=n_resamples, seed=seed)
            median_s, iqr_s = fmt_acc(m.median), fmt_interval(m.q25, m.q75)
            mean_s = f"{fmt_acc(est.value)} {fmt_interval(est.lo, est.hi)}"
        else:
            median_s = iqr_s = mean_s = fmt_acc(None)
        rows.append((task, g.model, g.label, median_s, iqr_s, mean_s, str(len(vals))))
    notes = (
        *metric_notes(runs, metric),
        f"{metric} in percent over the runs of each cell (templates x seeds). IQR: 25th to 75th percentile "
        "(linear interpolation). Mean with a percentile-bootstrap 95% CI over runs "
        f"({n_resamples} resamples, seed {seed}). Runs: runs with a value.",
    )
    return Table(f"Accuracy per task and method (metric: {metric})",
                 ("Task", "Model", "Method", f"{metric} median", "IQR", "Mean [95% CI]", "Runs"),
                 tuple(rows), "lllrrrr", notes, "tab:tasks")


def cost_table(runs: list[dict]) -> Table:
    """(c) Per (model, method): trainable parameters, peak memory, training time, evaluation time (medians)."""
    rows = []
    for g, rs in group_runs(runs).items():
        trainable, total = median_of(rs, "trainable_params"), median_of(rs, "total_params")
        share = f"{100 * trainable / total:.3g}%" if trainable is not None and total else fmt_acc(None)
        rows.append((g.model, g.label, fmt_params(trainable), share, fmt_bytes(median_of(rs, "peak_memory_bytes")),
                     fmt_seconds(median_of(rs, "train_seconds")), fmt_seconds(median_of(rs, "eval_seconds")),
                     str(len(rs))))
    notes = (
        "Medians over runs. Training time is that of one adapter (shared by the templates of a task and seed); "
        "evaluation time is per run (one template). Memory in decimal SI units.",
    )
    return Table("Cost per model and method",
                 ("Model", "Method", "Trainable params", "Trainable share", "Peak memory", "Training time",
                  "Evaluation time", "Runs"),
                 tuple(rows), "llrrrrrr", notes, "tab:costs")


def settings_lines(runs: list[dict]) -> list[str]:
    """One line per setting that describes how the runs were made (distinct values, sorted)."""
    def distinct(get) -> str:
        vals = sorted({str(get(r)) for r in runs})
        return ", ".join(vals) if vals else "n/a"

    return [
        f"Models: {distinct(lambda r: r.get('model'))}",
        f"Tasks: {distinct(lambda r: r.get('task'))}",
        f"Methods: {distinct(lambda r: r.get('method'))}",
        f"Presets: {distinct(lambda r: r.get('preset'))}",
        f"k: {distinct(lambda r: r.get('k'))}",
        f"dtype: {distinct(lambda r: (r.get('config') or {}).get('dtype'))}",
        f"device: {distinct(lambda r: (r.get('config') or {}).get('device'))}",
        f"KV cache: {distinct(lambda r: (r.get('config') or {}).get('kv_cache'))}",
        f"Evaluation limit: {distinct(lambda r: (r.get('config') or {}).get('limit'))}",
    ]
