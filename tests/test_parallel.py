"""``--workers``: PEFT groups trained in spawned processes give the serial run's results, written by the parent."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from harness.api import plan, run
from harness.cli import main
from harness.errors import HarnessError
from harness.store import Store


def _scores(store: Store) -> dict:
    runs = {r["run_id"]: r for r in store.runs()}
    examples = {}
    for e in store.examples(list(runs)):
        examples.setdefault(e["run_id"], []).append([round(c["logprob"], 5) for c in e["choices"]])
    return {rid: (r["status"], r["accuracy"], r["loss_last"], examples.get(rid)) for rid, r in runs.items()}


@pytest.mark.slow
def test_two_workers_reproduce_the_serial_run(tmp_path, data_dir, monkeypatch):
    import harness.parallel as parallel

    pool_sizes = []  # the worker path was taken (its pool always trains in spawned processes)
    real = parallel.run_groups
    monkeypatch.setattr(parallel, "run_groups", lambda groups, workers, *a, **kw: (
        pool_sizes.append((len(groups), workers)) or real(groups, workers, *a, **kw)))
    args = ["run", "--methods", "lora,ia3", "--tasks", "cb", "--seeds", "0", "--templates", "gpt3_style",
            "--preset", "quick", "--steps", "1", "--train-batch-size", "2", "--limit", "4", "--data-dir",
            str(data_dir), "--quiet"]
    serial, parallel = tmp_path / "serial.sqlite", tmp_path / "parallel.sqlite"
    for store, extra in ((serial, []), (parallel, ["--workers", "2"])):
        result = CliRunner().invoke(main, args + ["--store", str(store)] + extra, catch_exceptions=False)
        assert result.exit_code == 0, result.output
    one, two = _scores(Store(serial)), _scores(Store(parallel))
    assert len(one) == 2 and set(one) == set(two)
    assert all(status == "finished" for status, *_ in two.values())
    assert one == two  # CPU float32: the same numbers, whichever process trained the group
    assert {r["env"].get("workers") for r in Store(parallel).runs()} == {2}
    assert pool_sizes == [(2, 2)]


def test_workers_are_checked():
    specs = plan(["cb"], ["lora"], seeds=[0], templates="gpt3_style", preset="quick", data_dir=None)
    with pytest.raises(HarnessError, match="--workers must be >= 1"):
        run(specs, store=":memory:", workers=0)
    with pytest.raises(HarnessError, match="custom loader"):
        run(specs, store=":memory:", workers=2, loader=lambda spec: None)
