"""Report sections of the demonstration variants (issue 15; :mod:`harness.demos`): order, label noise and balanced
demonstrations. Each table and figure exists only when the store holds such runs, so a report of a store without
them is unchanged; every other table and figure of the report reads the default runs only
(:func:`default_runs`: the T-Few demonstrations in their order, with gold labels), so no variant is pooled into
the method's accuracy.

- :func:`spread_table` (runs with ``--orders``): how much accuracy moves with the order of the demonstrations
  alone (within task/template/seed), with the demonstration set (the seed, within task/template, original order)
  and with the template (within task/seed, original order): per source of variation the mean over its groups of
  the standard deviation (ddof 1) and of the range (max - min), in accuracy points.
- :func:`label_noise_table` and :func:`plot_label_noise` (``--label-noise``): mean accuracy per noise level.
- :func:`demos_table` (``--demos balanced``): T-Few subsets against class-balanced demonstrations, paired by
  (template, seed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from harness.demos import RANDOM_LABELS
from harness.report.format import Table, fmt_acc
from harness.report.canvas import MARKERS, PlotResult, new_figure, save_figure
from harness.report.tables import check_metric, groups, is_icl, metric_notes
from harness.results import frame
from harness.spec import VARIANT_DEFAULTS

SOURCES = (("order", "order"), ("seed", "demonstration set (seed)"), ("template", "template"))


def variant_of(config: dict | None) -> dict:
    """A run's (demos, order, label_noise), the defaults where its config lacks them (runs made before them)."""
    config = config or {}
    return {key: config.get(key, default) for key, default in VARIANT_DEFAULTS.items()}


def with_variants(runs) -> pd.DataFrame:
    """The runs with columns ``demos``, ``order`` (int) and ``noise`` (the label-noise level: 0.0 for gold labels,
    a float, or ``"random"``)."""
    df = frame(runs)
    v = df["config"].map(variant_of)
    return df.assign(demos=v.map(lambda x: x["demos"]), order=v.map(lambda x: int(x["order"])),
                     noise=v.map(lambda x: 0.0 if x["label_noise"] is None else x["label_noise"]))


def default_runs(runs) -> pd.DataFrame:
    """The runs with every variant field at its default (all runs of a store without variants)."""
    df = frame(runs)
    if df.empty:
        return df
    keep = df["config"].map(lambda c: variant_of(c) == VARIANT_DEFAULTS)
    return df[keep.astype(bool)]


def _noise_sort(value) -> tuple:
    return (1, 0.0) if value == RANDOM_LABELS else (0, float(value))


def fmt_noise(value) -> str:
    return RANDOM_LABELS if value == RANDOM_LABELS else f"{float(value):g}"


def _spread(rs: pd.DataFrame, within: list[str], metric: str) -> tuple[float, float, int]:
    """Mean SD (ddof 1) and mean range of ``metric`` (points) over the groups of ``within`` with >= 2 runs."""
    sds, ranges = [], []
    for _, g in rs.groupby(within, sort=True, dropna=False):
        vals = 100 * g[metric].dropna().to_numpy(dtype=float)
        if len(vals) >= 2:
            sds.append(float(np.std(vals, ddof=1)))
            ranges.append(float(vals.max() - vals.min()))
    if not sds:
        return float("nan"), float("nan"), 0
    return float(np.mean(sds)), float(np.mean(ranges)), len(sds)


def _fmt_points(x: float) -> str:
    return "n/a" if x != x else f"{x:.1f}"


def _k_shot(runs) -> pd.DataFrame:
    df = with_variants(runs)
    keep = df["method"].map(is_icl).astype(bool) & (df["k"].fillna(0) > 0) & df["status"].eq("finished")
    return df[keep]


def spread_table(runs, metric: str = "accuracy") -> Table | None:
    """Spread of ``metric`` due to order, demonstration set and template (module docstring); None unless some
    run has a permuted order (``--orders``)."""
    check_metric(metric)
    df = _k_shot(runs)
    df = df[df["noise"].map(lambda p: p == 0.0).astype(bool)]  # astype: an empty map is object, read as columns
    if not (df["order"] > 0).any():
        return None
    rows = []
    for (task, demos), g, rs in groups(df, by=("task", "demos")):
        if not (rs["order"] > 0).any():
            continue
        first = rs[rs["order"] == 0]
        cells = [_spread(rs, ["template", "seed"], metric), _spread(first, ["template"], metric),
                 _spread(first, ["seed"], metric)]
        rows.append((str(task), g.model, g.label, str(demos),
                     *(x for sd, rng, n in cells for x in (_fmt_points(sd), _fmt_points(rng), str(n))),
                     str(rs["order"].nunique()), str(len(rs))))
    notes = (*metric_notes(df, metric),
             "Spread in accuracy points. Order: SD (ddof 1) and range (max - min) over the orders of one "
             "(template, seed): the same demonstrations and labels permuted (--orders), averaged over the (template, "
             "seed) groups. Seed: over the seeds of one template (original order), averaged over templates. "
             "Template: over the templates of one seed (original order), averaged over seeds. Groups: how many "
             "groups each average holds. Gold labels only.")
    columns = ("Task", "Model", "Method", "Demos", "Order SD", "Order range", "Groups", "Seed SD", "Seed range",
               "Groups", "Template SD", "Template range", "Groups", "Orders", "Runs")
    return Table(f"ICL {metric} spread due to demonstration order, demonstration set and template", columns,
                 tuple(rows), "llll" + "r" * 11, notes, "tab:order_spread")


