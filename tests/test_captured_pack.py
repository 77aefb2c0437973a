"""The static-buffer packed step of ``benchmarks/captured_pack.py`` (issue 16's whole-step CUDA graph probe) trains
as the product's eager pack: on the CPU it runs without the capture, every step's tokens copied into the same
buffers at one padded width, and the losses and trained adapters equal the eager pack's (float32)."""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks import captured_pack
from harness.data import few_shot_examples
from harness.methods import apply_method, training_settings
from harness.packed import PackedAdapters, PackMember, group_initial_tensors, train_packed
from harness.tasks import load_task


def _train(tiny, tokenizer, members, settings, method):
    base = copy.deepcopy(tiny)
    initial = [group_initial_tensors(base, method, settings, m.seed) for m in members]
    torch.manual_seed(members[0].seed)
    model = apply_method(base, method, settings)
    packed = PackedAdapters(model, initial)
    widths = []  # every forward's padded width
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: widths.append(a[0].shape[1]))
    outcomes = train_packed(model, tokenizer, packed, members, settings, method=method, padding="right")
    hook.remove()
    return outcomes, [[p.detach().clone() for p in group] for group in packed.params], initial, widths


@pytest.mark.parametrize("method", ["lora", "tfew"])
def test_the_static_buffer_step_trains_as_the_eager_pack(tiny, smollm, data_dir, method):
    cb = load_task("cb")
    members = [PackMember(cb, few_shot_examples(cb, seed, data_dir, n=32)[:6], seed) for seed in (0, 1)]
    # one micro-batch a step (the captured step's case), no warmup and a large rate: every step moves the weights
    settings = training_settings(method, "quick", {"steps": 4, "batch_size": 2, "grad_accum": 1, "lr": 3e-2,
                                                   "warmup_ratio": 0.0})
    eager, eager_params, initial, eager_widths = _train(tiny, smollm.tokenizer, members, settings, method)
    width, positions = captured_pack.width_and_positions(smollm.tokenizer, members, settings)
    assert width > max(eager_widths)  # the fixed width pads past every step's own widest row
    step = captured_pack.install(width, positions, capture=False)
    try:
        static, static_params, _, static_widths = _train(tiny, smollm.tokenizer, members, settings, method)
    finally:
        captured_pack.uninstall()
    assert step.calls == 4 and step.eager_steps == 0  # every step took the static path ...
    assert static_widths == [width] * 4  # ... at the one fixed width
    for out, twin in zip(static, eager):
        assert out.steps == twin.steps == 4
        assert out.losses == pytest.approx(twin.losses, rel=1e-5, abs=1e-5)
        assert out.work == twin.work  # the counted work is the rows' own tokens, not the padding
    for g, (mine, twin) in enumerate(zip(static_params, eager_params)):
        assert all(not torch.equal(p, t) for p, t in zip(mine, initial[g]))  # trained
        for p, q in zip(mine, twin):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_a_step_with_accumulation_takes_the_products_path(tiny, smollm, data_dir):
    cb = load_task("cb")
    members = [PackMember(cb, few_shot_examples(cb, 0, data_dir, n=32)[:6], 0)]
    settings = training_settings("lora", "quick", {"steps": 2, "batch_size": 2, "grad_accum": 2, "lr": 3e-2,
                                                   "warmup_ratio": 0.0})
    step = captured_pack.install(*captured_pack.width_and_positions(smollm.tokenizer, members, settings))
    try:
        _train(tiny, smollm.tokenizer, members, settings, "lora")
    finally:
        captured_pack.uninstall()
    assert step.eager_steps == 2 and step.calls == 0 and step.replays == 0
