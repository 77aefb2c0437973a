"""Float32 master weights for bfloat16 trainable parameters (harness.master_weights) and their run identity.

Without them a bfloat16 model's own parameters (full fine-tuning, LayerNorm tuning, the bottleneck adapters) lose
every update smaller than half their bfloat16 spacing: the paper-preset GPU runs of ``full`` and ``ln_tuning``
barely trained (docs/results.md). These tests fail on a training loop that steps the bfloat16 tensors directly.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import SHORT_CB
from harness.master_weights import LOW_PRECISION, MasterWeights
from harness.methods import apply_method, get_method, list_methods, training_settings
from harness.spec import RunSpec


def test_small_updates_accumulate_in_the_master_not_in_bfloat16():
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))  # spacing at 1.0: 2^-7
    masters = MasterWeights([weight])
    opt = torch.optim.SGD(masters.params, lr=1e-3)
    for _ in range(20):  # 20 steps of -1e-3: each one alone rounds away in bfloat16
        weight.grad = torch.ones_like(weight)
        masters.pull_grads()
        opt.step()
        masters.push()
    assert masters.active and weight.grad is None
    assert float(masters.params[0].detach()[0]) == pytest.approx(1 - 20e-3, abs=1e-6)
    assert float(weight.detach()[0]) == pytest.approx(0.98, abs=2 ** -8)  # moved; bfloat16 alone would stay at 1.0
    plain = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = torch.optim.SGD([plain], lr=1e-3)
    for _ in range(20):
        plain.grad = torch.ones_like(plain)
        opt.step()
    assert float(plain.detach()[0]) == 1.0  # the failure the masters exist for


def test_float32_parameters_are_used_as_they_are():
    weight = torch.nn.Parameter(torch.ones(3))
    masters = MasterWeights([weight])
    assert masters.params[0] is weight and not masters.active


def test_ln_tuning_trains_a_bfloat16_model_at_its_default_learning_rate(smollm, cb):
    """LayerNorm tuning's T-Few setting (Adafactor 3e-4, scale_parameter): each step is ~3e-4 of a weight, below
    bfloat16's half spacing (2^-9 relative). The same steps in float32 tell which elements must move: those whose
    float32 change exceeds half their bfloat16 spacing. Without master weights only the few tiny elements move
    (118 of the ~1,600 expected after 6 steps, measured), however many steps are taken."""
    from harness.training import train

    settings = training_settings("ln_tuning", "quick", {"steps": 4, "batch_size": 1, "n_train": 1,
                                                        "warmup_ratio": 0.0, "train_template": "gpt3_style"})

    def trained(dtype):
        model = apply_method(copy.deepcopy(smollm.model).to(dtype), "ln_tuning", settings)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        before = {n: p.detach().float().clone() for n, p in params.items()}
        train(model, smollm.tokenizer, SHORT_CB[:1], cb, settings, seed=0, method="ln_tuning")
        return before, {n: p.detach().float() for n, p in params.items()}

    start32, end32 = trained(torch.float32)
    start16, end16 = trained(torch.bfloat16)
    expected = moved = 0
    for name, w in start16.items():
        half_spacing = torch.maximum(w.abs(), torch.full_like(w, 2.0 ** -126)) * 2.0 ** -9
        must = (end32[name] - start32[name]).abs() > 2 * half_spacing  # clearly past rounding
        expected += int(must.sum())
        moved += int((must & (end16[name] != w)).sum())
    assert expected > 100
    assert moved >= 0.8 * expected, f"only {moved} of {expected} elements moved in bfloat16"


def test_trains_model_dtype_says_which_methods_keep_bfloat16_parameters(smollm):
    """MethodInfo.trains_model_dtype (which makes run ids record the master weights) must match what a method
    leaves trainable on a bfloat16 model. FishMask makes its parameters in prepare(), after apply."""
    base = copy.deepcopy(smollm.model).to(torch.bfloat16)
    names = [m.name for m in list_methods() if m.kind == "peft" and m.name not in ("qlora", "bitfit", "fishmask")]
    wrong = []
    for name in names + ["peft:lora", "peft:ia3", "peft:ln_tuning"]:
        model = apply_method(copy.deepcopy(base), name, training_settings(name, "quick"))
        low = any(p.requires_grad and p.dtype in LOW_PRECISION for p in model.parameters())
        if low != get_method(name).trains_model_dtype:
            wrong.append((name, low))
    assert not wrong, f"(method, has bfloat16 trainable parameters) disagreeing with trains_model_dtype: {wrong}"
    assert get_method("fishmask").trains_model_dtype and get_method("bitfit").trains_model_dtype


def test_run_ids_record_master_weights_only_where_they_change_numbers():
    from harness.api import plan

    old = RunSpec(task="cb", method="ln_tuning", template="t", seed=0, k=0, model="m", dtype="bfloat16")
    assert "master_weights" not in old.identity()  # ids of every run made before the field existed are unchanged
    new = RunSpec(task="cb", method="ln_tuning", template="t", seed=0, k=0, model="m", dtype="bfloat16",
                  master_weights=True)
    assert new.run_id != old.run_id
    specs = plan(["cb"], ["ln_tuning", "lora", "full"], seeds=[0], templates=["gpt3_style"], preset="quick",
                 device="cpu", dtype="bfloat16", limit=1)
    assert {s.method: s.master_weights for s in specs} == {"ln_tuning": True, "lora": False, "full": True}
    specs = plan(["cb"], ["ln_tuning"], seeds=[0], templates=["gpt3_style"], preset="quick", device="cpu",
                 dtype="float32", limit=1)
    assert not specs[0].master_weights
