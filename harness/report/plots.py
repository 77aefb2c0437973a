"""Report figures (matplotlib, Agg canvas, PNG and PDF); the break-even arithmetic is in :mod:`.breakeven`.

Figures: accuracy vs inference FLOPs per example (T-Few's figure), ICL accuracy vs k, accuracy vs checkpoint
size, accuracy vs trainable parameters (Houlsby et al. 2019's figure), the demonstration variants' figures
(:mod:`.variants`, only when the store holds such runs), and the break-even of each PEFT method against ICL: total cost ``train FLOPs + n x inference FLOPs per
example`` vs the number of queries ``n``. A figure whose data the store lacks is skipped with a note, never an
error. Figures are built on :class:`matplotlib.figure.Figure` objects (no pyplot, no global state) and saved
without timestamps or version strings that would make two reports of one store differ.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from harness.report import stats
from harness.report.canvas import MARKERS, PlotResult, new_figure, save_figure
from harness.report.breakeven import cost_groups, fmt_count, pairs_of, total_cost
from harness.report.format import fmt_bytes, fmt_flops
from harness.report.tables import extra_metric, groups, is_in_context
from harness.report.variants import default_runs, variant_plots
from harness.results import frame

def _legend_name(group, n_models: int) -> str:
    return f"{group.model}: {group.label}" if n_models > 1 else group.label


def _acc_points(runs, x_field: str, metric: str, positive_only: bool):
    """Per group: (group, x median, y median/q25/q75 in percent); plus notes for groups left out."""
    points, notes, models = [], [], set()
    for _, g, rs in groups(runs):
        models.add(g.model)
        x, ys = stats.median(rs[x_field]), rs[metric].dropna()
        if np.isnan(x) or ys.empty or (positive_only and x <= 0):
            why = "no " + metric if ys.empty else f"{x_field} is {'missing' if np.isnan(x) else 'zero'}"
            notes.append(f"{g.model}: {g.label} left out ({why})")
            continue
        points.append((g, x, stats.median_iqr(100 * ys)))
    return points, notes, len(models)


def _scatter(ax, points, n_models: int) -> None:
    """One point per group. With one model: a colour and marker per point. With several: a colour per method (the
    same method has the same colour for every model) and a marker per model, so the models can be told apart."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

    labels = list(dict.fromkeys(g.label for g, _, _ in points))
    models = list(dict.fromkeys(g.model for g, _, _ in points))
    for i, (g, x, m) in enumerate(points):
        colour = labels.index(g.label) if n_models > 1 else i
        marker = MARKERS[(models.index(g.model) if n_models > 1 else i) % len(MARKERS)]
        ax.errorbar([x], [m.median], yerr=[[m.median - m.q25], [m.q75 - m.median]], fmt=marker,
                    color=f"C{colour % 10}", markersize=8, capsize=4, label=_legend_name(g, n_models))
    ax.set_xscale("log")
    xs = [x for _, x, _ in points]
    if max(xs) < 10 * min(xs):  # under a decade matplotlib's log ticks crowd and overlap: five short labels instead
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}".replace("e+", "e")))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the axes, never over a point


def plot_accuracy_vs_flops(runs, out_dir: Path, metric: str = "accuracy") -> PlotResult:
    name, title = "accuracy_vs_flops", f"{metric} vs inference FLOPs per example"
    points, notes, n_models = _acc_points(runs, "infer_flops_per_example", metric, positive_only=True)
    if not points:
        return PlotResult(name, title, notes=("skipped: no run has both inference FLOPs and accuracy",))
    fig, (ax,) = new_figure(title)
    _scatter(ax, points, n_models)
    ax.set_xlabel("Inference FLOPs per example (log scale)")
    ax.set_ylabel(f"{metric} (%): median, IQR error bars")
    return PlotResult(name, title, save_figure(fig, out_dir, name), tuple(notes))


