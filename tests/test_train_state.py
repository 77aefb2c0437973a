"""harness.train_state: an interrupted training continues at the step it reached and ends where an uninterrupted
one ends, bit for bit on the CPU (real SmolLM2 with (IA)3 under Adafactor; a tiny bfloat16 model with LayerNorm
tuning for the float32 master weights), and ``harness``'s run loop resumes a killed run's training."""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging

import pytest
import torch

from tests.conftest import SHORT_CB
from harness import peft_runner, training
from harness.methods import apply_method, training_settings
from harness.train_state import TrainState, saved_steps


class Killed(BaseException):
    """Stands for the SIGKILL of a call's deadline: not an Exception, so nothing on the way catches it."""


def _kill_at(monkeypatch, at_step: int) -> None:
    """Make :func:`harness.training.training_step` die when it is called for ``at_step``."""
    real = training.training_step

    def step(backward, optimizer, masters, settings, step=0):
        if step == at_step:
            raise Killed
        return real(backward, optimizer, masters, settings, step)

    monkeypatch.setattr(training, "training_step", step)


@pytest.fixture(scope="module")
def tiny_bf16(smollm):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm.tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


@pytest.mark.parametrize("method", ["ia3", "ln_tuning"])
def test_an_interrupted_training_ends_where_an_uninterrupted_one_does(method, smollm, tiny_bf16, cb, tmp_path,
                                                                      monkeypatch):
    base = smollm.model if method == "ia3" else tiny_bf16  # ln_tuning in bfloat16: float32 masters
    # lr 1e-2 and no warmup: every step moves the weights; batch 1 of 2 examples: the kill falls mid-epoch
    settings = training_settings(method, "quick", {"steps": 4, "batch_size": 1, "n_train": 2, "lr": 1e-2,
                                                   "warmup_ratio": 0.0})

    def fresh():
        torch.manual_seed(0)
        return apply_method(copy.deepcopy(base), method, settings)

    whole_model = fresh()
    whole = training.train(whole_model, smollm.tokenizer, SHORT_CB, cb, settings, seed=3, method=method)

    state = TrainState(tmp_path / "t.train_state.pt", min_seconds=0, cost_factor=0)
    _kill_at(monkeypatch, 3)
    with pytest.raises(Killed):
        training.train(fresh(), smollm.tokenizer, SHORT_CB, cb, settings, seed=3, method=method, state=state)
    assert state.path.exists()  # written after step 2, the last one done
    monkeypatch.undo()
    resumed_model = fresh()
    resumed = training.train(resumed_model, smollm.tokenizer, SHORT_CB, cb, settings, seed=3, method=method,
                             state=state)

    assert resumed.steps == 4 and len(resumed.step_seconds) == 4
    assert resumed.losses == whole.losses and resumed.components == whole.components
    assert resumed.work == whole.work and resumed.rows == whole.rows
    assert len(set(whole.losses)) == 4  # the weights moved every step
    now = dict(resumed_model.named_parameters())
    for name, p in whole_model.named_parameters():
        assert torch.equal(p, now[name]), name


def test_a_state_of_another_training_is_ignored(smollm, tiny_bf16, cb, tmp_path, caplog):
    settings = training_settings("ln_tuning", "quick", {"steps": 2, "batch_size": 1, "n_train": 2, "lr": 1e-2,
                                                        "warmup_ratio": 0.0})

    def fresh():
        torch.manual_seed(0)
        return apply_method(copy.deepcopy(tiny_bf16), "ln_tuning", settings)

    state = TrainState(tmp_path / "t.train_state.pt", min_seconds=0, cost_factor=0)
    training.train(fresh(), smollm.tokenizer, SHORT_CB, cb, {**settings, "steps": 3}, seed=3, method="ln_tuning",
                   state=state)  # leaves the state after step 1 of 3
    assert state.path.exists()
    expected = training.train(fresh(), smollm.tokenizer, SHORT_CB, cb, settings, seed=4, method="ln_tuning")
    with caplog.at_level(logging.WARNING, logger="harness.train_state"):
        got = training.train(fresh(), smollm.tokenizer, SHORT_CB, cb, settings, seed=4, method="ln_tuning",
                             state=state)
    assert "written for another training" in caplog.text
    assert got.losses == expected.losses and got.steps == 2


