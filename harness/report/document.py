"""Assemble the report files: ``report.md`` (Markdown) and ``report.tex`` (a LaTeX document that compiles).

Both are pure functions of the runs (the frame of :func:`harness.report.tables.select_runs`), the store's
``mixed_runs`` rows and the plot results, without timestamps, so one store always gives the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.report.breakeven import break_even_table
from harness.report.format import Table, latex_escape, to_latex, to_markdown
from harness.report.canvas import PlotResult
from harness.report.mixed import mixed_table
from harness.report.variants import default_runs, variant_tables
from harness.report.families import family_table
from harness.report.tables import (calibration_table, cost_table, k_curve_table, settings_lines,
                                   summary_table, task_table)

TITLE = "When does PEFT beat in-context learning? Results report"


def report_tables(runs: pd.DataFrame, metric: str = "accuracy", mixed: list[dict] | None = None) -> list[Table]:
    """Every table of the report; ``mixed``: the store's ``mixed_runs`` rows (issue 16; none, no section)."""
    variants = runs
    runs = default_runs(runs)  # demonstration variants (order, label noise, balanced) only in their own sections
    tables = [summary_table(runs, metric), task_table(runs, metric), cost_table(runs), break_even_table(runs),
              family_table(runs, metric)]
    # only when the store holds such runs: a k-curve, runs with calibration, demonstration variants (issue 15),
    # mixed-task serving (issue 16)
    return (tables + [t for t in (k_curve_table(runs, metric), calibration_table(runs)) if t is not None]
            + variant_tables(variants, metric)
            + [t for t in (mixed_table(mixed or [], runs["method"].unique()),) if t is not None])


def _plot_lines(plots: list[PlotResult] | None, out_dir: Path) -> list[tuple[PlotResult, str | None]]:
    """Per plot: the PNG path relative to the report folder (None when skipped)."""
    out = []
    for p in plots or []:
        png = next((x for x in p.paths if x.suffix == ".png"), None)
        out.append((p, None if png is None else Path(png).relative_to(out_dir).as_posix()))
    return out


def render_markdown(runs: pd.DataFrame, n_excluded: int, plots: list[PlotResult] | None, out_dir: Path,
                    metric: str = "accuracy", mixed: list[dict] | None = None) -> str:
    parts = [f"# {TITLE}\n", f"Finished runs: {len(runs)} ({n_excluded} other runs left out: unfinished, "
             "random-init models, other tasks, or superseded by a later run of the same experiment).\n",
             "\n".join(f"- {line}" for line in settings_lines(runs)) + "\n"]
    parts += [to_markdown(t) for t in report_tables(runs, metric, mixed)]
    if plots is not None:
        lines = ["## Figures", ""]
        for p, png in _plot_lines(plots, out_dir):
            if png:
                lines += [f"### {p.title}", "", f"![{p.title}]({png})", ""]
            else:
                lines += [f"### {p.title}", ""]
            lines += [f"- {n}" for n in p.notes]
            if p.notes:
                lines.append("")
        parts.append("\n".join(lines).rstrip("\n") + "\n")
    return "\n".join(parts)


def render_latex(runs: pd.DataFrame, n_excluded: int, plots: list[PlotResult] | None, out_dir: Path,
                 metric: str = "accuracy", mixed: list[dict] | None = None) -> str:
    lines = [
        r"\documentclass[10pt]{article}",
        r"\usepackage[margin=2cm,landscape]{geometry}",
        r"\usepackage{booktabs}",
        r"\usepackage{graphicx}",
        rf"\title{{{latex_escape(TITLE)}}}",
        r"\date{}",
        r"\begin{document}",
        r"\maketitle",
        latex_escape(f"Finished runs: {len(runs)} ({n_excluded} other runs left out: unfinished, random-init "
                     "models, other tasks, or superseded by a later run of the same experiment).") + r"\par",
        r"\begin{itemize}",
        *[rf"\item {latex_escape(line)}" for line in settings_lines(runs)],
        r"\end{itemize}",
    ]
    for t in report_tables(runs, metric, mixed):
        lines.append(to_latex(t).rstrip("\n"))
    for p, png in _plot_lines(plots, out_dir):
        pdf = png[: -len(".png")] + ".pdf" if png else None
        if pdf:
            lines += [r"\begin{figure}[htbp]", r"\centering",
                      rf"\includegraphics[width=0.8\linewidth]{{{pdf}}}",
                      rf"\caption{{{latex_escape(p.title)}}}", r"\end{figure}"]
        for note in p.notes:
            lines.append(latex_escape(f"{p.title}: {note}") + r"\par")
    lines.append(r"\end{document}")
    return "\n".join(lines) + "\n"
