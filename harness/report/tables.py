"""Report tables from the runs frame (:func:`harness.results.runs`): T-Few Table 1 style summary, per-task
accuracy, and per-method costs; and the selection and grouping of runs they share.

Runs are grouped by (model, method). When one method of one model was run with several ``k`` or presets, or with
training settings that differ within one preset (:mod:`.train_variants`), each variant gets its own group,
labelled e.g. ``icl k=4``, ``lora preset=quick`` or ``adapter scale_parameter=false``, so different experiments
are never pooled into one median. In-context methods (no training) are recognised by name: ``icl...`` (k-shot) and
``zeroshot``; every other method is taken to be a trained (PEFT) method.

Per-run cost figures (FLOPs, bytes, seconds) are summarized by their median over runs (:func:`stats.median`, as an
aggregation of pandas' groupby). PEFT runs of one (task, method, seed) share a single trained adapter across
templates, so their ``train_flops`` and ``train_seconds`` repeat the same training on each template's row: they are
never summed across templates. Every function takes the runs as a frame or as run dicts (``Store.runs()``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import pandas as pd

from harness.report import stats
from harness.report.format import (Table, fmt_acc, fmt_bytes, fmt_flops, fmt_interval, fmt_params,
                                   fmt_seconds)
from harness.report.train_variants import train_variants
from harness.results import frame
from harness.store import METRIC_COLUMNS

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
    """The run order of :func:`sort_runs` for one dict (a baseline cell)."""
    return tuple(_sort_value(run.get(k)) for k in _RUN_ORDER)


def sort_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs by model, task, method, k, preset, template, seed, run id; missing values last."""
    return runs.sort_values(list(_RUN_ORDER), na_position="last", kind="stable", ignore_index=True)


# Config fields that fingerprint a run's inputs (harness/identity.py) or say where they were found. Two finished runs
# whose configs differ only in these are the same experiment made twice with changed inputs (a task file, the data,
# the weights, the scoring code): only the later one is current.
INPUT_FIELDS = ("task_hash", "data_hash", "train_data_hash", "model_fingerprint", "scoring_version",
                "template_fingerprint", "task_source", "model_path", "data_source")


def experiment_key(config: dict | None) -> str:
    """A run's config without :data:`INPUT_FIELDS`: equal for re-runs of one experiment with changed inputs."""
    import json

    from harness.spec import VARIANT_DEFAULTS

    # a field at its default counts as absent: a run stored before the field existed is the same experiment
    return json.dumps({k: v for k, v in (config or {}).items() if k not in INPUT_FIELDS and k not in RUN_OPTIONS
                       and not (k in VARIANT_DEFAULTS and v == VARIANT_DEFAULTS[k])},
                      sort_keys=True, default=str)


# Config fields that add figures to a run without changing its others (``calibrate``): not part of an experiment.
RUN_OPTIONS = ("calibrate",)