def test_a_killed_run_resumes_its_training(smollm, cb, data_dir, tmp_path, monkeypatch, caplog):
    """`harness run` killed mid-training, run again: the training continues at its last state (the run stores
    the same accuracy and log-probs as an uninterrupted run) and the state file is gone afterwards."""
    from harness import api
    from harness.store import Store

    monkeypatch.setattr(peft_runner, "TrainState", functools.partial(TrainState, min_seconds=0, cost_factor=0))
    specs = api.plan(["cb"], ["ia3"], seeds=[0], templates=["gpt3_style"], preset="quick", limit=2,
                     train_overrides={"steps": 4, "batch_size": 1, "n_train": 2, "lr": 1e-2, "warmup_ratio": 0.0},
                     data_dir=data_dir,
                     device="cpu", dtype="float32")

    def load(spec):
        return dataclasses.replace(smollm, model=copy.deepcopy(smollm.model))

    def run(store):
        return api.run(specs, store=store, data_dir=data_dir, progress=False, loader=load)

    whole_store, store = tmp_path / "whole" / "s.sqlite", tmp_path / "killed" / "s.sqlite"
    assert [r.status for r in run(whole_store)] == ["finished"]
    _kill_at(monkeypatch, 2)
    with pytest.raises(Killed):
        run(store)
    states = list(store.parent.rglob("*.train_state.pt"))
    assert len(states) == 1
    assert saved_steps(states[0].parent) == {states[0].name: 2}  # what run_device_real.sh prints at a deadline
    monkeypatch.undo()
    monkeypatch.setattr(peft_runner, "TrainState", functools.partial(TrainState, min_seconds=0, cost_factor=0))
    with caplog.at_level(logging.INFO, logger="harness.training"):
        resumed = run(store)
    assert "resuming the training at step 2 of 4" in caplog.text
    assert [r.status for r in resumed] == ["finished"]
    assert not states[0].exists()
    (a,), (b,) = Store(whole_store).runs(), Store(store).runs()
    assert a["run_id"] == b["run_id"] and a["accuracy"] == b["accuracy"]
    assert len(a["losses"]) == 4 and b["losses"] == a["losses"] and b["train_seconds"] > 0
    assert list(Store(store).examples([b["run_id"]])) == list(Store(whole_store).examples([a["run_id"]]))


def test_a_run_killed_while_it_evaluates_resumes_without_training(smollm, cb, data_dir, tmp_path, monkeypatch,
                                                                     caplog):
    """Killed after its training, while its runs are scored (round 27: P-tuning's evaluation outlasted a grid call):
    run again, the group continues from the finished training's state, with no training step, and stores what an
    uninterrupted run stores; the state file is gone once every run of the group is stored."""
    from harness import api
    from harness.store import Store

    monkeypatch.setattr(peft_runner, "TrainState", functools.partial(TrainState, min_seconds=0, cost_factor=0))
    specs = api.plan(["cb"], ["ia3"], seeds=[0], templates=["gpt3_style", "based_on_previous_passage"],
                     preset="quick", limit=2, data_dir=data_dir, device="cpu", dtype="float32",
                     train_overrides={"steps": 4, "batch_size": 1, "n_train": 2, "lr": 1e-2, "warmup_ratio": 0.0})

    def load(spec):
        return dataclasses.replace(smollm, model=copy.deepcopy(smollm.model))

    def run(store):
        return api.run(specs, store=store, data_dir=data_dir, progress=False, loader=load)

    whole_store, store = tmp_path / "whole" / "s.sqlite", tmp_path / "killed" / "s.sqlite"
    assert [r.status for r in run(whole_store)] == ["finished", "finished"]
    real_evaluate, calls = peft_runner.evaluate, []

    def evaluate_then_die(*args, **kwargs):  # the first template is scored and stored, the kill falls in the second
        calls.append(1)
        if len(calls) == 2:
            raise Killed
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(peft_runner, "evaluate", evaluate_then_die)
    with pytest.raises(Killed):
        run(store)
    (state_file,) = store.parent.rglob("*.train_state.pt")
    assert saved_steps(state_file.parent) == {state_file.name: 4}  # the finished training's state
    import subprocess
    import sys

    listing = subprocess.run([sys.executable, "-m", "harness.train_state", str(state_file.parent)],
                             capture_output=True, text=True, check=True).stdout  # what the device script prints
    assert f"{state_file.name}: trained (4 steps); scoring its runs continues" in listing
    assert [r["status"] for r in Store(store).runs()] == ["finished"]
    monkeypatch.undo()
    monkeypatch.setattr(peft_runner, "TrainState", functools.partial(TrainState, min_seconds=0, cost_factor=0))

    def no_step(*args, **kwargs):
        raise AssertionError("a training step ran again")

    monkeypatch.setattr(training, "training_step", no_step)
    from harness import costs

    monkeypatch.setattr(costs, "peak_memory_bytes", lambda device: 0)  # the new process measures nothing: the
    # resumed runs' peaks must come from the training's state (train_peak_memory_bytes, the first process's)
    with caplog.at_level(logging.INFO, logger="harness.training"):
        resumed = run(store)
    assert "resuming the training at step 4 of 4" in caplog.text
    assert [r.status for r in resumed] == ["finished"]
    assert not state_file.exists()
    whole, killed = ({r["run_id"]: r for r in Store(s).runs()} for s in (whole_store, store))
    assert whole.keys() == killed.keys() and len(whole) == 2
    for run_id, a in whole.items():
        b = killed[run_id]
        assert a["accuracy"] == b["accuracy"] and a["losses"] == b["losses"] and len(a["losses"]) == 4
        assert a["train_flops"] == b["train_flops"]
        assert b["peak_memory_bytes"] == b["train_peak_memory_bytes"] > 0
        assert list(Store(store).examples([run_id])) == list(Store(whole_store).examples([run_id]))