def _noise_cells(runs, metric: str) -> pd.DataFrame:
    """Original-order k-shot runs of the (task, template, seed, demos) cells that hold a label-noise run, so every
    level is averaged over the same cells."""
    df = _k_shot(runs)
    df = df[df["order"] == 0]
    cell = ["model", "task", "method", "k", "template", "seed", "demos"]
    noisy = df.groupby(cell, dropna=False)["noise"].transform(lambda s: bool((s != 0.0).any())).astype(bool)
    return df[noisy]


def label_noise_table(runs, metric: str = "accuracy") -> Table | None:
    """Mean ``metric`` per label-noise level (0 = gold labels) per task and method; None unless some run has
    label noise (``--label-noise``)."""
    check_metric(metric)
    df = _noise_cells(runs, metric)
    if not (df["noise"] != 0.0).any():
        return None
    levels = sorted(df["noise"].unique(), key=_noise_sort)
    rows = []
    for (task, demos), g, rs in groups(df, by=("task", "demos")):
        if not (rs["noise"] != 0.0).any():
            continue
        cells = []
        for level in levels:
            vals = rs.loc[rs["noise"] == level, metric].dropna()
            cells.append(f"{fmt_acc(vals.mean())} ({len(vals)})" if len(vals) else "n/a")
        rows.append((str(task), g.model, g.label, str(demos), *cells))
    notes = (*metric_notes(df, metric),
             f"Mean {metric} in percent over the (template, seed) cells with label-noise runs (runs in parentheses), "
             "original order. p: the "
             "fraction of demonstrations given a random other label (1 = every label wrong); random: every label "
             "drawn uniformly from all labels (Min et al. 2022). The figure 'ICL accuracy vs label noise' draws the "
             "same numbers.")
    return Table(f"ICL {metric} vs demonstration label noise",
                 ("Task", "Model", "Method", "Demos", *(f"p={fmt_noise(p)}" for p in levels)),
                 tuple(rows), "llll" + "r" * len(levels), notes, "tab:label_noise")


def demos_table(runs, metric: str = "accuracy") -> Table | None:
    """T-Few subsets against class-balanced demonstrations (gold labels, original order), paired by (template,
    seed); None unless some run has ``--demos balanced``."""
    check_metric(metric)
    df = _k_shot(runs)
    df = df[(df["order"] == 0) & df["noise"].map(lambda p: p == 0.0).astype(bool)]
    if not (df["demos"] == "balanced").any():
        return None
    rows = []
    for (task,), g, rs in groups(df, by=("task",)):
        per = rs.pivot_table(index=["template", "seed"], columns="demos", values=metric, aggfunc="mean")
        if "balanced" not in per:
            continue
        if "tfew" not in per:
            per["tfew"] = float("nan")
        both = per.dropna(subset=["tfew", "balanced"])
        diff = (both["balanced"] - both["tfew"]).mean() if len(both) else float("nan")
        rows.append((str(task), g.model, g.label, fmt_acc(both["tfew"].mean()), fmt_acc(both["balanced"].mean()),
                     "n/a" if diff != diff else f"{100 * diff:+.1f}", str(len(both))))
    notes = (f"Mean {metric} in percent over the (template, seed) pairs holding both (gold labels, original "
             "order). tfew: the first k "
             "rows of the seed's T-Few 32-shot subset; balanced: k train rows drawn class-balanced with the seed "
             "(--demos balanced). Difference: balanced - tfew, in points.",)
    return Table(f"ICL {metric}: T-Few demonstrations vs class-balanced demonstrations",
                 ("Task", "Model", "Method", "tfew", "balanced", "Difference", "Pairs"),
                 tuple(rows), "lllrrrr", notes, "tab:balanced_demos")


