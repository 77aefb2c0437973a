"""``harness.methods.adalora_allocator`` equals peft's ``AdaLoraModel.update_and_allocate`` bit for bit (float32 on
the CPU) through the warmup, budget-decrease and final phases: two copies of one tiny llama with AdaLoRA applied
from the same seed, fed the same gradients and the same plain update each step, one allocated by peft, the other
by the harness; the masked ``E`` (and ``A``, ``B``), the importance state and ``rank_pattern`` must be
``torch.equal`` after every step. Also: the op count stays small, a missing gradient raises as in peft, and the
final rank pattern is saved with the adapter and reloads (resized) to the trained model's logits. Both ways of
taking the score means run here: grouped (the CPU's default) and one per tensor (the default elsewhere)."""

from __future__ import annotations

import collections
import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from harness.methods import apply_method, get_method, training_settings
from harness.methods.adalora_allocator import fast_allocator, update_and_allocate

STEPS = 12  # total_step: warmup to tinit=2, budget decrease to step 9 = 12 - tfinal, then the final pattern


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    # hidden 64, intermediate 96, 2 kv heads of 16: four (d_in, d_out) shape groups (q/o, k/v, gate/up, down)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _adapted(method_args: str):
    settings = training_settings("adalora", "quick", {"steps": STEPS, "method_args": method_args})
    torch.manual_seed(1)
    return apply_method(_tiny_llama(), "adalora", settings)


def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _fake_step(model, step: int) -> None:
    """The same gradients (some exactly zero, for ties) and the same plain update on either copy."""
    gen = torch.Generator().manual_seed(100 + step)
    with torch.no_grad():
        for _, p in _trainable(model):
            g = torch.randn(p.shape, generator=gen) * (torch.rand(p.shape, generator=gen) > 0.1)
            p.grad = g
            p.sub_(0.05 * g)


def _assert_same(ref, ours, step):
    for (n, p), (m, q) in zip(_trainable(ref), _trainable(ours), strict=True):
        assert n == m and torch.equal(p, q), f"step {step}: {n} differs"
    a, b = ref.base_model.rankallocator, ours.base_model.rankallocator
    for field in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        d, e = getattr(a, field), getattr(b, field)
        assert list(d) == list(e), f"step {step}: {field} keys differ"
        for n in d:
            assert torch.equal(d[n], e[n]), f"step {step}: {field}[{n}] differs"
    cfg_a, cfg_b = ref.peft_config["default"], ours.peft_config["default"]
    assert cfg_a.rank_pattern == cfg_b.rank_pattern and list(cfg_a.rank_pattern or {}) == list(cfg_b.rank_pattern or {})


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped-means", "per-tensor-means"])
@pytest.mark.parametrize("delta_t", [1, 2])
def test_equals_peft_through_every_phase(delta_t, grouped):
    args = f"init_r=6,target_r=3,tinit=2,tfinal=3,delta_t={delta_t},beta1=0.85,beta2=0.7"
    ref, ours = _adapted(args), _adapted(args)
    assert fast_allocator(ours.base_model, grouped=grouped).grouped is grouped
    _assert_same(ref, ours, -1)
    phases = collections.Counter()
    for step in range(STEPS):
        _fake_step(ref, step)
        _fake_step(ours, step)
        ref.base_model.update_and_allocate(step)
        update_and_allocate(ours.base_model, step)
        _assert_same(ref, ours, step)
        pattern = ours.peft_config["default"].rank_pattern
        phases["masked" if pattern else "unmasked"] += 1
        if pattern:
            kept = sum(map(sum, pattern.values()))
            assert kept < 6 * len(pattern), "nothing was pruned"
    assert phases["unmasked"] >= 3 and phases["masked"] >= 6  # warmup, then masks to the end
    assert ours.base_model.rankallocator.ipt == {}  # peft's reset_ipt at total_step - tfinal
    final = ours.peft_config["default"].rank_pattern
    assert sum(map(sum, final.values())) == 3 * len(final)  # the target budget


def test_few_ops_per_call():
    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    args = "init_r=6,target_r=3,tinit=0,tfinal=0,beta1=0.85,beta2=0.7"
    counts = {}
    for name in ("peft", "grouped", "per-tensor"):
        model = _adapted(args)
        if name == "peft":
            call = model.base_model.update_and_allocate
        else:
            fast_allocator(model.base_model, grouped=name == "grouped")
            call = functools.partial(update_and_allocate, model.base_model)
        _fake_step(model, 0)
        call(0)  # builds the state
        _fake_step(model, 1)
        with Count() as c:
            call(1)  # update_ipt + mask_to_budget
        counts[name] = c.n
    layers = 14  # 2 blocks x 7 linears
    assert counts["grouped"] <= 60 and counts["per-tensor"] <= 60 + 2 * layers, counts
    assert counts["peft"] >= 5 * counts["per-tensor"], counts


def test_a_missing_gradient_raises_as_in_peft():
    ours = _adapted("init_r=6,target_r=3")
    _fake_step(ours, 0)
    next(p for n, p in _trainable(ours) if "lora_B" in n).grad = None
    with pytest.raises(TypeError, match="no gradient"):
        update_and_allocate(ours.base_model, 0)


def test_on_step_uses_it_and_the_final_pattern_saves_and_reloads(tmp_path):
    from harness.methods.artifacts import load_trained, save_trained

    info = get_method("adalora")
    ours = _adapted("init_r=6,target_r=3,tinit=1,tfinal=2")
    for step in range(STEPS):
        _fake_step(ours, step)
        info.on_step(ours, step)
    assert hasattr(ours.base_model.rankallocator, "_harness_fast_allocator")
    pattern = ours.peft_config["default"].rank_pattern
    assert sum(map(sum, pattern.values())) == 3 * len(pattern)
    ids = torch.arange(10).view(1, -1)
    ours.eval()
    with torch.no_grad():
        trained = ours(input_ids=ids).logits
    save_trained(ours, info, tmp_path / "adapter")
    reloaded = load_trained(_tiny_llama(), info, tmp_path / "adapter")
    e = [p for n, p in reloaded.named_parameters() if "lora_E" in n]
    assert sorted({p.shape[0] for p in e}) != [6]  # resized by the saved rank pattern
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained)
