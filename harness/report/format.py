"""Human formatting of numbers and rendering of tables to Markdown and LaTeX (booktabs), as pure functions.

Units: FLOPs in scientific notation (``1.1e12``); bytes in decimal SI units (1 kB = 1000 B, 1 MB = 10^6 B);
accuracies as percent with one decimal (``72.4``); parameter counts with K/M/B suffixes (decimal, ``460.8K``).
A missing value is shown as ``n/a``. Only ASCII is produced, so the LaTeX needs no input-encoding package.
"""

from __future__ import annotations

import dataclasses
import math

MISSING = "n/a"


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt_flops(x: float | None) -> str:
    """``1.1e12``: one decimal of mantissa, no ``+`` or leading zeros in the exponent; ``0`` stays ``0``."""
    if _missing(x):
        return MISSING
    if x == 0:
        return "0"
    mantissa, exponent = f"{float(x):.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def fmt_bytes(x: float | None) -> str:
    """Decimal SI units: ``512 B``, ``4.2 kB``, ``4.2 MB``, ``1.3 GB``, ``2.0 TB``."""
    if _missing(x):
        return MISSING
    value = float(x)
    if abs(value) < 1000:
        return f"{int(round(value))} B"
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        value /= 1000
        if abs(round(value, 1)) < 1000 or unit == "PB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def fmt_acc(p: float | None) -> str:
    """An accuracy fraction as percent with one decimal: ``0.7243 -> 72.4``."""
    return MISSING if _missing(p) else f"{100 * float(p):.1f}"


def fmt_params(n: float | None) -> str:
    """``512``, ``460.8K``, ``1.2M``, ``3.4B`` (decimal suffixes)."""
    if _missing(n):
        return MISSING
    value = float(n)
    if abs(value) < 1000:
        return f"{int(round(value))}"
    for suffix in ("K", "M", "B", "T"):
        value /= 1000
        if abs(round(value, 1)) < 1000 or suffix == "T":
            return f"{value:.1f}{suffix}"
    raise AssertionError("unreachable")


def fmt_seconds(s: float | None) -> str:
    """``0.42 s``, ``12.3 s``, ``4.5 min``, ``1.2 h``."""
    if _missing(s):
        return MISSING
    s = float(s)
    if s < 1:
        return f"{s:.2f} s"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def fmt_interval(lo: float | None, hi: float | None, fmt=fmt_acc) -> str:
    return f"[{fmt(lo)}, {fmt(hi)}]"


@dataclasses.dataclass(frozen=True)
class Table:
    """A rendered-agnostic table: cells are already formatted strings; ``align`` is ``l``/``r`` per column."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    align: str
    notes: tuple[str, ...] = ()
    label: str = ""

    def __post_init__(self):
        if len(self.align) != len(self.columns):
            raise ValueError("align must have one letter per column")
        for row in self.rows:
            if len(row) != len(self.columns):
                raise ValueError(f"row {row!r} has {len(row)} cells, expected {len(self.columns)}")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(table: Table, level: int = 2) -> str:
    """A Markdown section: heading, pipe table (right-aligned numbers), and notes as a paragraph."""
    lines = [f"{'#' * level} {table.title}", ""]
    lines.append("| " + " | ".join(_md_cell(c) for c in table.columns) + " |")
    lines.append("|" + "|".join("---:" if a == "r" else ":---" for a in table.align) + "|")
    for row in table.rows:
        lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
    if not table.rows:
        lines.append("")
        lines.append("_(no rows)_")
    for note in table.notes:
        lines += ["", note]
    return "\n".join(lines) + "\n"


_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters (``\\ & % $ # _ { } ~ ^``); other characters pass unchanged."""
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def to_latex(table: Table) -> str:
    """A ``table`` float holding one complete booktabs ``tabular`` (toprule/midrule/bottomrule), caption, label."""
    lines = [
        r"\begin{table}[htbp]",
        r"\centering",
        r"\small",
        rf"\caption{{{latex_escape(table.title)}}}",
    ]
    if table.label:
        lines.append(rf"\label{{{latex_escape(table.label)}}}")
    lines += [
        rf"\begin{{tabular}}{{{table.align}}}",
        r"\toprule",
        " & ".join(latex_escape(c) for c in table.columns) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(latex_escape(c) for c in row) + r" \\" for row in table.rows]
    if not table.rows:
        lines.append(rf"\multicolumn{{{len(table.columns)}}}{{l}}{{(no rows)}} \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if table.notes:
        lines.append(r"\par\smallskip\footnotesize")
        lines += [latex_escape(n.replace("*", "").replace("`", "")) + r"\par" for n in table.notes]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def to_text(table: Table) -> str:
    """A fixed-width plain-text table for the terminal (columns padded; numbers right-aligned)."""
    widths = [max([len(c), *(len(row[i]) for row in table.rows)]) for i, c in enumerate(table.columns)]

    def line(cells) -> str:
        return "  ".join(c.rjust(w) if a == "r" else c.ljust(w)
                         for c, w, a in zip(cells, widths, table.align)).rstrip()

    out = [line(table.columns), line("-" * w for w in widths), *(line(row) for row in table.rows)]
    return "\n".join([*out, *table.notes]) + "\n"