def test_remove_deletes_the_state_and_half_written_copies(tmp_path):
    state = TrainState(tmp_path / "g.train_state.pt")
    for name in ("g.train_state.pt", "g.train_state.pt.123.tmp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "other.train_state.pt.1.tmp").write_bytes(b"x")
    state.remove()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.train_state.pt.1.tmp"]


def test_only_methods_without_outside_state_resume():
    """FishMask (masks, ``prepare``) keeps state a TrainState does not hold, so the runner gives it none; AdaLoRA's
    allocator state travels in the TrainState (``step_state``); the other methods resume."""
    from harness.methods import get_method, list_methods

    restarting = {m.name for m in list_methods() if m.kind == "peft" and not m.resumable}
    assert "fishmask" in restarting and "adalora" not in restarting
    assert all(get_method(m).prepare is not None or (get_method(m).on_step is not None
                                                     and get_method(m).step_state is None) for m in restarting)
    assert get_method("ia3").resumable and get_method("lora").resumable and get_method("adalora").resumable


def test_a_save_request_makes_every_training_there_write_once(tmp_path):
    """The device script's deadline: ``request_save`` (SAVE_NOW in the states' folder) makes ``due()`` true for the
    trainings started before it, once; a request older than a training's start or last write is ignored."""
    import random
    import time
    from types import SimpleNamespace

    from harness.train_state import SAVE_REQUEST, request_save

    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = TrainState(tmp_path / "g.train_state.pt", min_seconds=1e9)  # the clock never makes it due
    other = TrainState(tmp_path / "h.train_state.pt", min_seconds=1e9)
    assert not state.due() and not other.due()
    time.sleep(1.1)  # past a coarse (1 s) file-time resolution
    assert request_save(tmp_path).name == SAVE_REQUEST
    assert state.due() and other.due()
    time.sleep(1.1)
    state.save({"k": 1}, 3, params=[param], masters=SimpleNamespace(params=[]), optimizer=optimizer,
               schedule=schedule, rng=random.Random(0), queue=[], stats={}, micro=1, accum=1)
    assert not state.due() and other.due()  # one write per request; the other training has not written yet
    assert not TrainState(tmp_path / "late.train_state.pt", min_seconds=1e9).due()  # started after the request


@pytest.mark.parametrize("kill_at", [3, 5])  # during the budget schedule; in the final phase (after end = 4)
def test_an_interrupted_adalora_training_ends_where_an_uninterrupted_one_does(kill_at, smollm, tiny_bf16, cb,
                                                                                tmp_path, monkeypatch):
    """AdaLoRA's rank allocation keeps importance scores and a rank pattern between steps (``step_state``): a
    resumed training masks the same ranks and ends with the same parameters, bit for bit on the CPU."""
    settings = training_settings("adalora", "quick", {"steps": 6, "batch_size": 1, "n_train": 2, "lr": 1e-2,
                                                      "warmup_ratio": 0.0, "method_args": {"tinit": 1, "tfinal": 2,
                                                                                           "init_r": 4, "target_r": 2}})

    def fresh():
        torch.manual_seed(0)
        return apply_method(copy.deepcopy(tiny_bf16).float(), "adalora", settings)

    whole_model = fresh()
    whole = training.train(whole_model, smollm.tokenizer, SHORT_CB, cb, settings, seed=3, method="adalora")
    state = TrainState(tmp_path / "t.train_state.pt", min_seconds=0, cost_factor=0)
    _kill_at(monkeypatch, kill_at)
    with pytest.raises(Killed):
        training.train(fresh(), smollm.tokenizer, SHORT_CB, cb, settings, seed=3, method="adalora", state=state)
    monkeypatch.undo()
    resumed_model = fresh()
    resumed = training.train(resumed_model, smollm.tokenizer, SHORT_CB, cb, settings, seed=3, method="adalora",
                             state=state)
    assert resumed.losses == whole.losses and len(set(whole.losses)) == 6
    config = whole_model.base_model.peft_config["default"]
    assert config.rank_pattern == resumed_model.base_model.peft_config["default"].rank_pattern
    assert any(not all(keep) for keep in config.rank_pattern.values())  # ranks were pruned
    now = dict(resumed_model.named_parameters())
    for name, p in whole_model.named_parameters():
        assert torch.equal(p, now[name]), name