def latest_runs(runs: Iterable[dict] | pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Per experiment (:func:`experiment_key`) the most recently finished run (the first of equal times); and
    how many older ones were dropped. Reports never pool a stale result with the one that replaced it."""
    df = frame(runs)
    latest = df.loc[df["finished_at"].fillna(0).groupby(df["config"].map(experiment_key), sort=False).idxmax()]
    return latest, len(df) - len(latest)


def select_runs(runs: Iterable[dict] | pd.DataFrame, include_random: bool = False,
                tasks: Iterable[str] | None = None) -> pd.DataFrame:
    """Finished runs (random-init models dropped unless ``include_random``; only ``tasks`` when given), the latest
    of each experiment only (:func:`latest_runs`), in run order (:func:`sort_runs`)."""
    df = frame(runs)
    keep = (df["status"] == "finished") & (include_random | ~df["is_random"])
    if tasks is not None:
        keep &= df["task"].isin(list(tasks))
    return sort_runs(latest_runs(df[keep])[0])


@dataclasses.dataclass(frozen=True)
class Group:
    """One (model, method variant) group; ``label`` names it in tables and legends."""

    model: str
    icl_rank: int  # 0 for in-context methods (listed first), 1 for trained ones
    method: str
    k: int | None
    preset: str | None
    label: str
    train: str | None = None  # the training settings that vary within the cell (``scale_parameter=false``)


# The group columns with_groups adds, in the order groups are listed (missing k/preset last; training variants
# in the order of their values, train_rank).
GROUP_COLUMNS = ("model", "icl_rank", "method", "group_k", "group_preset", "train_rank", "group_train", "label")


def with_groups(runs: Iterable[dict] | pd.DataFrame) -> pd.DataFrame:
    """The runs in run order, numbers as float64, with the columns of their (model, method) group: ``group_k``
    and ``group_preset`` (the run's k and preset where they vary within its model's method, else missing),
    ``group_train`` and ``train_rank`` (the training settings that vary within its model's method and preset, as
    ``scale_parameter=false lr=0.0003``, else missing; :mod:`.train_variants`), ``label`` (``icl k=4``,
    ``lora preset=quick``, ``adapter scale_parameter=false``) and ``icl_rank``."""
    df = sort_runs(frame(runs)).astype(dict.fromkeys(METRIC_COLUMNS, "float64"))
    cell = df.groupby(["model", "method"], dropna=False)
    for column in ("k", "preset"):
        varies = cell[column].transform(lambda s: s.nunique(dropna=False) > 1).astype(bool)
        df[f"group_{column}"] = df[column].where(varies)
    df["group_train"], df["train_rank"] = train_variants(df)
    label = df["method"].astype(object)
    for column, name in (("group_k", " k="), ("group_preset", " preset="), ("group_train", " ")):
        label = label + df[column].astype(object).map(lambda v: "" if pd.isna(v) else f"{name}{v}")
    df["label"] = label
    df["icl_rank"] = [0 if is_in_context(m) else 1 for m in df["method"]]
    return df


def groups(runs: Iterable[dict] | pd.DataFrame, by: tuple[str, ...] = ()) -> list[tuple[tuple, Group, pd.DataFrame]]:
    """Per (``by`` columns..., model, method variant), sorted: the ``by`` values, the :class:`Group` and its
    runs (in run order). Runs of one method with several ``k``, presets or training settings form one group
    each."""
    out = []
    for key, rs in with_groups(runs).groupby([*by, *GROUP_COLUMNS], sort=True, dropna=False):
        *head, model, icl_rank, method, k, preset, _, train, label = key
        out.append((tuple(head), Group(model, int(icl_rank), method, None if pd.isna(k) else int(k),
                                       None if pd.isna(preset) else preset, label,
                                       None if pd.isna(train) else train), rs))
    return out


def mean_of_task_medians(runs: pd.DataFrame, metric: str = "accuracy") -> float:
    """Mean over tasks of each task's median ``metric`` (every task weighs the same; NaN without values)."""
    medians = runs.groupby("task", dropna=False)[metric].agg(stats.median).dropna()
    return sum(medians) / len(medians) if len(medians) else math.nan


def task_coverage_notes(runs: pd.DataFrame) -> list[str]:
    """Per model whose methods ran different task sets: which methods ran which tasks (a median pooled over tasks
    compares like with like only between methods that ran the same ones)."""
    notes = []
    for model, of_model in runs.groupby("model", sort=True):
        by_tasks: dict[tuple, list[str]] = {}
        for _, g, rs in groups(of_model):
            by_tasks.setdefault(tuple(sorted(rs["task"].dropna().unique())), []).append(g.label)
        if len(by_tasks) > 1:
            parts = "; ".join(f"{', '.join(tasks)}: {', '.join(labels)}" for tasks, labels in
                              sorted(by_tasks.items(), key=lambda kv: (-len(kv[0]), kv[0])))
            notes.append(f"{model}: its methods ran different tasks ({parts}); medians pooled over tasks compare "
                         "only methods that ran the same tasks: compare the others per task.")
    return notes


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def metric_notes(runs: pd.DataFrame, metric: str) -> tuple[str, ...]:
    """The metric's definition, and how many runs lack it (per-character: runs migrated from schema 1)."""
    notes = [f"Metric: {METRIC_DEFINITIONS[metric]}."]
    lacking = runs[runs[metric].isna()]
    if len(lacking):
        why = ""
        if metric == "accuracy_norm_char" and lacking["n_chars_with_delimiter"].any():
            why = (" (runs from a schema-1 store: their character counts include the target delimiter, so no "
                   "per-character accuracy is computed for them)")
        notes.append(f"{len(lacking)} of {len(runs)} runs have no {metric}{why}; they are left out of its figures.")
    return tuple(notes)


def summary_table(runs: Iterable[dict] | pd.DataFrame, metric: str = "accuracy") -> Table:
    """(a) Per (model, method), in the layout of T-Few's Table 1."""
    check_metric(metric)
    runs, rows = frame(runs), []
    for _, g, rs in groups(runs):
        m = rs[["infer_flops_per_example", "train_flops", "checkpoint_bytes", metric]].agg(stats.median)
        rows.append((g.model, g.label, fmt_flops(m["infer_flops_per_example"]), fmt_flops(m["train_flops"]),
                     fmt_bytes(m["checkpoint_bytes"]), fmt_acc(m[metric]), fmt_acc(mean_of_task_medians(rs, metric)),
                     str(rs["task"].nunique(dropna=False)), str(len(rs))))
    notes = (
        *metric_notes(runs, metric),
        f"{metric} in percent: *median* over all task/template/seed runs of the method; "
        "*mean of task medians*: the mean over tasks of each task's median.",
        "Inference FLOPs per evaluated example, training FLOPs and disk space (checkpoint bytes) are medians over "
        "runs. Training FLOPs are those of one trained adapter (shared by all templates of a task and seed), never "
        "summed over templates. Bytes are in decimal SI units (1 MB = 10^6 bytes).",
        *task_coverage_notes(runs),
    )
    return Table(f"Summary per model and method (metric: {metric})",
                 ("Model", "Method", "Inference FLOPs/example", "Training FLOPs", "Disk space", f"{metric} median",
                  f"{metric} mean of task medians", "Tasks", "Runs"),
                 tuple(rows), "llrrrrrrr", notes, "tab:summary")


def task_table(runs: Iterable[dict] | pd.DataFrame, metric: str = "accuracy",
               n_resamples: int = stats.DEFAULT_RESAMPLES, seed: int = stats.DEFAULT_SEED) -> Table:
    """(b) Per task x (model, method): median with IQR over templates and seeds, mean with bootstrap 95% CI."""
    check_metric(metric)
    runs, rows = frame(runs), []
    for (task,), g, rs in groups(runs, by=("task",)):
        vals = rs[metric].dropna().tolist()  # in run order: the bootstrap resamples by position
        if vals:
            m = stats.median_iqr(vals)
            est = stats.bootstrap_mean_ci(vals, n_resamples=n_resamples, seed=seed)
            median_s, iqr_s = fmt_acc(m.median), fmt_interval(m.q25, m.q75)
            mean_s = f"{fmt_acc(est.value)} {fmt_interval(est.lo, est.hi)}"
        else:
            median_s = iqr_s = mean_s = fmt_acc(None)
        rows.append((str(task), g.model, g.label, median_s, iqr_s, mean_s, str(len(vals))))
    notes = (
        *metric_notes(runs, metric),
        f"{metric} in percent over the runs of each cell (templates x seeds). IQR: 25th to 75th percentile "
        "(linear interpolation). Mean with a percentile-bootstrap 95% CI over runs "
        f"({n_resamples} resamples, seed {seed}). Runs: runs with a value.",
    )
    return Table(f"Accuracy per task and method (metric: {metric})",
                 ("Task", "Model", "Method", f"{metric} median", "IQR", "Mean [95% CI]", "Runs"),
                 tuple(rows), "lllrrrr", notes, "tab:tasks")


def cost_table(runs: Iterable[dict] | pd.DataFrame) -> Table:
    """(c) Per (model, method): trainable parameters, peak memory, training time, evaluation time (medians)."""
    rows = []
    for _, g, rs in groups(runs):
        m = rs[["trainable_params", "total_params", "peak_memory_bytes", "train_seconds", "eval_seconds"]].agg(
            stats.median)
        trainable, total = m["trainable_params"], m["total_params"]
        share = f"{100 * trainable / total:.3g}%" if pd.notna(trainable) and pd.notna(total) and total else \
            fmt_acc(None)
        rows.append((g.model, g.label, fmt_params(trainable), share, fmt_bytes(m["peak_memory_bytes"]),
                     fmt_seconds(m["train_seconds"]), fmt_seconds(m["eval_seconds"]), str(len(rs))))
    notes = (
        "Medians over runs. Training time is that of one adapter (shared by the templates of a task and seed); "
        "evaluation time is per run (one template). Memory in decimal SI units.",
    )
    return Table("Cost per model and method",
                 ("Model", "Method", "Trainable params", "Trainable share", "Peak memory", "Training time",
                  "Evaluation time", "Runs"),
                 tuple(rows), "llrrrrrr", notes, "tab:costs")


def extra_metric(runs: pd.DataFrame, name: str) -> pd.Series:
    """A figure stored beside a run (its ``extra`` dict), as float64 (NaN where missing)."""
    return pd.to_numeric(runs["extra"].map(lambda e: (e or {}).get(name)), errors="coerce").astype("float64")


def k_curve_table(runs: Iterable[dict] | pd.DataFrame, metric: str = "accuracy") -> Table | None:
    """ICL ``metric`` per task and k (median, IQR over templates and seeds), zero-shot as k = 0; None unless some
    (model, task) has k-shot runs with two or more k (a k-curve, ``--k 0,1,2,...``)."""
    check_metric(metric)
    runs = frame(runs)
    icl = runs[runs["method"].map(is_in_context) & runs["k"].notna()]
    shot = icl[icl["method"].map(is_icl)]
    if shot.empty or shot.groupby(["model", "task"])["k"].nunique().max() < 2:
        return None
    rows = []
    for (model, task, k), rs in icl.groupby(["model", "task", "k"], sort=True):
        vals = rs[metric].dropna().tolist()
        m = stats.median_iqr(vals) if vals else None
        used = rs["extra"].map(lambda e: (e or {}).get("k_used")).dropna()
        reduced = f" (k used: {', '.join(sorted({str(int(u)) for u in used}))})" if (used != k).any() else ""
        rows.append((str(task), str(model), f"{int(k)}{reduced}", fmt_acc(m.median if m else None),
                     fmt_interval(m.q25, m.q75) if m else fmt_acc(None), str(len(vals))))
    notes = (*metric_notes(runs, metric),
             f"{metric} in percent over the runs of each cell (templates x seeds); k = 0 holds zero-shot runs and "
             "k-shot runs with k = 0. A k whose demonstrations were reduced to fit the context says the k used. The "
             "figure 'ICL accuracy vs k' draws the same numbers.")
    return Table(f"ICL {metric} per task and number of demonstrations k",
                 ("Task", "Model", "k", f"{metric} median", "IQR", "Runs"), tuple(rows), "llrrrr", notes,
                 "tab:kcurve")


def calibration_table(runs: Iterable[dict] | pd.DataFrame) -> Table | None:
    """Per task x (model, method variant): accuracy, contextually calibrated accuracy and mutual-information
    accuracy (medians over the runs with calibration, ``--calibrate``); None when no run has them."""
    runs = frame(runs)
    runs = runs.assign(accuracy_calibrated=extra_metric(runs, "accuracy_calibrated"),
                       accuracy_mutual_info=extra_metric(runs, "accuracy_mutual_info"),
                       calibration_flops_per_example=extra_metric(runs, "calibration_flops_per_example"))
    calibrated = runs[runs["accuracy_mutual_info"].notna() | runs["accuracy_calibrated"].notna()]
    if calibrated.empty:
        return None
    rows = []
    for (task,), g, rs in groups(calibrated, by=("task",)):
        m = rs[["accuracy", "accuracy_calibrated", "accuracy_mutual_info", "infer_flops_per_example",
                "calibration_flops_per_example"]].agg(stats.median)
        rows.append((str(task), g.model, g.label, fmt_acc(m["accuracy"]), fmt_acc(m["accuracy_calibrated"]),
                     fmt_acc(m["accuracy_mutual_info"]), fmt_flops(m["infer_flops_per_example"]),
                     fmt_flops(m["calibration_flops_per_example"]), str(len(rs))))
    notes = (
        "accuracy_calibrated: contextual calibration (Zhao et al. 2021): argmax of p(choice | x) / p_cf(choice), "
        "p_cf from the content-free inputs 'N/A', '' and '[MASK]' in the same prompt; none for tasks with "
        "per-example choices. accuracy_mutual_info: lm-evaluation-harness's acc_mutual_info, argmax of "
        "log p(choice | context) - log p(choice | empty context). docs/metrics.md.",
        "Medians in percent over the runs with calibration (templates x seeds). Calibration FLOPs/example: the "
        "extra forward passes of both, per evaluated example, not included in the inference FLOPs.",
    )
    return Table("Calibrated accuracy per task and method",
                 ("Task", "Model", "Method", "accuracy", "accuracy_calibrated", "accuracy_mutual_info",
                  "Inference FLOPs/example", "Calibration FLOPs/example", "Runs"),
                 tuple(rows), "lllrrrrrr", notes, "tab:calibration")


def settings_lines(runs: Iterable[dict] | pd.DataFrame) -> list[str]:
    """One line per setting that describes how the runs were made (distinct values, sorted)."""
    runs = frame(runs)

    def distinct(values: pd.Series) -> str:
        vals = sorted({str(None if v is None or v is pd.NA or v != v else v) for v in values.astype(object)})
        return ", ".join(vals) if vals else "n/a"

    def config(field: str) -> pd.Series:
        return runs["config"].map(lambda c: c.get(field))

    return [
        f"Models: {distinct(runs['model'])}",
        f"Tasks: {distinct(runs['task'])}",
        f"Methods: {distinct(runs['method'])}",
        f"Presets: {distinct(runs['preset'])}",
        f"k: {distinct(runs['k'])}",
        f"dtype: {distinct(config('dtype'))}",
        f"device: {distinct(config('device'))}",
        f"KV cache: {distinct(config('kv_cache'))}",
        f"Evaluation limit: {distinct(config('limit'))}",
    ]
