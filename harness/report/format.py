"""Human formatting of numbers and rendering of tables to Markdown, LaTeX (booktabs) and plain text, as pure
functions; the tables are laid out by tabulate (formats ``pipe``, ``latex_booktabs`` and ``plain``).

Units: FLOPs in scientific notation (``1.1e12``); bytes in decimal SI units (1 kB = 1000 B, 1 MB = 10^6 B);
accuracies as percent with one decimal (``72.4``); parameter counts with K/M/B suffixes (decimal, ``460.8K``).
A missing value is shown as ``n/a``. Only ASCII is produced, so the LaTeX needs no input-encoding package.
"""

from __future__ import annotations

import dataclasses
import math

from tabulate import tabulate

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


_ALIGN = {"l": "left", "r": "right"}


def _tabulate(table: Table, fmt: str, cell=str, empty: str | None = None) -> list[str]:
    """The table's lines by tabulate in ``fmt``: ``cell`` applied to every header and cell, columns aligned by
    ``table.align``, every cell kept as the string it is (no number parsing). tabulate drops the alignment of a
    table without rows (its LaTeX column spec becomes ``{}``), so an empty table is rendered with its header as a
    stand-in row, whose line is then replaced by ``empty`` (or removed)."""
    rows = table.rows or (table.columns,)
    lines = tabulate([[cell(c) for c in row] for row in rows], [cell(c) for c in table.columns], tablefmt=fmt,
                     colalign=[_ALIGN[a] for a in table.align], disable_numparse=True).splitlines()
    if not table.rows:
        at = len(lines) - (3 if fmt.startswith("latex") else 1)  # LaTeX ends \bottomrule, \end{tabular}
        lines[at:at + 1] = [empty] if empty else []
    return lines


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(table: Table, level: int = 2) -> str:
    """A Markdown section: heading, pipe table (right-aligned numbers), and notes as a paragraph."""
    lines = [f"{'#' * level} {table.title}", "", *_tabulate(table, "pipe", _md_cell)]
    if not table.rows:
        lines += ["", "_(no rows)_"]
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
    """A ``table`` float holding one complete booktabs ``tabular`` (toprule/midrule/bottomrule; tabulate's
    ``latex_booktabs``, which escapes the cells), caption, label and notes."""
    lines = [
        r"\begin{table}[htbp]",
        r"\centering",
        r"\small",
        rf"\caption{{{latex_escape(table.title)}}}",
    ]
    if table.label:
        lines.append(rf"\label{{{latex_escape(table.label)}}}")
    lines += _tabulate(table, "latex_booktabs", empty=rf"\multicolumn{{{len(table.columns)}}}{{l}}{{(no rows)}} \\")
    if table.notes:
        lines.append(r"\par\smallskip\footnotesize")
        lines += [latex_escape(n.replace("*", "").replace("`", "")) + r"\par" for n in table.notes]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def to_text(table: Table) -> str:
    """A fixed-width plain-text table for the terminal (columns padded; numbers right-aligned), then the notes."""
    # The header and its rule go in as rows: tabulate would pad a header two characters wider than its column.
    rule = tuple("-" * max(map(len, column)) for column in zip(table.columns, *table.rows))
    text = tabulate([table.columns, rule, *table.rows], tablefmt="plain",
                    colalign=[_ALIGN[a] for a in table.align], disable_numparse=True)
    return "\n".join([text, *table.notes]) + "\n"
