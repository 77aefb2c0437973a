"""Rewrite a results store's log-probs and loss curves in short, lossless form (:mod:`harness.float_json`).

Stores written before ``harness.float_json`` keep float32 values as 17-digit doubles; this rewrites every
``examples.logprobs_json`` and ``runs.extra_json`` with :func:`harness.float_json.compact` (each float32 value the
same float32 again; any other number untouched), checks that, and vacuums. Run ids, metrics, predictions and
every other column are left alone.

    python -m benchmarks.compact_store results/paper/paper.sqlite
"""

from __future__ import annotations

import json
import sqlite3
import sys

import numpy as np

from benchmarks.store_arg import store_path
from harness.float_json import compact


def _floats(obj) -> list[float]:
    if isinstance(obj, float):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [f for v in obj for f in _floats(v)]
    if isinstance(obj, dict):
        return [f for v in obj.values() for f in _floats(v)]
    return []


def _same(before, after) -> bool:
    """Every number of ``after`` equals ``before``'s, or reads back as float32 to exactly ``before``'s (NaN: NaN)."""
    a, b = _floats(before), _floats(after)
    return len(a) == len(b) and all(x == y or x != x or float(np.float32(y)) == x for x, y in zip(a, b))


def main(path: str) -> None:
    db = sqlite3.connect(path)
    changed = 0
    with db:
        for run_id, text in db.execute("SELECT run_id, extra_json FROM runs WHERE extra_json IS NOT NULL").fetchall():
            before = json.loads(text)
            after = compact(before)
            if not _same(before, after):
                raise SystemExit(f"run {run_id}: compacting extra_json would change a value")
            db.execute("UPDATE runs SET extra_json = ? WHERE run_id = ?", (json.dumps(after, sort_keys=True), run_id))
            changed += 1
        for run_id, position, text in db.execute("SELECT run_id, position, logprobs_json FROM examples").fetchall():
            before = json.loads(text)
            after = compact(before)
            if not _same(before, after):
                raise SystemExit(f"run {run_id} example {position}: compacting would change a value")
            db.execute("UPDATE examples SET logprobs_json = ? WHERE run_id = ? AND position = ?",
                       (json.dumps(after), run_id, position))
    db.execute("VACUUM")
    db.close()
    print(f"{path}: {changed} runs' extra_json and every example's logprobs_json rewritten")


if __name__ == "__main__":
    main(store_path(sys.argv, __doc__))
