"""Break-even between a trained (PEFT) method and k-shot ICL, as pure functions, and its report table.

Total cost of answering ``n`` queries: ``train FLOPs + n x inference FLOPs per example``. ICL trains nothing
(a missing training figure counts as zero). Per (model, method) the figures are medians over runs; a PEFT
method's training FLOPs are those of one adapter. Only k-shot ICL methods (``icl...``) are the comparison side;
zero-shot is not a competitor worth a break-even (it is cheaper at every n by construction).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import NamedTuple

import numpy as np

from harness.report import stats
from harness.report.format import Table, fmt_flops
from harness.report.tables import groups, is_icl, is_in_context


class BreakEven(NamedTuple):
    """Where two total-cost lines ``train + n * infer`` meet.

    ``n``: the number of queries at which the costs are equal (``None`` when they never cross for n > 0);
    ``cheaper``: which side is cheaper beyond ``n`` (or at every n without a crossover): ``peft``, ``icl`` or
    ``equal``; ``text``: a sentence for legends and tables.
    """

    n: float | None
    cheaper: str
    text: str


def total_cost(train_flops: float, infer_flops: float, n_queries) -> np.ndarray | float:
    """Training FLOPs plus ``n_queries`` times the inference FLOPs per example."""
    return train_flops + np.asarray(n_queries, dtype=float) * infer_flops


def fmt_count(n: float) -> str:
    """``1,111`` below 10,000, else ``1.2e5``."""
    return f"{n:,.0f}" if n < 10_000 else fmt_flops(n)


def break_even(peft_train: float, peft_infer: float, icl_train: float, icl_infer: float,
               peft_name: str = "PEFT", icl_name: str = "ICL") -> BreakEven:
    """Solve ``peft_train + n peft_infer = icl_train + n icl_infer`` for ``n > 0``."""
    d_train, d_infer = peft_train - icl_train, peft_infer - icl_infer
    if d_infer < 0 and d_train > 0:
        n = d_train / -d_infer
        return BreakEven(n, "peft", f"break-even at n = {fmt_count(n)} queries, {peft_name} cheaper beyond")
    if d_infer > 0 and d_train < 0:
        n = -d_train / d_infer
        return BreakEven(n, "icl", f"break-even at n = {fmt_count(n)} queries, {icl_name} cheaper beyond")
    if d_infer == 0 and d_train == 0:
        return BreakEven(None, "equal", "no crossover: equal cost at every n")
    if d_infer <= 0 and d_train <= 0:
        return BreakEven(None, "peft", f"no crossover: {peft_name} cheaper at every n")
    return BreakEven(None, "icl", f"no crossover: {icl_name} cheaper at every n")


def cost_groups(runs) -> tuple[dict[str, dict[str, list]], list[str]]:
    """Per model: ``icl`` and ``peft`` lists of (group, train FLOPs, inference FLOPs); notes on groups left out."""
    per_model: dict[str, dict[str, list]] = defaultdict(lambda: {"icl": [], "peft": []})
    notes = []
    for _, g, rs in groups(runs):
        if is_in_context(g.method) and not is_icl(g.method):
            continue  # zero-shot
        infer, train = rs[["infer_flops_per_example", "train_flops"]].agg(stats.median)
        if is_icl(g.method) and math.isnan(train):
            train = 0.0  # ICL trains nothing; a missing figure means zero
        if math.isnan(infer) or math.isnan(train):
            notes.append(f"{g.model}: {g.label} left out (no {'inference' if math.isnan(infer) else 'training'} "
                         "FLOPs)")
            continue
        per_model[g.model]["icl" if is_icl(g.method) else "peft"].append((g, train, infer))
    return dict(per_model), notes


def break_even_table(runs: list[dict]) -> Table:
    """Per model, PEFT method and ICL method: their costs and the break-even number of queries (``runs``: a runs
    frame or run dicts)."""
    per_model, notes = cost_groups(runs)
    rows = []
    for model in sorted(per_model):
        sides = per_model[model]
        for pg, ptrain, pinfer in sides["peft"]:
            for ig, itrain, iinfer in sides["icl"]:
                be = break_even(ptrain, pinfer, itrain, iinfer, pg.label, ig.label)
                rows.append((model, pg.label, ig.label, fmt_flops(ptrain), fmt_flops(pinfer), fmt_flops(iinfer),
                             "none" if be.n is None else fmt_count(be.n), be.text))
    return Table("Break-even: PEFT against ICL",
                 ("Model", "PEFT", "ICL", "PEFT training FLOPs", "PEFT FLOPs/example", "ICL FLOPs/example",
                  "Break-even n", "Verdict"),
                 tuple(rows), "llllrrrl",
                 ("Total cost of n queries: training FLOPs + n x inference FLOPs per example (medians over runs; ICL "
                  "trains nothing). Break-even n: the number of queries at which both cost the same.",
                  *[f"Left out: {n}." for n in notes]), "tab:breakeven")
