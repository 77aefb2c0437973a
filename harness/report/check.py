"""Baselines: save a store's numbers to JSON, and check a store against a saved baseline (the CI gate).

A cell is keyed by (model, task, method, template, seed, preset, k) -- never by run id. Only finished runs of
real (not random-init) models count. A version-2 baseline (:data:`VERSION`) keeps per cell ``n_eval``, the three
accuracies (``accuracy``, ``accuracy_norm``, ``accuracy_norm_char``), ``infer_flops_per_example``,
``train_flops`` and, per evaluated example, its id, label and per-choice summed log-probs (rounded to
:data:`LOGPROB_DECIMALS` decimals, an error of at most 5e-7, far below the tolerance).

Why log-probs: on one CPU platform float32 scores are reproducible to far below 1e-4, while the accuracy
tolerance below is about 17 points at n = 32 -- a scorer or template change that moves every log-prob but flips
few predictions passes an accuracy check unseen. So a cell FAILS when any of these holds:

- ``missing``: no finished store run has the cell's key; ``ambiguous``: several have it (e.g. another dtype or
  limit); ``n changed``: its ``n_eval`` differs (not the same evaluation);
- ``examples changed``: the store's examples differ in id, label or number of choices, position by position;
- ``logprobs changed``: some example's choice log-prob differs from the baseline by more than ``logprob_atol``
  (default :data:`DEFAULT_LOGPROB_ATOL` = 1e-4, absolute: float32 CPU scores agree far better than that, see
  docs/metrics.md on cached vs naive scoring);
- ``flops changed``: ``infer_flops_per_example`` or ``train_flops`` differs by more than ``flops_rtol``
  (relative, default :data:`DEFAULT_FLOPS_RTOL` = 1e-6; the counts are deterministic arithmetic), or is missing
  on one side only;
- ``regressed`` (``<metric> regressed``): an accuracy is below the baseline by more than
  ``tol = max(z * sqrt(p (1 - p) / n), 1 / n)``, ``p`` and ``n`` being the baseline's value and ``n_eval``.
  The floor of one example keeps the binomial standard error's degenerate case at p = 0 or 1 from tolerating
  nothing. Higher accuracy never fails (``improved``). With ``exact=True`` any difference fails (``changed``).
  Accuracies keep the statistical tolerance, not exactness, because with log-probs within 1e-4 a prediction can
  only flip at a near-tie; the log-prob rule is the sharp one, the accuracy rule a coarse second guard (and the
  only one a version-1 baseline allows). A metric the baseline has but the store lacks fails (``<metric>
  missing``).

Across CPU platforms (:func:`harness.environment.float_platform`: CPU model, torch's CPU kernels, torch, threads)
GEMMs differ in their last bits, and training amplifies them: the quick preset's trained cells moved by up to
9.7e-4 between two CI machines with no code change (session 22). A baseline records the platform it was saved on;
when the checking machine's differs (or the baseline has none), cells with training FLOPs are compared within
``cross_platform_atol`` (default :data:`DEFAULT_CROSS_PLATFORM_ATOL` = 5e-3) instead, and a note says so; untrained
cells (zero-shot, ICL) keep ``logprob_atol`` everywhere. So on the baseline's platform the gate sees a 1e-4 shift of
any cell; elsewhere a 5e-3 shift of a trained one (plus FLOPs and accuracies, unchanged).

Store cells absent from the baseline are listed as ``new`` and do not fail. A version-1 baseline (accuracies
only) is still read, and the check says that it compared accuracies only and how to record a full one.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

from harness.errors import HarnessError
from harness.report.baseline_file import (  # noqa: F401  (re-exported: checking.load_baseline, ...)
    ACCURACY_FIELDS, CELL_FIELDS, CELL_FIELDS_V1, FLOPS_FIELDS, KEY_FIELDS, LOGPROB_DECIMALS, MAKE_BASELINE,
    READABLE_VERSIONS, VERSION, ExamplesOf, _example_entries, _selected, baseline_cells, baseline_json,
    cell_key, cell_name, load_baseline, save_baseline, version_note)
from harness.report.format import Table, fmt_acc

DEFAULT_LOGPROB_ATOL = 1e-4
DEFAULT_FLOPS_RTOL = 1e-6
DEFAULT_CROSS_PLATFORM_ATOL = 5e-3
EPS = 1e-9  # float slack on the accuracy tolerance comparison


def tolerance(p: float, n: int, z: float = 2.0) -> float:
    """``max(z * sqrt(p (1 - p) / n), 1 / n)``: z binomial standard errors, at least one example."""
    if not n or n <= 0:
        return 0.0
    return max(z * math.sqrt(max(p * (1 - p), 0.0) / n), 1 / n)


@dataclasses.dataclass(frozen=True)
class CheckRow:
    cell: str
    baseline: float | None  # accuracy
    store: float | None
    delta: float | None
    tolerance: float | None
    verdict: str  # ok | improved | new | the failed reasons joined by "; " (see the module docstring)
    failed: bool
    logprob_diff: float | None = None  # largest |store - baseline| over examples and choices
    reasons: tuple[str, ...] = ()  # failed reasons, e.g. ("logprobs changed", "regressed")
    details: tuple[str, ...] = ()  # one line per failed reason: where and by how much


@dataclasses.dataclass(frozen=True)
class CheckResult:
    rows: tuple[CheckRow, ...]
    passed: bool
    notes: tuple[str, ...] = ()
    tolerances: Tolerances | None = None  # the rules the rows were judged by (check_table states them)

    def counts(self) -> dict[str, int]:
        """How many cells per verdict; a cell failing for several reasons counts once per reason."""
        out: dict[str, int] = defaultdict(int)
        for r in self.rows:
            for v in r.reasons or (r.verdict,):
                out[v] += 1
        return dict(sorted(out.items()))


@dataclasses.dataclass(frozen=True)
class Tolerances:
    z: float = 2.0
    exact: bool = False
    logprob_atol: float = DEFAULT_LOGPROB_ATOL
    flops_rtol: float = DEFAULT_FLOPS_RTOL
    trained_logprob_atol: float | None = None  # cells with training FLOPs (None: logprob_atol)

    def logprob_atol_for(self, cell: dict) -> float:
        trained = float(cell.get("train_flops") or 0) > 0
        return self.trained_logprob_atol if trained and self.trained_logprob_atol is not None else self.logprob_atol


def _compare_examples(base: list, rows: list[dict], atol: float) -> tuple[float | None, list[tuple[str, str]]]:
    """(largest |Δ log-prob|, [(reason, detail)]) of the store's rows against the baseline's entries."""
    got = _example_entries(rows)
    if len(got) != len(base):
        return None, [("examples changed", f"{len(got)} examples in the store, {len(base)} in the baseline")]
    worst, where, n_off = 0.0, None, 0
    for pos, ((b_id, b_label, b_lps), (s_id, s_label, s_lps)) in enumerate(zip(base, got)):
        if (str(b_id), int(b_label), len(b_lps)) != (s_id, s_label, len(s_lps)):
            return None, [("examples changed", f"position {pos}: baseline example {b_id!r} label {b_label} with "
                                               f"{len(b_lps)} choices, store {s_id!r} label {s_label} with "
                                               f"{len(s_lps)} choices")]
        diffs = [abs(float(s) - float(b)) if math.isfinite(s) else math.inf for b, s in zip(b_lps, s_lps)]
        if max(diffs, default=0.0) > atol:
            n_off += 1
        for c, d in enumerate(diffs):
            if d > worst:
                worst, where = d, (s_id, c)
    if worst > atol:
        return worst, [("logprobs changed", f"max |delta log-prob| {worst:.3g} > {atol:g} at example {where[0]!r} "
                                            f"choice {where[1]}; {n_off} of {len(base)} examples off")]
    return worst, []


def _compare_flops(base: dict, run: dict, rtol: float) -> list[tuple[str, str]]:
    out = []
    for f in FLOPS_FIELDS:
        b, s = base.get(f), run.get(f)
        if b is None and s is None:
            continue
        if b is None or s is None:
            out.append(("flops changed", f"{f}: baseline {b}, store {s}"))
        elif abs(float(s) - float(b)) > rtol * max(abs(float(b)), abs(float(s))):
            rel = abs(float(s) - float(b)) / max(abs(float(b)), abs(float(s)))
            out.append(("flops changed", f"{f}: baseline {float(b):.6g}, store {float(s):.6g} "
                                         f"(relative {rel:.2g} > {rtol:g})"))
    return out


def _compare_accuracies(base: dict, run: dict, tol: Tolerances) -> tuple[list[tuple[str, str]], bool]:
    """([(reason, detail)], improved?) over the accuracies the baseline has."""
    out, improved = [], False
    n = base.get("n_eval") or 0
    for metric in ACCURACY_FIELDS:
        b = base.get(metric)
        if b is None:
            continue
        prefix = "" if metric == "accuracy" else f"{metric} "
        s = run.get(metric)
        if s is None:
            out.append((f"{metric} missing", f"{metric}: baseline {fmt_acc(b)}%, none in the store"))
            continue
        b, s = float(b), float(s)
        t = 0.0 if tol.exact else tolerance(b, n, tol.z)
        if tol.exact:
            if s != b:
                out.append((f"{prefix}changed", f"{metric}: {fmt_acc(b)}% -> {fmt_acc(s)}% (--exact)"))
        elif s < b - t - EPS:
            out.append((f"{prefix}regressed", f"{metric}: {fmt_acc(b)}% -> {fmt_acc(s)}%, more than the tolerance "
                                              f"{100 * t:.1f} points below"))
        elif s > b + t + EPS:
            improved = True
    return out, improved


def _judge(base: dict, run: dict, tol: Tolerances, examples_of: ExamplesOf | None) -> CheckRow:
    name = cell_name(base)
    p, n = float(base["accuracy"]), base.get("n_eval")
    acc = None if run.get("accuracy") is None else float(run["accuracy"])
    delta = None if acc is None else acc - p
    t = 0.0 if tol.exact else tolerance(p, n or 0, tol.z)
    if n is not None and run.get("n_eval") is not None and int(run["n_eval"]) != int(n):
        return CheckRow(f"{name} (n_eval {n} -> {run['n_eval']})", p, acc, delta, t, "n changed", True,
                        reasons=("n changed",), details=(f"n_eval {n} -> {run['n_eval']}",))
    found: list[tuple[str, str]] = []
    worst = None
    if "examples" in base:
        rows = list(examples_of(run["run_id"])) if examples_of is not None else []
        worst, problems = _compare_examples(base["examples"], rows, tol.logprob_atol_for(base))
        found += problems
        found += _compare_flops(base, run, tol.flops_rtol)
    accuracy_problems, improved = _compare_accuracies(base, run, tol)
    found += accuracy_problems
    reasons = tuple(dict.fromkeys(r for r, _ in found))
    verdict = "; ".join(reasons) if reasons else ("improved" if improved else "ok")
    return CheckRow(name, p, acc, delta, t, verdict, bool(reasons), worst, reasons, tuple(d for _, d in found))


def tolerances(baseline: dict, z: float = 2.0, exact: bool = False, logprob_atol: float = DEFAULT_LOGPROB_ATOL,
               flops_rtol: float = DEFAULT_FLOPS_RTOL, platform: dict | None = None,
               cross_platform_atol: float = DEFAULT_CROSS_PLATFORM_ATOL) -> tuple[Tolerances, str | None]:
    """The tolerances for checking against ``baseline`` on ``platform`` (None: not compared, every cell within
    ``logprob_atol``), and the note saying why trained cells get a wider one, if they do."""
    if not cross_platform_atol >= 0:
        raise HarnessError(f"--cross-platform-atol must be non-negative, got {cross_platform_atol}")
    recorded = baseline.get("platform")
    if platform is None or recorded == platform or cross_platform_atol <= logprob_atol:
        return Tolerances(z, exact, logprob_atol, flops_rtol), None
    where = (f"the baseline was saved on {_platform_text(recorded)}, this is {_platform_text(platform)}"
             if recorded else f"the baseline records no platform (this is {_platform_text(platform)})")
    note = (f"{where}: trained cells' log-probs compared within {cross_platform_atol:g} (GEMM bits differ across "
            f"CPUs and training amplifies them), untrained cells within {logprob_atol:g}; re-save the baseline on "
            "this platform for the strict check")
    return Tolerances(z, exact, logprob_atol, flops_rtol, cross_platform_atol), note


def _platform_text(p: dict) -> str:
    return ", ".join(f"{k} {p[k]}" for k in sorted(p))


def check(runs: list[dict], baseline: dict, z: float = 2.0, exact: bool = False,
          examples_of: ExamplesOf | None = None, logprob_atol: float = DEFAULT_LOGPROB_ATOL,
          flops_rtol: float = DEFAULT_FLOPS_RTOL, platform: dict | None = None,
          cross_platform_atol: float = DEFAULT_CROSS_PLATFORM_ATOL) -> CheckResult:
    """Compare every baseline cell with the store's runs; see the module docstring for the rules.

    ``examples_of(run_id)`` gives a run's example rows; a version-2 baseline needs it (without it every cell
    fails as ``examples changed``). ``platform``: the checking machine's (:func:`tolerances`); None compares every
    cell within ``logprob_atol``."""
    if z < 0:
        raise HarnessError(f"--z must be non-negative, got {z}")
    if not logprob_atol >= 0:
        raise HarnessError(f"--logprob-atol must be non-negative, got {logprob_atol}")
    if not flops_rtol >= 0:
        raise HarnessError(f"--flops-rtol must be non-negative, got {flops_rtol}")
    tol, platform_note = tolerances(baseline, z, exact, logprob_atol, flops_rtol, platform, cross_platform_atol)
    store: dict[tuple, list[dict]] = defaultdict(list)
    for r in _selected(runs):
        store[cell_key(r)].append(r)
    rows = []
    base_keys = set()
    for base in sorted(baseline["cells"], key=cell_key):
        key = cell_key(base)
        base_keys.add(key)
        found = [r for r in store.get(key, []) if r.get("accuracy") is not None]
        p = float(base["accuracy"])
        if not found:
            rows.append(CheckRow(cell_name(base), p, None, None, None, "missing", True, reasons=("missing",),
                                 details=("no finished run of this cell in the store",)))
        elif len(found) > 1:
            rows.append(CheckRow(f"{cell_name(base)} ({len(found)} runs)", p, None, None, None, "ambiguous", True,
                                 reasons=("ambiguous",),
                                 details=(f"runs {', '.join(r['run_id'] for r in found)} share the key",)))
        else:
            rows.append(_judge(base, found[0], tol, examples_of))
    for key in sorted(set(store) - base_keys):
        for r in store[key]:
            if r.get("accuracy") is not None:
                rows.append(CheckRow(cell_name(r), None, float(r["accuracy"]), None, None, "new", False))
    notes = tuple(n for n in (version_note(baseline), platform_note) if n)
    return CheckResult(tuple(rows), not any(r.failed for r in rows), notes, tol)


def check_table(result: CheckResult, tol: Tolerances | None = None) -> Table:
    """The check's rows as a table: accuracy in percent, delta and tolerance in points, worst log-prob delta;
    the notes say the rules, per failed cell what failed, and last the verdict with its counts."""
    tol = tol or result.tolerances or Tolerances()

    def points(x: float | None, signed: bool) -> str:
        return "n/a" if x is None else (f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}")

    rows = tuple((r.cell, fmt_acc(r.baseline), fmt_acc(r.store), points(r.delta, True), points(r.tolerance, False),
                  "n/a" if r.logprob_diff is None else f"{r.logprob_diff:.1e}",
                  r.verdict.upper() if r.failed else r.verdict) for r in result.rows)
    summary = ", ".join(f"{n} {v}" for v, n in result.counts().items()) or "no cells"
    accuracy_rule = ("any difference fails (--exact)" if tol.exact else
                     f"fail below baseline - max({tol.z:g} SE, 1/n)")
    trained = ("" if tol.trained_logprob_atol is None else
               f" ({tol.trained_logprob_atol:g} for trained cells: another platform)")
    rules = (f"Rules: per example and choice |log-prob - baseline| <= {tol.logprob_atol:g}{trained}; inference and "
             f"training "
             f"FLOPs within relative {tol.flops_rtol:g}; accuracy, accuracy_norm and accuracy_norm_char: "
             f"{accuracy_rule}. Accuracy columns: accuracy (argmax of summed log-prob), percent.")
    failures = tuple(f"{r.cell}: {d}" for r in result.rows if r.failed for d in r.details)
    columns = ("Cell", "Baseline acc. %", "Store acc. %", "Delta pts", "Tolerance pts", "Max |d logprob|", "Verdict")
    return Table("Baseline check", columns, rows, "lrrrrrl",
                 (rules, *result.notes, *failures, f"{'PASS' if result.passed else 'FAIL'}: {summary}."))
