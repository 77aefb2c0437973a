"""Tests for harness.data: local JSONL loading (../shared/data, else the embedded copy), T-Few few-shot subsets, the
default (embedded) and "hub" sources, the Hub path (faked), clear errors."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

import pytest

from harness.data import builtin_data_dir, data_status, few_shot_examples, load_split, resolve_data_dir
from harness.errors import HarnessError
from harness.tasks import load_task

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# the real data: ../shared/data beside the checkout, else its byte-identical copy shipped in the package
DATA_DIR = SHARED_DATA if SHARED_DATA.is_dir() else builtin_data_dir()


@pytest.fixture(autouse=True)
def _no_harness_env(monkeypatch):
    """Run against the repository's tasks/ folder whatever the caller's environment says."""
    monkeypatch.delenv("HARNESS_TASKS_DIR", raising=False)
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)

SPLIT_SIZES = {  # from the data folder's README
    "rte": (2490, 277), "cb": (250, 56), "copa": (400, 100), "wic": (5428, 638), "wsc": (554, 104),
}


def fake_datasets(monkeypatch, load_dataset) -> list:
    """Install a fake ``datasets`` module whose load_dataset is ``load_dataset``; return its call log."""
    calls: list = []

    def recorded(*args, **kwargs):
        calls.append((args, kwargs))
        return load_dataset(*args, **kwargs)

    module = types.ModuleType("datasets")
    module.load_dataset = recorded
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


# ------------------------------------------------------------------------------------------ resolve_data_dir

def test_resolve_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)
    assert resolve_data_dir(None) == builtin_data_dir()  # the default: the data shipped in the package
    assert resolve_data_dir("") == builtin_data_dir()
    assert resolve_data_dir(str(tmp_path)) == tmp_path
    monkeypatch.setenv("HARNESS_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_data_dir(other) == other  # the argument wins over the environment
    with pytest.raises(HarnessError, match="does not exist.*--data-dir.*HARNESS_DATA_DIR.*shipped.*hub.*Hub"):
        resolve_data_dir(tmp_path / "absent")


def test_resolve_data_dir_hub_literal(tmp_path, monkeypatch):
    """"hub" (from --data-dir or HARNESS_DATA_DIR) means the Hub: None; a folder named hub is reached as a Path or
    ./hub."""
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)
    assert resolve_data_dir("hub") is None
    monkeypatch.setenv("HARNESS_DATA_DIR", "hub")
    assert resolve_data_dir(None) is None
    assert resolve_data_dir(str(tmp_path)) == tmp_path  # the argument still wins
    monkeypatch.setenv("HARNESS_DATA_DIR", str(tmp_path))
    assert resolve_data_dir("hub") is None  # --data-dir hub wins over a folder in the environment
    (tmp_path / "hub").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir("./hub") == Path("hub") and resolve_data_dir(Path("hub")) == Path("hub")


# ------------------------------------------------------------------------------------------ local splits

@pytest.mark.parametrize("name", sorted(SPLIT_SIZES))
def test_local_split_sizes(name):
    task = load_task(name)
    train, validation = SPLIT_SIZES[name]
    assert len(load_split(task, "train", DATA_DIR)) == train
    rows = load_split(task, task.eval_split, DATA_DIR)
    assert len(rows) == validation
    assert all(task.label_field in row and task.id_field in row for row in rows)
    assert {row[task.label_field] for row in rows} == set(range(len(task.label_names)))


def test_missing_local_file_says_where_and_how(tmp_path):
    task = load_task("rte")
    with pytest.raises(HarnessError) as caught:
        load_split(task, "validation", tmp_path)
    message = str(caught.value)
    assert str(tmp_path / "rte" / "validation.jsonl") in message
    assert "--data-dir" in message and "HARNESS_DATA_DIR" in message and "Hub" in message
    assert "shipped with harness (cb, copa, rte, wic, wsc)" in message and "--data-dir hub" in message


def test_task_without_embedded_data_says_to_use_the_hub(tmp_path):
    """A task the package ships no data for, read with the default (embedded) folder: advice names the Hub."""
    task = dataclasses.replace(load_task("rte"), name="winogrande")
    with pytest.raises(HarnessError) as caught:
        load_split(task, "validation", resolve_data_dir(None))
    message = str(caught.value)
    assert str(builtin_data_dir() / "winogrande" / "validation.jsonl") in message
    assert "covers cb, copa, rte, wic, wsc only" in message and "--data-dir hub" in message


def test_unknown_split_suggests(tmp_path):
    with pytest.raises(HarnessError, match="Did you mean 'validation'"):
        load_split(load_task("rte"), "validaton", tmp_path)


def test_bad_json_line_names_file_and_line(tmp_path):
    (tmp_path / "rte").mkdir()
    (tmp_path / "rte" / "train.jsonl").write_text('{"idx": 0}\n\n{not json}\n')
    with pytest.raises(HarnessError, match=r"train\.jsonl:3: not valid JSON"):
        load_split(load_task("rte"), "train", tmp_path)


# ------------------------------------------------------------------------------------------ Hub (faked)

def test_hub_load_uses_hub_path_and_config(monkeypatch):
    rows = [{"premise": "p", "hypothesis": "h", "idx": 0, "label": 0}]
    calls = fake_datasets(monkeypatch, lambda path, config, split: list(rows))
    assert load_split(load_task("wsc"), "validation", None) == rows
    assert calls == [(("super_glue", "wsc.fixed"), {"split": "validation"})]


def test_hub_failure_gives_advice(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub\nmore detail")

    fake_datasets(monkeypatch, offline)
    with pytest.raises(HarnessError, match="Couldn't reach.*--data-dir.*HARNESS_DATA_DIR.*Hub") as caught:
        load_split(load_task("cb"), "train", None)
    assert "more detail" not in str(caught.value)


def test_hub_few_shot_falls_back_to_seeded_sample(monkeypatch):
    train = [{"idx": i, "label": i % 2} for i in range(100)]
    fake_datasets(monkeypatch, lambda path, config, split: train)
    first = few_shot_examples(load_task("rte"), 7, None)
    assert len(first) == 32 and first == few_shot_examples(load_task("rte"), 7, None)


# ------------------------------------------------------------------------------------------ few-shot subsets

def test_few_shot_uses_t_few_files():
    task = load_task("rte")
    rows = few_shot_examples(task, 0, DATA_DIR)
    assert len(rows) == 32
    assert rows[0]["idx"] == 2325  # first row of rte/few_shot/0_seed.jsonl
    assert few_shot_examples(task, 0, DATA_DIR, n=4) == rows[:4]
    assert few_shot_examples(task, 0, DATA_DIR, n=0) == []
    assert few_shot_examples(task, 42, DATA_DIR) != rows
    with pytest.raises(HarnessError, match="holds 32 examples but 64"):
        few_shot_examples(task, 0, DATA_DIR, n=64)
    with pytest.raises(HarnessError, match="non-negative integer"):
        few_shot_examples(task, 0, DATA_DIR, n=-1)


def test_few_shot_falls_back_to_seeded_sample_of_train():
    task = load_task("cb")  # cb has no seed-100 file
    sample = few_shot_examples(task, 100, DATA_DIR)
    assert len(sample) == 32
    assert sample == few_shot_examples(task, 100, DATA_DIR)
    assert sample != few_shot_examples(task, 101, DATA_DIR)
    train_ids = {row["idx"] for row in load_split(task, "train", DATA_DIR)}
    assert {row["idx"] for row in sample} <= train_ids
    assert len({row["idx"] for row in sample}) == 32
    assert len(few_shot_examples(task, 100, DATA_DIR, n=8)) == 8
    with pytest.raises(HarnessError, match="has only 250 rows"):
        few_shot_examples(task, 100, DATA_DIR, n=251)


# ------------------------------------------------------------------------------------------ data_status

def test_data_status_local():
    status = data_status(load_task("rte"), DATA_DIR)
    assert status["found"] is True and status["source"] == "local"
    assert status["counts"] == {"train": 2490, "validation": 277}
    assert status["few_shot_seeds"] == [0, 1, 32, 42, 100, 1024]
    assert data_status(load_task("cb"), DATA_DIR)["few_shot_seeds"] == [0, 1, 32, 42, 1024]


def test_data_status_missing_and_hub(tmp_path):
    task = load_task("wic")
    (tmp_path / "wic").mkdir()
    (tmp_path / "wic" / "validation.jsonl").write_text('{"idx": 0}\n{"idx": 1}\n')
    status = data_status(task, tmp_path)
    assert status["found"] is False and status["source"] == "missing"
    assert status["counts"] == {"validation": 2}
    assert status["missing"] == [str(tmp_path / "wic" / "train.jsonl")]
    assert status["few_shot_seeds"] == []
    hub = data_status(task, None)
    assert hub["source"] == "hub" and hub["found"] is False and hub["counts"] == {}
