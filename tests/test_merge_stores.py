"""benchmarks/merge_stores.py: copies a source's finished runs that the target has not finished (missing, failed or
withdrawn there), with their per-example rows; never replaces a finished run, never copies an unfinished one."""

from __future__ import annotations

import sqlite3

from harness.store import ExampleScore, RunResult, Store


def _write(store: Store, run_id: str, accuracy: float, status: str = "finished", n_examples: int = 2) -> None:
    examples = [ExampleScore(f"{run_id}-{i}", 0, [-1.0, -2.0], [1, 1], [3, 3]) for i in range(n_examples)]
    store.write(RunResult(run_id, {"task": "cb", "method": "icl", "model": "m"}, status,
                          {"accuracy": accuracy, "n_eval": n_examples}, examples if status == "finished" else [],
                          error=None if status == "finished" else "boom"))


def test_merge_copies_only_what_the_target_has_not_finished(tmp_path):
    from benchmarks.merge_stores import merge

    target, source = Store(tmp_path / "t.sqlite"), Store(tmp_path / "s.sqlite")
    _write(target, "kept", 0.1)
    _write(target, "failed-here", 0.0, status="failed")
    _write(source, "kept", 0.9)             # finished in both: the target's stays
    _write(source, "failed-here", 0.7, n_examples=3)
    _write(source, "new", 0.6)
    _write(source, "failed-there", 0.0, status="failed")
    assert merge(str(target.path), str(source.path), dry_run=True) == ["failed-here", "new"]
    assert {r["run_id"] for r in target.runs()} == {"kept", "failed-here"}  # a dry run changes nothing
    assert merge(str(target.path), str(source.path)) == ["failed-here", "new"]
    runs = {r["run_id"]: (r["status"], r["accuracy"]) for r in target.runs()}
    assert runs == {"kept": ("finished", 0.1), "failed-here": ("finished", 0.7), "new": ("finished", 0.6)}
    counts = dict(sqlite3.connect(target.path).execute("SELECT run_id, COUNT(*) FROM examples GROUP BY run_id"))
    assert counts == {"kept": 2, "failed-here": 3, "new": 2}
    assert merge(str(target.path), str(source.path)) == []  # idempotent
