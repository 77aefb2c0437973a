"""benchmarks/withdraw_runs.py --model --transformers: withdraws exactly one model's runs made under one
transformers version (a tokenizer that version converted wrongly), with the reason; reports leave them out.
--fishmask-sparse: withdraws exactly the FishMask runs of sparse deltas under Adafactor with scale_parameter."""

from __future__ import annotations

import sqlite3
import sys

import pytest

from harness.store import RunResult, Store


def _write(store: Store, run_id: str, model: str, transformers: str) -> None:
    store.write(RunResult(run_id, {"task": "cb", "method": "icl", "model": model}, "finished",
                          {"accuracy": 0.5, "n_eval": 1}, [], env={"packages": {"transformers": transformers}}))


def test_withdraws_one_models_runs_of_one_transformers_version(tmp_path, monkeypatch, capsys):
    from benchmarks.withdraw_runs import main

    path = tmp_path / "s.sqlite"
    store = Store(path)
    _write(store, "a", "gemma3-270m", "5.17.0")
    _write(store, "b", "gemma3-270m", "5.25.0")
    _write(store, "c", "smollm2-135m", "5.17.0")
    monkeypatch.setattr(sys, "argv", ["withdraw_runs", str(path), "--model", "gemma3-270m", "--transformers", "5.17.0"])
    main()
    rows = dict(sqlite3.connect(path).execute("SELECT run_id, status FROM runs").fetchall())
    assert rows == {"a": "withdrawn", "b": "finished", "c": "finished"}
    assert "one token per character" in store.get_run("a")["error"]
    assert "withdrew 1 of 3" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["withdraw_runs", str(path), "--model", "gemma3-270m"])
    with pytest.raises(SystemExit):
        main()


def test_withdraws_fishmask_sparse_deltas_under_scaled_adafactor(tmp_path, monkeypatch, capsys):
    from benchmarks.withdraw_runs import main

    path = tmp_path / "s.sqlite"
    store = Store(path)
    base = {"optimizer": "adafactor", "scale_parameter": True, "lr": 3e-4, "keep_ratio": 0.002}
    configs = {"old": {"method": "fishmask", "train": base},                          # before update= existed
               "sparse": {"method": "fishmask", "train": {**base, "update": "sparse"}},
               "dense": {"method": "fishmask", "train": {**base, "update": "dense"}},
               "unscaled": {"method": "fishmask", "train": {**base, "scale_parameter": False}},
               "adapter": {"method": "adapter", "train": base}}
    for run_id, cfg in configs.items():
        store.write(RunResult(run_id, {"task": "copa", "model": "smollm2-135m", **cfg}, "finished",
                              {"accuracy": 0.5, "n_eval": 1}, []))
    monkeypatch.setattr(sys, "argv", ["withdraw_runs", str(path), "--fishmask-sparse"])
    main()
    rows = dict(sqlite3.connect(path).execute("SELECT run_id, status FROM runs").fetchall())
    assert rows == {"old": "withdrawn", "sparse": "withdrawn", "dense": "finished", "unscaled": "finished",
                    "adapter": "finished"}
    assert "scale_parameter" in store.get_run("old")["error"]
    assert "withdrew 2 of 5" in capsys.readouterr().out


def test_withdraws_the_runs_of_one_commit(tmp_path, monkeypatch, capsys):
    """--commit: exactly the finished runs whose environment names that commit (a prefix of the hash)."""
    from benchmarks.withdraw_runs import main

    path = tmp_path / "s.sqlite"
    store = Store(path)
    for run_id, commit in {"new": "292a898f8b74", "old": "245611ae03e6", "none": None}.items():
        store.write(RunResult(run_id, {"task": "wsc", "method": "lokr", "model": "smollm2-135m"}, "finished",
                              {"accuracy": 0.5, "n_eval": 1}, [], env={"git_commit": commit}))
    monkeypatch.setattr(sys, "argv", ["withdraw_runs", str(path), "--commit", "292a898"])
    main()
    rows = dict(sqlite3.connect(path).execute("SELECT run_id, status FROM runs").fetchall())
    assert rows == {"new": "withdrawn", "old": "finished", "none": "finished"}
    assert "8817784" in store.get_run("new")["error"]
    assert "withdrew 1 of 3" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["withdraw_runs", str(path), "--commit", "245611a", "--reason", "a planted bug"])
    main()
    assert store.get_run("old")["error"] == "a planted bug" and store.get_run("old")["status"] == "withdrawn"
    monkeypatch.setattr(sys, "argv", ["withdraw_runs", str(path), "--commit", "292a898", "--fishmask-sparse"])
    with pytest.raises(SystemExit):
        main()
