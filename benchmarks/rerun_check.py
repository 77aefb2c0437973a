"""Check that a code tree reproduces stored runs: compare a rerun's store with the grid's, run by run (issue 11).

A new code tree may compute other numbers under the same run ids (round 20: a scoring path equal in float32 moved
bfloat16 log-probs; the run id covers configuration, weights, data and scoring version, not every kernel). So a
device round that switches trees first reruns one finished cell into a fresh store (``--store
/tmp/rerun/rerun.sqlite``, copied back as ``rerun.sqlite.gz``) and keeps the round's runs only if this check passes:

    python -m benchmarks.rerun_check STORE RERUN      (each .sqlite, .sqlite.gz or .sqlite.xz)

For every run of RERUN it looks up the same run id in STORE and compares, example by example, every choice's
log-prob as float32 (stores keep float32 values, some as 17-digit doubles, some compacted to their shortest
decimal: :mod:`benchmarks.compact_store`), and the predictions. It prints one line a run (max |d log-prob|, rows
equal, predictions moved, both accuracies) and exits 0 when every row of every run is equal, 1 when any differs
(withdraw that tree's runs: ``python -m benchmarks.withdraw_runs STORE --commit SHA``), 2 on bad input (a missing
store, no run of RERUN in STORE, a run whose examples differ in number).

Not ``harness check``: that gate compares cells with an absolute log-prob tolerance (1e-4 by default, across CPU
platforms), and the stores here keep the same float32 value in two decimal forms (17 digits, or the shortest after
:mod:`benchmarks.compact_store`: up to 4.8e-7 apart), so no tolerance both passes equal values and fails a one-ulp
change; the identity of a tree is equality, compared as float32 and matched by run id.
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import shutil
import sqlite3
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.store_arg import require_store


@dataclass(frozen=True)
class RunComparison:
    """One run id in both stores: how far its per-example log-probs and predictions moved."""

    run_id: str
    task: str
    method: str
    template: str
    seed: int | None
    rows: int
    rows_equal: int  # rows whose every choice log-prob is the same float32
    max_abs_diff: float  # over all rows and choices, in float32
    predictions_moved: int
    accuracy_store: float | None
    accuracy_rerun: float | None

    @property
    def equal(self) -> bool:
        return self.rows_equal == self.rows and self.predictions_moved == 0


def compare_rows(store_rows: list[tuple[str, int]], rerun_rows: list[tuple[str, int]]) -> tuple[int, float, int]:
    """(rows equal in float32, max |d log-prob|, predictions moved) of two runs' (logprobs_json, prediction) rows
    in position order. Pure: the same rows give (len, 0.0, 0)."""
    equal, worst, moved = 0, 0.0, 0
    for (a_json, a_pred), (b_json, b_pred) in zip(store_rows, rerun_rows, strict=True):
        a = np.asarray(json.loads(a_json), dtype=np.float32)  # [n_choices]
        b = np.asarray(json.loads(b_json), dtype=np.float32)
        if a.shape != b.shape:
            raise ValueError(f"{a.size} choices against {b.size}")
        diff = float(np.max(np.abs(a - b))) if a.size else 0.0
        equal += diff == 0.0
        worst = max(worst, diff)
        moved += a_pred != b_pred
    return equal, worst, moved


def _open(path: Path, tmp: Path) -> Path:
    """A plain SQLite file for PATH (a .gz or .xz is decompressed into TMP)."""
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix)
    if opener is None:
        return path
    plain = tmp / (path.stem + f".{len(list(tmp.iterdir()))}")
    with opener(path) as src, open(plain, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return plain


def compare_stores(store: Path, rerun: Path) -> list[RunComparison]:
    """Every run of RERUN that STORE holds too, compared (see the module docstring); raises ValueError when none
    is shared or a run's examples differ in number or choices."""
    db = sqlite3.connect(store)
    db.execute("ATTACH DATABASE ? AS r", (str(rerun),))
    runs = db.execute("SELECT q.run_id, q.task, q.method, q.template, q.seed, p.accuracy, q.accuracy "
                      "FROM r.runs q JOIN main.runs p USING (run_id) ORDER BY q.task, q.method, q.seed, "
                      "q.template").fetchall()
    if not runs:
        raise ValueError(f"no run of {rerun} is in {store}: rerun a cell the store holds (same model, task, "
                         "method, seed and settings: the run ids must match)")
    out = []
    for run_id, task, method, template, seed, acc_store, acc_rerun in runs:
        rows = [db.execute(f"SELECT logprobs_json, prediction FROM {schema}.examples WHERE run_id=? "
                           "ORDER BY position", (run_id,)).fetchall() for schema in ("main", "r")]
        if len(rows[0]) != len(rows[1]):
            raise ValueError(f"run {run_id} has {len(rows[0])} examples in {store} and {len(rows[1])} in {rerun}: "
                             "not the same evaluation (a --limit?); rerun without it")
        equal, worst, moved = compare_rows(*rows)
        out.append(RunComparison(run_id, task, method, template, seed, len(rows[0]), equal, worst, moved,
                                 acc_store, acc_rerun))
    unmatched = db.execute("SELECT COUNT(*) FROM r.runs WHERE run_id NOT IN (SELECT run_id FROM main.runs)").fetchone()[0]
    db.close()
    if unmatched:
        print(f"note: {unmatched} run(s) of {rerun} are not in {store}: not compared (other ids: other settings, "
              "data or scoring version)", file=sys.stderr)
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", type=Path, help="the grid's store (the runs published so far)")
    parser.add_argument("rerun", type=Path, help="the rerun's fresh store (the same runs from the new tree)")
    args = parser.parse_args(argv)
    for path in (args.store, args.rerun):
        require_store(str(path))  # exit 2 with a one-line error
    with tempfile.TemporaryDirectory() as tmp:
        try:
            results = compare_stores(_open(args.store, Path(tmp)), _open(args.rerun, Path(tmp)))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    for c in results:
        print(f"{c.task} {c.method} seed {c.seed} {c.template} {c.run_id[:12]}: max |d log-prob| "
              f"{c.max_abs_diff:.3g}, rows equal {c.rows_equal}/{c.rows}, predictions moved {c.predictions_moved}, "
              f"accuracy {_pct(c.accuracy_store)} -> {_pct(c.accuracy_rerun)}")
    differing = [c for c in results if not c.equal]
    rows = sum(c.rows for c in results)
    if differing:
        print(f"FAIL: {len(differing)} of {len(results)} runs differ ({rows} rows compared): the rerun's tree does "
              "not reproduce the store under the same run ids; withdraw its runs "
              "(python -m benchmarks.withdraw_runs STORE --commit SHA) and find the change")
        return 1
    print(f"PASS: {len(results)} runs, {rows} rows, every log-prob the same float32 and every prediction the same")
    return 0


if __name__ == "__main__":
    sys.exit(main())