def parse_variant(text: str | None) -> dict:
    """``compare --variant-a``: ``"order=2"``, ``"label_noise=0.5,demos=balanced"`` -> the full variant dict
    (unnamed fields at their defaults); a bad key or value is a :class:`HarnessError`."""
    from harness.demos import check_source, parse_noise_list
    from harness.errors import HarnessError

    out = dict(VARIANT_DEFAULTS)
    for item in (x.strip() for x in str(text or "").split(",")):
        if not item:
            continue
        key, _, value = item.partition("=")
        key, value = key.strip().replace("-", "_"), value.strip()
        if key == "demos":
            out[key] = check_source(value)
        elif key == "order":
            if not value.isdigit():
                raise HarnessError(f"variant order must be an integer >= 0, got {value!r}")
            out[key] = int(value)
        elif key == "label_noise":
            levels = parse_noise_list(value) if value else []
            if len(levels) != 1:
                raise HarnessError(f"variant label_noise takes one level (0..1 or random), got {value!r}")
            out[key] = levels[0]
        else:
            raise HarnessError(f"unknown variant field {key!r} in {text!r}; use demos=, order= or label_noise=")
    return out


def select_variant(runs: pd.DataFrame, variant: dict) -> pd.DataFrame:
    """The runs of one variant (:func:`parse_variant`)."""
    if runs.empty:
        return runs
    return runs[runs["config"].map(lambda c: variant_of(c) == variant).astype(bool)]


def variant_tables(runs, metric: str = "accuracy") -> list[Table]:
    """The sections the store supports (possibly none)."""
    return [t for t in (spread_table(runs, metric), label_noise_table(runs, metric), demos_table(runs, metric))
            if t is not None]


def plot_label_noise(runs, out_dir: Path, metric: str = "accuracy"):
    """Mean accuracy vs label-noise level per (task, method); ``random`` drawn right of p = 1. None without
    label-noise runs."""

    name, title = "icl_accuracy_vs_label_noise", f"ICL {metric} vs demonstration label noise"
    df = _noise_cells(runs, metric)
    if not (df["noise"] != 0.0).any():
        return None
    fig, (ax,) = new_figure(title)
    x_random = 1.25
    for i, ((task, demos), g, rs) in enumerate(groups(df, by=("task", "demos"))):
        if not (rs["noise"] != 0.0).any():
            continue
        means = rs.groupby("noise", sort=False)[metric].mean()
        num = sorted((float(p), 100 * m) for p, m in means.items() if p != RANDOM_LABELS)
        label = f"{task}: {g.label}" + ("" if demos == "tfew" else f" ({demos})")
        color, marker = f"C{i % 10}", MARKERS[i % len(MARKERS)]
        ax.plot([p for p, _ in num], [m for _, m in num], marker=marker, color=color, label=label)
        if RANDOM_LABELS in means.index:
            ax.plot([x_random], [100 * means[RANDOM_LABELS]], marker=marker, color=color, linestyle="none",
                    markersize=9, markerfacecolor="none")
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0, x_random], ["0", "0.25", "0.5", "0.75", "1", "random"])
    ax.set_xlabel("p: fraction of demonstrations with a wrong label (random: uniformly random labels)")
    ax.set_ylabel(f"{metric} (%): mean over templates and seeds")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9)
    return PlotResult(name, title, save_figure(fig, out_dir, name))


def plot_spread(runs, out_dir: Path, metric: str = "accuracy"):
    """Bars: SD due to order, seed and template per task (from :func:`spread_table`). None without orders."""

    table = spread_table(runs, metric)
    if table is None or not table.rows:
        return None
    name, title = "icl_order_spread", f"ICL {metric}: spread due to order, demonstration set and template"
    fig, (ax,) = new_figure(title)
    labels = [f"{r[0]}: {r[2]}" + ("" if r[3] == "tfew" else f" ({r[3]})") for r in table.rows]
    x = np.arange(len(labels))
    for j, (col, what) in enumerate(((4, "order"), (7, "demonstration set (seed)"), (10, "template"))):
        vals = [float(r[col]) if r[col] != "n/a" else np.nan for r in table.rows]
        ax.bar(x + (j - 1) * 0.27, vals, width=0.27, color=f"C{j}", label=what)
    ax.set_xticks(x, labels)
    ax.set_ylabel(f"SD of {metric} (points), mean over groups")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(title="varied alone")
    return PlotResult(name, title, save_figure(fig, out_dir, name))


def variant_plots(runs, out_dir: Path, metric: str = "accuracy") -> list:
    """The figures the store supports (possibly none)."""
    out_dir = Path(out_dir)
    return [p for p in (plot_spread(runs, out_dir, metric), plot_label_noise(runs, out_dir, metric)) if p is not None]
