"""Figure primitives of the report (matplotlib Agg canvas, no pyplot, no global state): a titled figure, saving
it as PNG and PDF without timestamps or version strings (two reports of one store give the same files), the marker
cycle and :class:`PlotResult`. Shared by :mod:`.plots` and :mod:`.variants`, below both."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # matplotlib is imported when a figure is made, not by the report's tables
    from matplotlib.figure import Figure

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p")
METADATA = {"png": {"Software": None}, "pdf": {"CreationDate": None, "ModDate": None}}


@dataclasses.dataclass(frozen=True)
class PlotResult:
    """One figure: the files written, or (``paths`` empty) why it was skipped; ``notes`` list partial skips."""

    name: str
    title: str
    paths: tuple[Path, ...] = ()
    notes: tuple[str, ...] = ()


def save_figure(fig: Figure, out_dir: Path, name: str) -> tuple[Path, ...]:
    """Write ``fig`` as ``<name>.png`` and ``<name>.pdf`` under ``out_dir`` (no timestamps); the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        path = out_dir / f"{name}.{ext}"
        fig.savefig(path, format=ext, dpi=150, metadata=METADATA[ext])
        paths.append(path)
    return tuple(paths)


def new_figure(title: str, ncols: int = 1) -> tuple[Figure, list]:
    """A titled figure on an Agg canvas with ``ncols`` axes side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5 * ncols if ncols > 1 else 7.5, 5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    fig.suptitle(title)
    return fig, axes
