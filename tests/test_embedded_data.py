"""The embedded default data (harness/builtin_data/): byte-identical to ../shared/data, the default source when
neither --data-dir nor HARNESS_DATA_DIR is given, the same run ids as ../shared/data; "hub" reads the Hub."""

from __future__ import annotations

import hashlib
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness import api
from harness.cli import main
from harness.data import builtin_data_dir, data_status, few_shot_path, load_split, resolve_data_dir
from harness.tasks import load_task

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TASKS = ["cb", "copa", "rte", "wic", "wsc"]
# sha256 of the sorted "<sha256>  <path>" lines of every file but NOTICE.md (the .jsonl files and README.md):
# the rows the stored results were computed on. Editing a row changes run ids; update this only on purpose.
CONTENT_SHA256 = "922031de35e2c91af10eef3262d8e10bd504528503f1602f5bb68a34865a27a5"


@pytest.fixture(autouse=True)
def _no_harness_env(monkeypatch):
    monkeypatch.delenv("HARNESS_TASKS_DIR", raising=False)
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)


def _manifest(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder`` but NOTICE.md."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "NOTICE.md"}


def test_embedded_files_are_the_recorded_rows():
    manifest = _manifest(builtin_data_dir())
    assert len([p for p in manifest if p.endswith(".jsonl")]) == 38 and "README.md" in manifest
    text = "".join(f"{digest}  {path}\n" for path, digest in manifest.items())
    assert hashlib.sha256(text.encode()).hexdigest() == CONTENT_SHA256
    notice = (builtin_data_dir() / "NOTICE.md").read_text()
    assert "byte-identical" in notice and "shared/data" in notice
    assert "Provenance" in (builtin_data_dir() / "README.md").read_text()


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"no {SHARED_DATA} to compare with")
def test_embedded_files_are_byte_identical_to_shared_data():
    assert _manifest(builtin_data_dir()) == _manifest(SHARED_DATA)


def test_default_source_is_the_embedded_folder():
    folder = resolve_data_dir(None)
    assert folder == builtin_data_dir() == Path(api.__file__).resolve().parent / "builtin_data"
    for name in TASKS:
        status = data_status(load_task(name), folder)
        assert status["source"] == "local" and status["found"] is True
        assert {0, 1, 32, 42, 1024} <= set(status["few_shot_seeds"])
    assert len(load_split(load_task("cb"), "validation", folder)) == 56
    assert few_shot_path(load_task("rte"), 0, folder).is_file()


def test_tasks_command_finds_the_embedded_data():
    result = CliRunner().invoke(main, ["tasks", "--tasks", "cb,wsc"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.count("data: found; train 250, validation 56") == 1
    assert "MISSING" not in result.output and "Hub" not in result.output


def _run_ids(tmp_path: Path, data_dir, methods=("zeroshot", "icl", "ia3"), seeds=(0, 100)) -> dict:
    """Run ids of a plan over every embedded task (no model loads: a fake weights file fingerprints the model)."""
    weights = tmp_path / "tiny.gguf"
    if not weights.exists():
        weights.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    specs = api.plan(TASKS, list(methods), seeds=list(seeds), templates="all", preset="quick", k=4,
                     data_dir=data_dir, model=str(weights), device="cpu", dtype="float32")
    return {(s.task, s.method, s.template, s.seed): (s.run_id, s.data_hash) for s in specs}


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"no {SHARED_DATA} to compare with")
def test_embedded_data_gives_the_same_run_ids_as_shared_data(tmp_path):
    """Stored results (computed on ../shared/data) stay valid: same data_hash, same run ids. Seed 100 has a T-Few
    file for rte/copa/wic only, so cb/wsc exercise the seeded fallback sample too."""
    embedded = _run_ids(tmp_path, None)
    shared = _run_ids(tmp_path, SHARED_DATA)
    assert embedded == shared
    assert len({run_id for run_id, _ in embedded.values()}) == len(embedded) >= 50
    assert {task for task, *_ in embedded} == set(TASKS)


def test_hub_literal_reads_the_hub_with_its_own_identity(tmp_path, monkeypatch):
    """--data-dir hub: rows come from datasets.load_dataset (faked here with the embedded rows), and the runs are
    new ones (the source is part of the data hash), not the local runs."""
    calls = []

    def load_dataset(path, config, split):
        calls.append((path, config, split))
        return load_split(load_task("cb"), split, builtin_data_dir())

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    weights = tmp_path / "tiny.gguf"
    weights.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    args = dict(seeds=[0], templates="all", preset="quick", k=4, model=str(weights), device="cpu", dtype="float32")
    hub = api.plan(["cb"], ["zeroshot", "icl"], data_dir="hub", **args)
    assert calls and {c[:2] for c in calls} == {("super_glue", "cb")}
    assert all(s.data_source == "hub:super_glue/cb" for s in hub)
    local = api.plan(["cb"], ["zeroshot", "icl"], data_dir=None, **args)
    assert all(s.data_source == str(builtin_data_dir() / "cb") for s in local)
    assert not {s.run_id for s in hub} & {s.run_id for s in local}
    monkeypatch.setenv("HARNESS_DATA_DIR", "hub")
    calls.clear()
    from_env = api.plan(["cb"], ["zeroshot", "icl"], **args)
    assert calls and [s.run_id for s in from_env] == [s.run_id for s in hub]
