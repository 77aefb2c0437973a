"""benchmarks/merge_stores.py: copies a source's finished runs that the target has not finished (missing, failed or
withdrawn there), with their per-example rows; never replaces a finished run, never copies an unfinished one."""

from __future__ import annotations

import sqlite3

import pytest

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


def test_split_then_join_gives_back_the_finished_and_withdrawn_runs(tmp_path):
    """benchmarks/split_store.py writes one store per model (finished runs) and one of the withdrawn runs; merging
    them back with mode "all" holds exactly those runs and their example rows (failed runs are not exported)."""
    from benchmarks.merge_stores import merge
    from benchmarks.split_store import split

    store = Store(tmp_path / "all.sqlite")
    for run_id, model, status, n in [("a1", "m/one", "finished", 2), ("a2", "m/one", "finished", 3),
                                     ("b1", "two", "finished", 4), ("b2", "two", "failed", 0),
                                     ("w1", "two", "finished", 5)]:
        examples = [ExampleScore(f"{run_id}-{i}", 0, [-1.0, -2.0], [1, 1], [3, 3]) for i in range(n)]
        store.write(RunResult(run_id, {"task": "cb", "method": "icl", "model": model}, status,
                              {"accuracy": 0.5, "n_eval": n}, examples, error=None if status == "finished" else "x"))
    db = sqlite3.connect(store.path)
    with db:
        db.execute("UPDATE runs SET status = 'withdrawn' WHERE run_id = 'w1'")
    db.close()
    counts = split(store.path, tmp_path / "out")
    assert counts == {"m_one.sqlite": 2, "two.sqlite": 1, "withdrawn.sqlite": 1}
    assert {r["run_id"] for r in Store(tmp_path / "out" / "two.sqlite").runs()} == {"b1"}
    joined = tmp_path / "joined.sqlite"
    joined.write_bytes((tmp_path / "out" / "m_one.sqlite").read_bytes())
    assert merge(str(joined), str(tmp_path / "out" / "two.sqlite"), mode="all") == ["b1"]
    assert merge(str(joined), str(tmp_path / "out" / "withdrawn.sqlite")) == []  # only finished without --all
    assert merge(str(joined), str(tmp_path / "out" / "withdrawn.sqlite"), mode="all") == ["w1"]
    runs = {r["run_id"]: r["status"] for r in Store(joined).runs()}
    assert runs == {"a1": "finished", "a2": "finished", "b1": "finished", "w1": "withdrawn"}
    counts = dict(sqlite3.connect(joined).execute("SELECT run_id, COUNT(*) FROM examples GROUP BY run_id"))
    assert counts == {"a1": 2, "a2": 3, "b1": 4, "w1": 5}


def test_absent_only_copies_missing_ids_and_never_touches_the_targets_runs(tmp_path):
    """export_paper.sh joins the committed export into a device store with mode "absent": a run the device store lacks
    comes back (session 20: 4 prompt-tuning runs), a run it withdrew stays withdrawn even where the committed copy
    still has it finished."""
    from benchmarks.merge_stores import merge

    device, committed = Store(tmp_path / "device.sqlite"), Store(tmp_path / "committed.sqlite")
    _write(device, "new-on-device", 0.5)
    _write(device, "withdrawn-here", 0.2)
    db = sqlite3.connect(device.path)
    with db:
        db.execute("UPDATE runs SET status = 'withdrawn' WHERE run_id = 'withdrawn-here'")
    db.close()
    _write(committed, "withdrawn-here", 0.2)
    _write(committed, "lost-by-device", 0.7, n_examples=3)
    _write(committed, "old-failure", 0.0, status="failed")
    assert merge(str(device.path), str(committed.path), mode="absent") == ["lost-by-device", "old-failure"]
    runs = {r["run_id"]: r["status"] for r in device.runs()}
    assert runs == {"new-on-device": "finished", "withdrawn-here": "withdrawn", "lost-by-device": "finished",
                    "old-failure": "failed"}
    counts = dict(sqlite3.connect(device.path).execute("SELECT run_id, COUNT(*) FROM examples GROUP BY run_id"))
    assert counts["lost-by-device"] == 3
    assert merge(str(device.path), str(committed.path), mode="absent") == []
    with pytest.raises(ValueError, match="mode must be one of"):
        merge(str(device.path), str(committed.path), mode="absnet")


def test_content_digest_sees_rows_not_page_layout(tmp_path):
    """export_paper.sh keeps a committed file whose rows did not change: the digest is equal for the same rows written
    in another order (different bytes), and differs when one value changes."""
    from benchmarks.split_store import content_digest

    one = Store(tmp_path / "one.sqlite")
    for run_id in ("a", "b", "c"):
        _write(one, run_id, 0.5)
    two = tmp_path / "two.sqlite"
    two.write_bytes(one.path.read_bytes())
    db = sqlite3.connect(two)
    with db:  # the same rows, run "a" moved to the end of both tables
        db.execute("ATTACH DATABASE ? AS src", (str(one.path),))
        for table in ("examples", "runs"):
            db.execute(f"DELETE FROM main.{table} WHERE run_id = 'a'")
        for table in ("runs", "examples"):
            db.execute(f"INSERT INTO main.{table} SELECT * FROM src.{table} WHERE run_id = 'a'")
    db.execute("VACUUM")
    db.close()
    assert two.read_bytes() != one.path.read_bytes()
    assert content_digest(one.path) == content_digest(two)
    db = sqlite3.connect(two)
    with db:
        db.execute("UPDATE runs SET accuracy = 0.25 WHERE run_id = 'b'")
    db.close()
    assert content_digest(one.path) != content_digest(two)


def test_join_stores_sh_joins_compressed_stores_first_one_wins(tmp_path):
    """benchmarks/join_stores.sh (what results_doc.sh and prepare_gpu_dir.sh join the committed export with): the
    first store is copied whole, later ones merged with --all; .xz and .gz inputs are read; --list names the
    committed export, SmolLM2's first."""
    import gzip
    import lzma
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    first, second = Store(tmp_path / "a.sqlite"), Store(tmp_path / "b.sqlite")
    _write(first, "both", 0.1)
    _write(first, "gone", 0.0, status="withdrawn")
    _write(second, "both", 0.9)
    _write(second, "gone", 0.5)          # finished in a later store: replaces the first's withdrawn run
    _write(second, "only-b", 0.4, status="failed")  # --all: a status other than finished where the id is new
    (tmp_path / "a.sqlite.xz").write_bytes(lzma.compress(first.path.read_bytes()))
    (tmp_path / "b.sqlite.gz").write_bytes(gzip.compress(second.path.read_bytes()))
    out = tmp_path / "joined.sqlite"
    env = {"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)}
    proc = subprocess.run(["bash", "benchmarks/join_stores.sh", str(out), str(tmp_path / "a.sqlite.xz"),
                           str(tmp_path / "b.sqlite.gz")], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    runs = {r["run_id"]: (r["status"], r["accuracy"]) for r in Store(out).runs()}
    assert runs == {"both": ("finished", 0.1), "gone": ("finished", 0.5), "only-b": ("failed", 0.4)}
    assert f"{tmp_path / 'b.sqlite.gz'}: 2 run(s) copied" in proc.stdout
    listed = subprocess.run(["bash", "benchmarks/join_stores.sh", "--list"], cwd=root, capture_output=True, text=True)
    assert listed.stdout.split()[0] == "results/paper/smollm2-135m.sqlite.xz"
    assert all((root / p).is_file() for p in listed.stdout.split())
