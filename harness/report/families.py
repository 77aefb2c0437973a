"""The report's table of methods by family (Lialin et al. 2023's taxonomy, as the method registry records it).

Each stored method name is looked up in :mod:`harness.methods` for its family and whether it merges into the base
weights; a name the registry does not know (a method since removed, one of another branch) is ``other``.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from harness.report import stats
from harness.report.format import Table, fmt_acc, fmt_params
from harness.report.tables import check_metric, groups, metric_notes, task_coverage_notes
from harness.results import frame


def method_family(method: str | None) -> str:
    """The family of a stored method name from the registry (:data:`harness.methods.FAMILIES`); a name the
    registry does not know (a method since removed, a method of another branch) is ``other``."""
    from harness.methods import get_method

    try:
        return get_method(str(method)).family
    except Exception:  # noqa: BLE001 - unknown names, peft types this peft lacks
        return "other"


def method_merges(method: str | None) -> bool | None:
    from harness.methods import get_method

    try:
        return get_method(str(method)).merges
    except Exception:  # noqa: BLE001
        return None


def family_table(runs: Iterable[dict] | pd.DataFrame, metric: str = "accuracy") -> Table:
    """(d) Per family (Lialin et al. 2023's taxonomy, from the method registry) x (model, method): median
    accuracy, trainable parameters, whether the method merges into the base weights."""
    from harness.methods import FAMILIES

    check_metric(metric)
    runs, rows = frame(runs), []
    for _, g, rs in groups(runs):
        family = method_family(g.method)
        m = rs[["trainable_params", metric]].agg(stats.median)
        merges = method_merges(g.method)
        rows.append((FAMILIES.index(family) if family in FAMILIES else len(FAMILIES), family, g.model, g.label,
                     fmt_acc(m[metric]), fmt_params(m["trainable_params"]),
                     fmt_acc(None) if merges is None else ("yes" if merges else "no"), str(len(rs))))
    rows.sort(key=lambda r: r[:3])  # stable: run order within a family and model
    notes = (
        *metric_notes(runs, metric),
        f"Families: Lialin et al. 2023 (arXiv 2303.15647), section 3, as `harness methods` lists them; a stored "
        "method the registry does not know is `other`. Merges: the trained change folds into the base weights "
        f"(no inference overhead). {metric} in percent, median over runs; trainable parameters, median over runs.",
        *task_coverage_notes(runs),
    )
    return Table(f"Methods by family (metric: {metric})",
                 ("Family", "Model", "Method", f"{metric} median", "Trainable params", "Merges", "Runs"),
                 tuple(r[1:] for r in rows), "lllrrlr", notes, "tab:families")
