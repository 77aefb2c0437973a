"""Store schema versions: a store written by the schema-1 code (tests/fixtures/store_v1.sqlite, made by
tests/fixtures/make_store_v1.py at commit c1cbb64) opens in today's code with nothing lost; the migration is one
transaction; a store of a newer schema is refused with a one-line error that names the fix."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness import store as store_module
from harness.errors import HarnessError
from harness.store import SCHEMA_VERSION, ExampleScore, RunResult, Store

FIXTURE = Path(__file__).parent / "fixtures" / "store_v1.sqlite"
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
V1_RUN_COLUMNS = ("run_id", "status", "task", "method", "model", "template", "seed", "k", "preset", "is_random",
                  "n_eval", "accuracy", "accuracy_norm", "infer_flops_per_example",
                  "infer_flops_per_example_uncached", "train_flops", "peak_memory_bytes", "checkpoint_bytes",
                  "trainable_params", "total_params", "seconds", "train_seconds", "eval_seconds", "error",
                  "artifact_path", "config_json", "env_json", "extra_json", "finished_at")
V1_EXAMPLE_COLUMNS = ("run_id", "position", "example_id", "label", "prediction", "prediction_norm", "logprobs_json",
                      "n_tokens_json", "n_chars_json")


def _rows(path: Path, table: str, columns: tuple[str, ...]) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        key = "run_id" if table == "runs" else "run_id, position"
        return db.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {key}").fetchall()
    finally:
        db.close()


def _columns(path: Path, table: str) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
    finally:
        db.close()


def _user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


@pytest.fixture
def v1(tmp_path) -> Path:
    """A private copy of the committed schema-1 store (the fixture itself is never opened for writing)."""
    path = tmp_path / "v1.sqlite"
    shutil.copyfile(FIXTURE, path)
    return path


def test_fixture_is_a_schema_1_store():
    assert FIXTURE.stat().st_size < 200_000
    assert _user_version(FIXTURE) == 0 and "accuracy_norm_char" not in _columns(FIXTURE, "runs")
    assert len(_rows(FIXTURE, "runs", ("run_id",))) == 5 and len(_rows(FIXTURE, "examples", ("run_id",))) == 24


def test_v1_store_migrates_with_nothing_lost(v1):
    runs_before = _rows(v1, "runs", V1_RUN_COLUMNS)
    examples_before = _rows(v1, "examples", V1_EXAMPLE_COLUMNS)
    store = Store(v1)
    assert _user_version(v1) == SCHEMA_VERSION == 4
    assert {"accuracy_norm_char", "n_chars_with_delimiter"} <= _columns(v1, "runs")
    assert {"mixed_id", "method", "mode", "examples_per_second"} <= _columns(v1, "mixed_runs")  # schema 3
    assert "latency_median_s" in _columns(v1, "mixed_runs")  # schema 4
    assert "prediction_norm_char" in _columns(v1, "examples")
    # every old column of every row has its old value
    assert _rows(v1, "runs", V1_RUN_COLUMNS) == runs_before
    assert _rows(v1, "examples", V1_EXAMPLE_COLUMNS) == examples_before
    # schema-1 rows counted the delimiter in n_chars: marked, and no per-character figures made up for them
    assert _rows(v1, "runs", ("n_chars_with_delimiter", "accuracy_norm_char")) == [(1, None)] * 5
    assert {r[0] for r in _rows(v1, "examples", ("prediction_norm_char",))} == {None}
    # and the Store API reads them as before
    runs = store.runs()
    assert {(r["task"], r["method"], r["status"]) for r in runs} == {
        ("cb", "icl", "finished"), ("rte", "lora", "finished"), ("cb", "icl", "finished"), ("cb", "ia3", "failed"),
        ("rte", "zeroshot", "failed")}
    lora = next(r for r in runs if r["method"] == "lora")
    assert lora["config"]["train"] == {"lr": 0.003, "steps": 20} and lora["final_loss"] == 0.6931
    assert lora["env"]["git_commit"] == "c1cbb64" and lora["n_chars_with_delimiter"] is True
    assert lora["accuracy_norm_char"] is None and lora["trainable_params"] == 460_800
    failed = next(r for r in runs if r["method"] == "ia3")
    assert failed["error"] == "RuntimeError: planted failure 3"
    examples = list(store.examples())
    assert len(examples) == 24
    first = next(e for e in examples if e["run_id"] == lora["run_id"])
    assert first["choices"][0] == {"logprob": -1.5, "n_tokens": 1, "n_chars": 4}
    assert first["prediction_norm_char"] is None
    assert store.finished_ids() == {r["run_id"] for r in runs if r["status"] == "finished"}
    # opening again changes nothing
    Store(v1)
    assert _rows(v1, "runs", V1_RUN_COLUMNS) == runs_before and _user_version(v1) == SCHEMA_VERSION


def test_migrated_store_takes_new_runs(v1):
    store = Store(v1)
    ex = [ExampleScore("1", 1, [-4.0, -4.5], [2, 2], [2, 8])]  # per char: -2.0 vs -0.5625 -> choice 1
    store.write(RunResult("new", {"task": "cb", "method": "icl", "model": "m"}, "finished",
                          {"accuracy": 0.0, "accuracy_norm_char": 1.0, "n_eval": 1}, ex))
    new = store.get_run("new")
    assert new["accuracy_norm_char"] == 1.0 and new["n_chars_with_delimiter"] is False
    row = next(store.examples(["new"]))
    assert (row["prediction"], row["prediction_norm"], row["prediction_norm_char"]) == (0, 0, 1)
    assert len(store.runs()) == 6


def test_v1_rows_with_scoring_version_2_get_per_character_figures(v1):
    """A run whose config says its scorer already left the delimiter out is recomputed from its own numbers."""
    db = sqlite3.connect(v1)
    run_id, config = db.execute("SELECT run_id, config_json FROM runs WHERE method='lora'").fetchone()
    db.execute("UPDATE runs SET config_json=? WHERE run_id=?",
               (json.dumps({**json.loads(config), "scoring_version": 2}), run_id))
    db.commit()
    db.close()
    store = Store(v1)
    run = store.get_run(run_id)
    rows = list(store.examples([run_id]))
    expected = [ExampleScore(r["example_id"], r["label"], [c["logprob"] for c in r["choices"]],
                             [c["n_tokens"] for c in r["choices"]], [c["n_chars"] for c in r["choices"]])
                for r in rows]
    assert [r["prediction_norm_char"] for r in rows] == [e.prediction_norm_char for e in expected]
    assert run["accuracy_norm_char"] == sum(e.prediction_norm_char == e.label for e in expected) / len(expected)
    assert run["n_chars_with_delimiter"] is False
    others = [r for r in store.runs() if r["run_id"] != run_id]
    assert all(r["n_chars_with_delimiter"] and r["accuracy_norm_char"] is None for r in others)


def test_migration_is_one_transaction(v1, monkeypatch):
    runs_before = _rows(v1, "runs", V1_RUN_COLUMNS)
    real = store_module.MIGRATIONS[1]

    def dies_halfway(db):
        real(db)  # every step done ... then a failure before the commit
        raise RuntimeError("planted failure after the migration's steps")

    monkeypatch.setitem(store_module.MIGRATIONS, 1, dies_halfway)
    with pytest.raises(RuntimeError, match="planted"):
        Store(v1)
    assert _user_version(v1) == 0  # still schema 1: no new column, no version, rows untouched
    assert "accuracy_norm_char" not in _columns(v1, "runs") and "prediction_norm_char" not in _columns(v1, "examples")
    assert _rows(v1, "runs", V1_RUN_COLUMNS) == runs_before
    monkeypatch.setitem(store_module.MIGRATIONS, 1, real)
    Store(v1)
    assert _user_version(v1) == SCHEMA_VERSION and _rows(v1, "runs", V1_RUN_COLUMNS) == runs_before


def test_two_processes_opening_a_v1_store_at_once(v1):
    script = "import sys\nfrom harness.store import Store\nprint(len(Store(sys.argv[1]).runs()))\n"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(v1)], env=ENV, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate()[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs == ["5", "5"]
    assert _user_version(v1) == SCHEMA_VERSION


def test_new_store_has_current_version(tmp_path):
    path = tmp_path / "new.sqlite"
    Store(path)
    assert _user_version(path) == SCHEMA_VERSION
    assert {"accuracy_norm_char", "n_chars_with_delimiter"} <= _columns(path, "runs")


def test_newer_store_is_refused_untouched(tmp_path):
    path = tmp_path / "future.sqlite"
    Store(path)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(HarnessError, match=r"schema version 5, newer than this harness knows \(4\); upgrade harness"):
        Store(path)
    assert path.read_bytes() == before

    from harness.cli import main
    from harness.report import COMMANDS

    res = CliRunner().invoke(main, ["results", "--store", str(path)])
    assert res.exit_code == 2 and "upgrade harness" in res.output and len(res.output.strip().splitlines()) == 1
    baseline = tmp_path / "b.json"
    baseline.write_text(json.dumps({"version": 2, "cells": []}))
    for name, args in (("report", ["--out", str(tmp_path / "r")]), ("check", ["--baseline", str(baseline)]),
                       ("compare", ["a", "b"])):
        command = next(c for c in COMMANDS if c.name == name)
        res = CliRunner().invoke(command, [*args, "--store", str(path)])
        assert res.exit_code == 2 and "upgrade harness" in res.output, res.output


def test_v2_store_gets_the_mixed_runs_table(tmp_path):
    """A schema-2 store (today's tables without mixed_runs) migrates to 3 and 4: the empty table added, nothing
    else changed; mixed rows can then be written and read back."""
    from harness.mixed.records import mixed_rows, write_mixed

    path = tmp_path / "v2.sqlite"
    store = Store(path)
    store.write(RunResult("r1", {"task": "cb", "method": "lora", "model": "m"}, "finished", {"accuracy": 0.5},
                          [ExampleScore("1", 0, [-1.0, -2.0], [1, 1], [3, 2])]))
    db = sqlite3.connect(path)
    db.execute("DROP TABLE mixed_runs")
    db.execute("PRAGMA user_version=2")
    db.commit()
    db.close()
    runs_before = _rows(path, "runs", V1_RUN_COLUMNS)
    assert "mixed_runs" not in {r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master")}
    store = Store(path)
    assert _user_version(path) == SCHEMA_VERSION == 4
    assert _rows(path, "runs", V1_RUN_COLUMNS) == runs_before and mixed_rows(store) == []
    assert "latency_median_s" in _columns(path, "mixed_runs")
    row = {"mixed_id": "x", "method": "lora", "mode": "mixed", "tasks": "cb,rte", "n_tasks": 2, "batch_size": 4,
           "n_examples": 8, "examples_per_second": 10.0, "run_ids": {"cb": "r1"}, "config": {"limit": 4}}
    write_mixed(store, [row, row | {"mode": "task_by_task", "examples_per_second": 5.0}])
    write_mixed(store, [row | {"examples_per_second": 12.0}])  # the same (id, method, mode) is replaced
    got = {r["mode"]: r for r in mixed_rows(store)}
    assert got["mixed"]["examples_per_second"] == 12.0 and got["task_by_task"]["examples_per_second"] == 5.0
    assert got["mixed"]["run_ids"] == {"cb": "r1"} and got["mixed"]["config"] == {"limit": 4}


def test_v3_store_gets_the_median_latency(tmp_path):
    """A schema-3 store (mixed_runs without latency_median_s) migrates to 4: the column added, NULL in the rows
    written before; the same columns as a new store's table."""
    from harness.mixed.records import mixed_rows, write_mixed
    from harness.store import MIXED_SCHEMA

    path = tmp_path / "v3.sqlite"
    Store(path)
    db = sqlite3.connect(path)
    db.execute("DROP TABLE mixed_runs")
    db.execute(MIXED_SCHEMA)
    db.execute("INSERT INTO mixed_runs (mixed_id, method, mode, tasks, n_tasks, batch_size, n_examples, "
               "latency_mean_s, run_ids_json, config_json) VALUES ('x', 'ia3', 'mixed', 'cb', 1, 2, 4, 0.5, '{}', '{}')")
    db.execute("PRAGMA user_version=3")
    db.commit()
    db.close()
    store = Store(path)
    Store(tmp_path / "new.sqlite")
    assert _user_version(path) == 4
    assert _columns(path, "mixed_runs") == _columns(tmp_path / "new.sqlite", "mixed_runs")
    old = mixed_rows(store)[0]
    assert old["latency_mean_s"] == 0.5 and old["latency_median_s"] is None
    write_mixed(store, [{"mixed_id": "y", "method": "ia3", "mode": "mixed", "tasks": "cb", "n_tasks": 1,
                         "batch_size": 2, "n_examples": 4, "latency_median_s": 0.25, "run_ids": {}, "config": {}}])
    assert {r["mixed_id"]: r["latency_median_s"] for r in mixed_rows(store)} == {"x": None, "y": 0.25}
