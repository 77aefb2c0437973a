"""``--workers``: PEFT groups trained in spawned processes give the serial run's results, written by the parent."""

from __future__ import annotations

from pathlib import Path

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
        examples.setdefault(e["run_id"], []).append([c["logprob"] for c in e["choices"]])
    return {rid: (r["status"], r["accuracy"], r.get("loss_last"), examples.get(rid)) for rid, r in runs.items()}


@pytest.mark.slow
def test_two_workers_reproduce_the_serial_run(tmp_path, data_dir, monkeypatch):
    import harness.parallel as parallel

    pool_sizes = []  # the worker path was taken (its pool always trains in spawned processes)
    real = parallel.run_groups
    monkeypatch.setattr(parallel, "run_groups", lambda groups, workers, *a, **kw: (
        pool_sizes.append((len(groups), workers)) or real(groups, workers, *a, **kw)))
    # 2 steps without warmup (with T-Few's, the first step has learning rate 0), at the quick preset's rates
    args = ["run", "--methods", "lora,ia3", "--tasks", "cb", "--seeds", "0", "--templates", "gpt3_style",
            "--preset", "quick", "--steps", "2", "--method-args", "warmup_ratio=0", "--train-batch-size", "2",
            "--limit", "4", "--data-dir", str(data_dir), "--quiet"]
    serial, parallel = tmp_path / "serial.sqlite", tmp_path / "parallel.sqlite"
    for store, extra in ((serial, []), (parallel, ["--workers", "2"])):
        result = CliRunner().invoke(main, args + ["--store", str(store)] + extra, catch_exceptions=False)
        assert result.exit_code == 0, result.output
    base = tmp_path / "zeroshot.sqlite"
    zeroshot = ["run", "--methods", "zeroshot", "--tasks", "cb", "--seeds", "0", "--templates", "gpt3_style",
                "--preset", "quick", "--limit", "4", "--data-dir", str(data_dir), "--quiet", "--store", str(base)]
    assert CliRunner().invoke(main, zeroshot, catch_exceptions=False).exit_code == 0
    one, two = _scores(Store(serial)), _scores(Store(parallel))
    assert len(one) == 2 and set(one) == set(two)
    assert all(status == "finished" for status, *_ in two.values())
    # CPU float32: the same numbers whichever process trained the group, up to the order of sums (a worker's matrix
    # products run on half the threads)
    for rid, (status, accuracy, loss, examples) in one.items():
        status2, accuracy2, loss2, examples2 = two[rid]
        assert (status, accuracy) == (status2, accuracy2)
        assert loss == pytest.approx(loss2, rel=1e-5, abs=1e-5)
        assert len(examples) == len(examples2)
        for row, row2 in zip(examples, examples2):
            assert row == pytest.approx(row2, abs=1e-4)
    import torch

    assert {(r["env"].get("workers"), r["env"].get("torch_threads")) for r in Store(parallel).runs()} == {
        (2, max(1, torch.get_num_threads() // 2))}
    assert pool_sizes == [(2, 2)]
    # the adapters were trained: every LoRA B (zero at initialisation) is nonzero, every IA3 vector (ones) moved
    from safetensors.torch import load_file

    for r in Store(parallel).runs():
        tensors = load_file(str(Path(r["artifact_path"]) / "adapter_model.safetensors"))
        if r["method"] == "lora":
            moved = [t.abs().max() > 0 for name, t in tensors.items() if "lora_B" in name]
        else:
            moved = [not bool((t == 1).all()) for t in tensors.values()]
        assert len(moved) in (60, 90) and all(moved), r["method"]
    # and they score differently from the base model (zero-shot, the same template and examples)
    (base_scores,) = [s[3] for s in _scores(Store(base)).values()]
    for status, accuracy, loss, examples in two.values():
        diff = max(abs(a - b) for x, y in zip(examples, base_scores) for a, b in zip(x, y))
        assert diff > 1e-3, diff


def test_workers_split_the_threads(monkeypatch):
    """Each of N workers runs threads // N torch threads (N x cores busy threads ran 2.4x slower on 2 cores), unless
    OMP_NUM_THREADS is set."""
    import torch

    from harness.parallel import _init_worker, worker_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = torch.get_num_threads()
    assert worker_threads(1) == cores and worker_threads(cores * 4) == 1
    assert worker_threads(2) == max(1, cores // 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert worker_threads(2) is None
    try:
        _init_worker(1, 1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(cores)
        monkeypatch.delenv("HARNESS_GPU_SHARE", raising=False)


def test_workers_are_checked(data_dir):
    specs = plan(["cb"], ["lora"], seeds=[0], templates="gpt3_style", preset="quick", data_dir=str(data_dir))
    with pytest.raises(HarnessError, match="--workers must be >= 1"):
        run(specs, store=":memory:", workers=0)
    with pytest.raises(HarnessError, match="custom loader"):
        run(specs, store=":memory:", workers=2, loader=lambda spec: None)


def _die(*_args):
    """A worker body that dies as the OS's out-of-memory kill leaves it: abruptly, no exception to pickle."""
    import os

    os._exit(137)


def test_a_dead_worker_stores_a_line_naming_memory_and_the_fix(data_dir, tmp_path):
    from harness.parallel import _pool

    specs = plan(["cb"], ["lora"], seeds=[0], templates="gpt3_style", preset="quick", data_dir=str(data_dir))
    results = list(_pool(_die, [specs], [specs], 1, data_dir, tmp_path, 8, [{"workers": 1}], "off"))
    assert [r.run_id for r in results] == [s.run_id for s in specs]
    for r in results:
        assert r.status == "failed" and "\n" not in r.error
        assert "memory" in r.error and "--workers" in r.error and "--pack" in r.error, r.error


def test_other_worker_errors_keep_their_type():
    from harness.parallel import worker_failure

    assert worker_failure(ValueError("boom")) == "worker process failed: ValueError: boom"
