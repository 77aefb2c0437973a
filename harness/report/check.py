"""Accuracy baselines: save the store's accuracies to JSON, and check a store against a saved baseline.

A cell is keyed by (model, task, method, template, seed, preset); its ``k`` is stored and must match too
(an ICL method run at several k has one cell per k). Only finished runs of real (not random-init) models count.

Tolerance rule: a cell regresses when ``store < baseline - tol`` with
``tol = max(z * sqrt(p (1 - p) / n), 1 / n)``, ``p`` and ``n`` being the baseline's accuracy and ``n_eval``.
The floor of one example (``1 / n``) keeps the binomial standard error's degenerate case at p = 0 or 1 from
tolerating nothing: a single flipped example out of n is always within tolerance. Higher accuracy never fails
(it is reported as ``improved`` beyond the tolerance). With ``exact=True`` any difference fails.
A baseline cell without a store run fails as ``missing``; a cell whose ``n_eval`` changed fails as
``n changed`` (it is not the same evaluation); a key that matches several store runs (e.g. different dtype or
limit) fails as ``ambiguous``. Store cells absent from the baseline are listed as ``new`` and do not fail.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from pathlib import Path

from harness.errors import HarnessError
from harness.report.format import Table, fmt_acc
from harness.report.tables import run_sort_key, select_runs

VERSION = 1
KEY_FIELDS = ("model", "task", "method", "template", "seed", "preset")
CELL_FIELDS = (*KEY_FIELDS, "k", "n_eval", "accuracy")
EPS = 1e-9  # float slack on the tolerance comparison


def cell_key(cell: dict) -> tuple:
    """The identity of a cell: the key fields plus ``k``, as strings (JSON round-trips ints as ints anyway)."""
    return tuple("" if cell.get(f) is None else str(cell.get(f)) for f in (*KEY_FIELDS, "k"))


def cell_name(cell: dict) -> str:
    name = "/".join("" if cell.get(f) is None else str(cell.get(f)) for f in KEY_FIELDS)
    return f"{name} k={cell.get('k')}"


def baseline_cells(runs: list[dict]) -> list[dict]:
    """One cell per finished, non-random run with an accuracy, sorted by key."""
    cells = [{f: r.get(f) for f in CELL_FIELDS} for r in select_runs(runs) if r.get("accuracy") is not None]
    return sorted(cells, key=lambda c: (cell_key(c), run_sort_key(c)))


def baseline_json(runs: list[dict]) -> str:
    return json.dumps({"version": VERSION, "cells": baseline_cells(runs)}, indent=2, sort_keys=True) + "\n"


def save_baseline(runs: list[dict], path: str | Path) -> int:
    """Write the baseline of ``runs`` to ``path`` (JSON, deterministic); return the number of cells."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = baseline_json(runs)
    path.write_text(text)
    return len(json.loads(text)["cells"])


def load_baseline(path: str | Path) -> dict:
    """Read and validate a baseline file; a malformed one raises :class:`HarnessError`."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"no baseline file at {path}; write one with `baseline save {path}`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise HarnessError(f"baseline {path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("cells"), list):
        raise HarnessError(f"baseline {path} is not a version-{VERSION} baseline ({{'version': 1, 'cells': [...]}})")
    for cell in data["cells"]:
        missing = [f for f in CELL_FIELDS if not isinstance(cell, dict) or f not in cell]
        if missing:
            raise HarnessError(f"baseline {path}: a cell lacks {', '.join(missing)}: {cell!r}")
    return data


def tolerance(p: float, n: int, z: float = 2.0) -> float:
    """``max(z * sqrt(p (1 - p) / n), 1 / n)``: z binomial standard errors, at least one example."""
    if not n or n <= 0:
        return 0.0
    return max(z * math.sqrt(max(p * (1 - p), 0.0) / n), 1 / n)


@dataclasses.dataclass(frozen=True)
class CheckRow:
    cell: str
    baseline: float | None
    store: float | None
    delta: float | None
    tolerance: float | None
    verdict: str  # ok | improved | regressed | changed | missing | n changed | ambiguous | new
    failed: bool


@dataclasses.dataclass(frozen=True)
class CheckResult:
    rows: tuple[CheckRow, ...]
    passed: bool

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for r in self.rows:
            out[r.verdict] += 1
        return dict(sorted(out.items()))


def _judge(base: dict, run: dict, z: float, exact: bool) -> CheckRow:
    p, n = float(base["accuracy"]), base.get("n_eval")
    acc = float(run["accuracy"])
    delta = acc - p
    tol = 0.0 if exact else tolerance(p, n or 0, z)
    name = cell_name(base)
    if n is not None and run.get("n_eval") is not None and int(run["n_eval"]) != int(n):
        return CheckRow(f"{name} (n_eval {n} -> {run['n_eval']})", p, acc, delta, tol, "n changed", True)
    if exact:
        verdict = "ok" if acc == p else "changed"
    elif acc < p - tol - EPS:
        verdict = "regressed"
    else:
        verdict = "improved" if acc > p + tol + EPS else "ok"
    return CheckRow(name, p, acc, delta, tol, verdict, verdict in ("changed", "regressed"))


def check(runs: list[dict], baseline: dict, z: float = 2.0, exact: bool = False) -> CheckResult:
    """Compare every baseline cell with the store's runs; see the module docstring for the rules."""
    if z < 0:
        raise HarnessError(f"--z must be non-negative, got {z}")
    store: dict[tuple, list[dict]] = defaultdict(list)
    for r in select_runs(runs):
        store[cell_key(r)].append(r)
    rows = []
    base_keys = set()
    for base in sorted(baseline["cells"], key=cell_key):
        key = cell_key(base)
        base_keys.add(key)
        found = [r for r in store.get(key, []) if r.get("accuracy") is not None]
        p = float(base["accuracy"])
        if not found:
            rows.append(CheckRow(cell_name(base), p, None, None, None, "missing", True))
        elif len(found) > 1:
            rows.append(CheckRow(f"{cell_name(base)} ({len(found)} runs)", p, None, None, None, "ambiguous", True))
        else:
            rows.append(_judge(base, found[0], z, exact))
    for key in sorted(set(store) - base_keys):
        for r in store[key]:
            if r.get("accuracy") is not None:
                rows.append(CheckRow(cell_name(r), None, float(r["accuracy"]), None, None, "new", False))
    return CheckResult(tuple(rows), not any(r.failed for r in rows))


def check_table(result: CheckResult) -> Table:
    """The check's rows as a table: accuracies, delta and tolerance in percentage points."""

    def points(x: float | None, signed: bool) -> str:
        return "n/a" if x is None else (f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}")

    rows = tuple((r.cell, fmt_acc(r.baseline), fmt_acc(r.store), points(r.delta, True), points(r.tolerance, False),
                  r.verdict.upper() if r.failed else r.verdict) for r in result.rows)
    summary = ", ".join(f"{n} {v}" for v, n in result.counts().items()) or "no cells"
    columns = ("Cell", "Baseline %", "Store %", "Delta pts", "Tolerance pts", "Verdict")
    return Table("Baseline check", columns, rows, "lrrrrl",
                 (f"{'PASS' if result.passed else 'FAIL'}: {summary}.",))