def plot_accuracy_vs_checkpoint(runs, out_dir: Path, metric: str = "accuracy") -> PlotResult:
    name, title = "accuracy_vs_checkpoint", f"{metric} vs checkpoint size"
    points, notes, n_models = _acc_points(runs, "checkpoint_bytes", metric, positive_only=True)
    if not points:
        return PlotResult(name, title, notes=("skipped: no run has a non-zero checkpoint size and accuracy",))
    fig, (ax,) = new_figure(title)
    _scatter(ax, points, n_models)
    for g, x, m in points:
        ax.annotate(fmt_bytes(x), (x, m.median), textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.set_xlabel("Checkpoint size in bytes (log scale, median over runs)")
    ax.set_ylabel(f"{metric} (%): median, IQR error bars")
    return PlotResult(name, title, save_figure(fig, out_dir, name), tuple(notes))


def plot_accuracy_vs_params(runs, out_dir: Path, metric: str = "accuracy") -> PlotResult:
    """Accuracy vs trainable parameters (log x), one point per method per model, IQR error bars over templates x
    seeds: the figure of Houlsby et al. 2019 (fig. 1). In-context methods (nothing trained) are not drawn."""
    name, title = "accuracy_vs_params", f"{metric} vs trainable parameters"
    df = frame(runs)
    trained = df[[not is_in_context(m) for m in df["method"]]] if len(df) else df
    points, notes, n_models = _acc_points(trained, "trainable_params", metric, positive_only=True)
    if not points:
        return PlotResult(name, title, notes=("skipped: no trained run has trainable parameters and accuracy",))
    fig, (ax,) = new_figure(title)
    _scatter(ax, points, n_models)
    ax.set_xlabel("Trainable parameters (log scale, median over runs)")
    ax.set_ylabel(f"{metric} (%): median, IQR error bars")
    return PlotResult(name, title, save_figure(fig, out_dir, name), tuple(notes))


def plot_icl_vs_k(runs, out_dir: Path, metric: str = "accuracy") -> PlotResult:
    name, title = "icl_accuracy_vs_k", f"ICL {metric} vs number of demonstrations k"
    df = frame(runs)
    icl = df[df["method"].map(is_in_context) & df["k"].notna() & df[metric].notna()]
    if icl.empty:
        return PlotResult(name, title, notes=("skipped: the store holds no ICL runs",))
    several = icl["model"].nunique() > 1
    fig, (ax,) = new_figure(title)
    # one line per (model, task); zero-shot runs are the k = 0 point of their task's line
    for i, ((model, task), line) in enumerate(icl.groupby(["model", "task"])):
        ks, ms = zip(*((int(k), stats.median_iqr(100 * acc)) for k, acc in line.groupby("k")[metric]))
        med = [m.median for m in ms]
        err = [[m.median - m.q25 for m in ms], [m.q75 - m.median for m in ms]]
        label = f"{task} ({model})" if several else task
        ax.errorbar(ks, med, yerr=err, marker=MARKERS[i % len(MARKERS)], color=f"C{i % 10}", capsize=3, label=label)
        calibrated = extra_metric(line, "accuracy_calibrated")
        if metric == "accuracy" and calibrated.notna().any():  # runs with --calibrate: their calibrated line
            ck = [(int(k), 100 * stats.median(v)) for k, v in calibrated.groupby(line["k"]) if v.notna().any()]
            ax.plot([k for k, _ in ck], [v for _, v in ck], linestyle="--", marker=MARKERS[i % len(MARKERS)],
                    color=f"C{i % 10}", alpha=0.6, label=f"{label}, calibrated")
    all_k = sorted(int(k) for k in icl["k"].unique())
    ax.set_xticks(all_k)
    ax.set_xlabel("k (demonstrations in the prompt; k = 0 is zero-shot)")
    ax.set_ylabel(f"{metric} (%): median over templates and seeds, IQR")
    ax.grid(True, alpha=0.3)
    ax.legend(title="task", fontsize=9)
    return PlotResult(name, title, save_figure(fig, out_dir, name))


def plot_break_even(runs, out_dir: Path) -> PlotResult:
    """Total cost lines of each model's PEFT and ICL sides. A line is a side's medians over its runs, so only
    pairs that ran the same tasks are drawn; a PEFT method run on fewer tasks than ICL is left to the break-even
    table, which costs both sides over the tasks they share (a note names it)."""
    name, title = "break_even", "Total cost vs number of queries: PEFT against ICL"
    per_model, notes = cost_groups(runs)
    drawn = {}
    for m in sorted(per_model):
        pairs, pair_notes = pairs_of(per_model[m])
        same = [pr for pr in pairs if pr.same_tasks]
        for pr in pairs:
            if not pr.same_tasks:
                notes.append(f"{m}: {pr.peft.group.label} vs {pr.icl.group.label} left out of the figure (compared "
                             f"on {', '.join(pr.tasks)} only: see the break-even table)")
        if same:
            drawn[m] = (per_model[m], same)
        else:
            notes.append(f"{m}: skipped (needs both ICL and PEFT runs with FLOPs on the same tasks)")
    if not drawn:
        return PlotResult(name, title, notes=("skipped: needs ICL and PEFT runs of one model with FLOPs", *notes))
    fig, axes = new_figure(title, ncols=len(drawn))
    for ax, model in zip(axes, sorted(drawn)):
        sides, pairs = drawn[model]
        icl_sides = [s for s in sides["icl"] if any(pr.icl is s for pr in pairs)]
        peft_sides = [s for s in sides["peft"] if any(pr.peft is s for pr in pairs)]
        crossings = [pr.break_even.n for pr in pairs if pr.break_even.n is not None]
        n_max = max([1e6] + [10 * n for n in crossings])
        n = np.logspace(0, np.log10(n_max), 200)
        for j, side in enumerate(icl_sides):
            ax.plot(n, total_cost(side.train, side.infer, n), linestyle="--",
                    color="black" if j == 0 else f"0.{3 + j % 6}",
                    label=f"{side.group.label}: {fmt_flops(side.train)} + n x {fmt_flops(side.infer)}")
        for j, side in enumerate(peft_sides):
            ax.plot(n, total_cost(side.train, side.infer, n), color=f"C{j % 10}",
                    label=f"{side.group.label}: {fmt_flops(side.train)} + n x {fmt_flops(side.infer)}")
        for k, pr in enumerate(pairs):
            j, be = next(j for j, s in enumerate(peft_sides) if s is pr.peft), pr.break_even
            text = f"{pr.peft.group.label} vs {pr.icl.group.label}: {be.text}"
            if be.n is None:
                ax.plot([], [], linestyle="none", marker=MARKERS[k % len(MARKERS)], color=f"C{j % 10}", label=text)
                continue
            cost = float(total_cost(pr.peft_train, pr.peft_infer, be.n))
            ax.plot([be.n], [cost], linestyle="none", marker=MARKERS[k % len(MARKERS)], markersize=9,
                    color=f"C{j % 10}", label=text)
            ax.annotate(f"n = {fmt_count(be.n)}", (be.n, cost), textcoords="offset points", xytext=(8, -14),
                        fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("Number of queries n (log scale)")
        ax.set_ylabel("Total FLOPs: training + n x inference per example (log scale)")
        ax.set_title(model, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    return PlotResult(name, title, save_figure(fig, out_dir, name), tuple(notes))


def make_plots(runs, out_dir: Path, metric: str = "accuracy") -> list[PlotResult]:
    """Write every figure under ``out_dir`` (PNG and PDF); figures lacking data come back with a skip note."""

    out_dir = Path(out_dir)
    every, runs = runs, default_runs(runs)  # demonstration variants only in their own figures (issue 15)
    return [
        plot_accuracy_vs_flops(runs, out_dir, metric),
        plot_icl_vs_k(runs, out_dir, metric),
        plot_accuracy_vs_checkpoint(runs, out_dir, metric),
        plot_break_even(runs, out_dir),
        plot_accuracy_vs_params(runs, out_dir, metric),
        *variant_plots(every, out_dir, metric),
    ]
