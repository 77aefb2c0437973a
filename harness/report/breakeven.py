"""Break-even between a trained (PEFT) method and k-shot ICL, as pure functions, and its report table.

Total cost of answering ``n`` queries: ``train FLOPs + n x inference FLOPs per example``. ICL trains nothing
(a missing training figure counts as zero). Per (model, method) the figures are medians over runs of the tasks
both sides ran (a PEFT method run on copa alone meets ICL's copa runs); a PEFT method's training FLOPs are those of
one adapter. Only k-shot ICL methods (``icl...``) are the comparison side;
zero-shot is not a competitor worth a break-even (it is cheaper at every n by construction).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import NamedTuple

import numpy as np

import pandas as pd

from harness.report import stats
from harness.report.format import Table, fmt_flops
from harness.report.tables import Group, groups, is_icl, is_in_context


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


class CostSide(NamedTuple):
    """One (model, method variant) side of a break-even: its group, runs and median costs over those runs."""

    group: Group
    runs: pd.DataFrame  # the group's runs
    train: float  # median training FLOPs (of one adapter; 0 for ICL)
    infer: float  # median inference FLOPs per evaluated example

    @property
    def tasks(self) -> frozenset:
        return frozenset(self.runs["task"].dropna())


def _median_costs(rs, icl: bool) -> tuple[float, float]:
    """(train FLOPs, inference FLOPs per example), medians over ``rs``; ICL's missing training figure is zero."""
    infer, train = rs[["infer_flops_per_example", "train_flops"]].agg(stats.median)
    if icl and math.isnan(train):
        train = 0.0  # ICL trains nothing; a missing figure means zero
    return float(train), float(infer)


def cost_groups(runs) -> tuple[dict[str, dict[str, list[CostSide]]], list[str]]:
    """Per model: ``icl`` and ``peft`` lists of :class:`CostSide`; notes on groups left out."""
    per_model: dict[str, dict[str, list]] = defaultdict(lambda: {"icl": [], "peft": []})
    notes = []
    for _, g, rs in groups(runs):
        if is_in_context(g.method) and not is_icl(g.method):
            continue  # zero-shot
        train, infer = _median_costs(rs, is_icl(g.method))
        if math.isnan(infer) or math.isnan(train):
            notes.append(f"{g.model}: {g.label} left out (no {'inference' if math.isnan(infer) else 'training'} "
                         "FLOPs)")
            continue
        per_model[g.model]["icl" if is_icl(g.method) else "peft"].append(CostSide(g, rs, train, infer))
    return dict(per_model), notes


class Pair(NamedTuple):
    """A PEFT side and an ICL side costed over the same tasks (``tasks``: those both ran, sorted)."""

    peft: CostSide
    icl: CostSide
    tasks: tuple[str, ...]
    peft_train: float
    peft_infer: float
    icl_train: float
    icl_infer: float
    break_even: BreakEven

    @property
    def same_tasks(self) -> bool:
        """Both sides ran exactly ``tasks``, so their group medians (the figure's lines) are what was compared."""
        return self.peft.tasks == self.icl.tasks


def pair_costs(peft: CostSide, icl: CostSide) -> Pair | None:
    """Compare like with like: inference FLOPs per example differ several-fold between tasks (rte's rows are long,
    copa's short), so a method run on copa alone is costed against ICL's runs on copa alone, not its median over
    five tasks. Both sides' medians are taken over the tasks both ran; ``None`` when they share none."""
    shared = peft.tasks & icl.tasks
    if not shared:
        return None
    if peft.tasks == icl.tasks:
        costs = (peft.train, peft.infer, icl.train, icl.infer)
    else:
        costs = (*_median_costs(peft.runs[peft.runs["task"].isin(shared)], False),
                 *_median_costs(icl.runs[icl.runs["task"].isin(shared)], True))
    be = break_even(*costs, peft.group.label, icl.group.label)
    return Pair(peft, icl, tuple(sorted(shared)), *costs, be)


def pairs_of(sides: dict[str, list[CostSide]]) -> tuple[list[Pair], list[str]]:
    """Every PEFT x ICL pair of one model with a task in common; notes on those without."""
    pairs, notes = [], []
    for p in sides["peft"]:
        for i in sides["icl"]:
            pair = pair_costs(p, i)
            if pair is None:
                notes.append(f"{p.group.model}: {p.group.label} and {i.group.label} share no task")
            else:
                pairs.append(pair)
    return pairs, notes


def break_even_table(runs: list[dict]) -> Table:
    """Per model, PEFT method and ICL method: their costs over the tasks both ran and the break-even number of
    queries (``runs``: a runs frame or run dicts)."""
    per_model, notes = cost_groups(runs)
    rows = []
    for model in sorted(per_model):
        pairs, pair_notes = pairs_of(per_model[model])
        notes += pair_notes
        for pr in pairs:
            be = pr.break_even
            rows.append((model, pr.peft.group.label, pr.icl.group.label, ", ".join(pr.tasks),
                         fmt_flops(pr.peft_train), fmt_flops(pr.peft_infer), fmt_flops(pr.icl_infer),
                         "none" if be.n is None else fmt_count(be.n), be.text))
    return Table("Break-even: PEFT against ICL",
                 ("Model", "PEFT", "ICL", "Tasks", "PEFT training FLOPs", "PEFT FLOPs/example", "ICL FLOPs/example",
                  "Break-even n", "Verdict"),
                 tuple(rows), "lllllrrrl",
                 ("Total cost of n queries: training FLOPs + n x inference FLOPs per example (medians over runs; ICL "
                  "trains nothing). Break-even n: the number of queries at which both cost the same.",
                  "Both sides are costed over the same tasks (Tasks: those both ran): a method run on fewer tasks "
                  "than ICL is compared with ICL's runs on its tasks, since inference FLOPs per example differ "
                  "several-fold between tasks.",
                  *[f"Left out: {n}." for n in notes]), "tab:breakeven")
