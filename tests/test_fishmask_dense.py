"""FishMask's ``update=dense`` (the default): T-Few's rule, the masked tensors trained whole with the gradient times
the 0/1 mask, so that Adafactor's ``scale_parameter`` step is ``lr x RMS(W)``; the zero-initialised sparse deltas
(``update=sparse``) move at most ``lr x 1e-3`` per step and did not train on the GPU (harness.methods.fishmask)."""

from __future__ import annotations

import copy

import pytest
import torch

from harness.errors import HarnessError
from harness.methods import apply_method, get_method, training_settings
from tests.conftest import SHORT_CB

INDICES = {  # a tiny llama's tensors and the flat indices masked in each: rows with one or several entries
    "model.embed_tokens.weight": [0, 5, 6, 7, 100, 1000],
    "model.layers.0.self_attn.q_proj.weight": [3, 9, 10, 200, 511],
    "model.layers.1.mlp.down_proj.weight": [0, 33, 64, 777],
    "model.norm.weight": [1, 7],
}


def tiny_llama(tied: bool = False, vocab: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).float().eval()


def masked(base, update: str):
    """A copy of ``base`` with FishMask applied and the masks of INDICES attached as ``update``."""
    from harness.methods.fishmask import INDEX, _attach, _owners

    settings = training_settings("fishmask", "paper", {"method_args": f"update={update}"})
    model = apply_method(copy.deepcopy(base), "fishmask", settings)
    owners, params = _owners(model), dict(model.named_parameters())
    for name, index in INDICES.items():
        _attach(model, params[name], torch.tensor(index), owners, update)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == (
        {"entries"} if update == "dense" else {"values"})
    assert sum(b.numel() for n, b in model.named_buffers() if n.endswith(INDEX)) == sum(map(len, INDICES.values()))
    return model


def lm_loss(model, step: int) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(step))
    return model(input_ids=ids, labels=ids).loss


def weights(model) -> dict[str, torch.Tensor]:
    """Every weight as the model computes it (a parametrized one through its parametrization)."""
    out = {}
    for name, module in model.named_modules():
        for attr, _ in module.named_parameters(recurse=False):
            out[f"{name}.{attr}"] = getattr(module, attr).detach().clone()
        for attr in getattr(module, "parametrizations", {}):
            out[f"{name}.{attr}"] = getattr(module, attr).detach().clone()
    return {n: w for n, w in out.items() if ".parametrizations." not in n}


def train_masked(model, settings: dict, steps: int, fused: bool = False) -> None:
    """``steps`` harness training steps (:func:`harness.training.training_step`) on :func:`lm_loss`; ``fused``:
    the CUDA optimizer (:class:`harness.optim.Adafactor`), run here on the CPU."""
    from harness.training import make_optimizer, optimizer_view, training_step

    view = optimizer_view(model, [p for p in model.parameters() if p.requires_grad])
    optimizer = make_optimizer(view.params, settings, fused=fused)
    for step in range(steps):
        def backward(step=step):
            loss = lm_loss(model, step)
            loss.backward()
            return loss.detach().reshape(1, 1).repeat(1, 2), [1.0]
        training_step(backward, optimizer, view, settings, step)


def test_update_is_validated_and_recorded():
    with pytest.raises(HarnessError, match="update must be one of dense, sparse.*got 'masked'"):
        training_settings("fishmask", "paper", {"method_args": "update=masked"})
    with pytest.raises(HarnessError, match="update=dense .*weight_decay=0 or update=sparse"):
        training_settings("fishmask", "paper", {"method_args": "weight_decay=0.01"})
    assert training_settings("fishmask", "paper", {"method_args": "update=sparse,weight_decay=0.01"})["weight_decay"]
    settings = training_settings("fishmask", "paper")
    assert settings["update"] == "dense" and settings["lr"] == 3e-4 and settings["scale_parameter"] is True
    # part of the stored settings (so of the run ids): runs of the sparse rule are not taken for dense ones
    assert "update" not in get_method("fishmask").config_cls.LATER_ARGS


def test_dense_update_moves_masked_entries_by_lr_times_rms_and_nothing_else():
    """Through prepare() and train() at the default lr 3e-4 with scale_parameter: each masked entry moves by about
    lr x RMS(W) per step (~6e-6 here); the sparse rule's ceiling is lr x 1e-3 = 3e-7. Unmasked entries: exact."""
    from transformers import AutoTokenizer

    from harness.random_models import TOKENIZER_NAME, tokenizer_folder
    from harness.tasks import load_task
    from harness.training import train

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder(TOKENIZER_NAME)), local_files_only=True)
    base, cb, steps = tiny_llama(vocab=len(tokenizer)), load_task("cb"), 3
    settings = training_settings("fishmask", "paper", {"steps": steps, "batch_size": 2, "n_train": 2,
                                                       "warmup_ratio": 0.0, "train_template": "gpt3_style",
                                                       "method_args": "keep_ratio=0.001"})
    lr = settings["lr"]
    model = apply_method(copy.deepcopy(base), "fishmask", settings)
    get_method("fishmask").prepare(model, tokenizer, SHORT_CB, cb, settings, 0)
    train(model, tokenizer, SHORT_CB, cb, settings, seed=0, method="fishmask")
    before, after = weights(base), weights(model)
    checked = 0
    for name, module in model.named_modules():
        for attr, plist in getattr(module, "parametrizations", {}).items():
            w0 = before[f"{name}.{attr}"]
            if w0.dim() < 2:
                continue
            moved = (after[f"{name}.{attr}"] - w0).reshape(-1)
            mask = torch.zeros_like(moved, dtype=torch.bool)
            mask[plist[0].saved_index] = True
            assert torch.equal(moved[~mask], torch.zeros_like(moved[~mask])), name  # bit-identical to the base
            per_step = moved[mask].abs().median().item() / steps
            scale = lr * w0.pow(2).mean().sqrt().item()
            assert per_step > 0.3 * scale, (name, per_step, scale)  # measured 0.7-1.0 x scale; sparse: 0.03 x
            assert per_step > 10 * lr * 1e-3, (name, per_step)
            checked += 1
    assert checked >= 5


@pytest.mark.parametrize("fused", [False, True], ids=["transformers", "harness.optim"])
def test_dense_update_equals_adafactor_on_the_full_tensors_with_masked_gradients(fused):
    """T-Few's rule written out: transformers' Adafactor (scale_parameter, no relative step) on the full tensors,
    their gradients multiplied by the mask before clipping and the step; the harness's dense FishMask gives the
    same weights within 1e-6 after 5 steps (the sparse rule is off by ~1e-4), with the CPU's optimizer and CUDA's."""
    from transformers.optimization import Adafactor

    base, steps = tiny_llama(), 5
    settings = training_settings("fishmask", "paper", {"lr": 1e-3, "warmup_ratio": 0.0})
    model = masked(base, "dense")
    train_masked(model, settings, steps, fused)

    reference = copy.deepcopy(base).train()
    params = dict(reference.named_parameters())
    for p in reference.parameters():
        p.requires_grad_(False)
    masks = {}
    for name, index in INDICES.items():
        masks[name] = torch.zeros(params[name].numel(), dtype=torch.bool)
        masks[name][index] = True
        masks[name] = masks[name].view_as(params[name])
        params[name].requires_grad_(True)
    full = [params[name] for name in INDICES]
    optimizer = Adafactor(full, lr=1e-3, scale_parameter=True, relative_step=False, warmup_init=False)
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        lm_loss(reference, step).backward()
        for name in INDICES:
            params[name].grad.mul_(masks[name])
        torch.nn.utils.clip_grad_norm_(full, settings["max_grad_norm"])
        optimizer.step()

    want, got, start = weights(reference), weights(model), weights(base)
    assert want.keys() == got.keys()
    assert max((want[n] - start[n]).abs().max().item() for n in INDICES) > 1e-4  # the reference did train
    for name in want:
        assert (got[name] - want[name]).abs().max().item() <= 1e-6, name
        if name not in INDICES:
            assert torch.equal(got[name], start[name]), name


def test_dense_update_keeps_float32_masters_for_bfloat16_weights():
    """A bfloat16 model: the optimizer steps float32 copies of the whole tensors, the masked entries are their
    rounding, the unmasked ones stay the base's bits."""
    from harness.methods.fishmask import DenseMasks
    from harness.training import make_optimizer, optimizer_view

    base = tiny_llama().to(torch.bfloat16)
    model = masked(base, "dense")
    settings = training_settings("fishmask", "paper", {"warmup_ratio": 0.0})
    view = optimizer_view(model, [p for p in model.parameters() if p.requires_grad])
    assert isinstance(view, DenseMasks) and view.active
    assert sorted(p.numel() for p in view.params) == sorted(dict(base.named_parameters())[n].numel() for n in INDICES)
    assert all(p.dtype == torch.float32 for p in view.params)
    optimizer = make_optimizer(view.params, settings)
    start = [p.detach().clone() for p in view.params]
    for step in range(3):
        view.zero_grad()
        lm_loss(model, step).backward()
        view.pull_grads()
        optimizer.step()
        view.push()
    assert all(not torch.equal(p, s) for p, s in zip(view.params, start))
    for m, full in view.dense:
        assert torch.equal(m.entries, full.view(-1)[m.saved_index].to(torch.bfloat16))
    before, after = weights(base), weights(model)
    for name, index in INDICES.items():
        keep = torch.ones(before[name].numel(), dtype=torch.bool)
        keep[index] = False
        assert torch.equal(after[name].reshape(-1)[keep], before[name].reshape(-1)[keep]), name


@pytest.mark.parametrize("update", ["dense", "sparse"])
def test_saved_mask_reloads_the_trained_model(tmp_path, update):
    """The artifact holds the masked entries (trained values or deltas) and their indices only; load_trained
    (restore + load) on a fresh base gives the trained model's logits within 1e-6. Tied embeddings."""
    from safetensors.torch import load_file

    from harness.methods.artifacts import TENSORS_FILE, load_trained, save_trained

    base = tiny_llama(tied=True)
    model = masked(base, update)
    train_masked(model, training_settings("fishmask", "paper", {"lr": 1e-2, "warmup_ratio": 0.0,
                                                                 "method_args": f"update={update}"}), 3)
    model.eval()
    info = get_method("fishmask")
    folder = save_trained(model, info, tmp_path / "fishmask")
    saved = load_file(str(folder / TENSORS_FILE))
    trained = "entries" if update == "dense" else "values"
    assert {k.rsplit(".", 1)[-1] for k in saved} == {trained, "saved_index"}
    assert sum(v.numel() for k, v in saved.items() if k.endswith(trained)) == sum(map(len, INDICES.values()))
    reloaded = load_trained(copy.deepcopy(base), info, folder)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        want, got, plain = model(input_ids=ids).logits, reloaded(input_ids=ids).logits, base(input_ids=ids).logits
    assert (want - plain).abs().max().item() > (1e-3 if update == "dense" else 2e-5)  # sparse: lr x 1e-3 a step
    assert (got - want).abs().max().item() <= 1e-6


def test_dense_masks_step_ops_do_not_grow_with_the_masked_tensors():
    """Launch-bound training (each dispatched op is a CUDA kernel): DenseMasks scatters the gradients and gathers
    the entries back with a few ops for all masked tensors together, not a few per tensor (measured, CPU path:
    17,425 -> 15,854 ops per step for SmolLM2-135M's 263 masked tensors). Views (no kernel) aside."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from harness.methods.fishmask import _attach, _owners
    from harness.training import optimizer_view

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func.overloadpacket not in (torch.ops.aten.view, torch.ops.aten.split_with_sizes,
                                                  torch.ops.aten.split, torch.ops.aten.detach)
            return func(*args, **(kwargs or {}))

    def ops(masked_names: list[str]) -> int:
        base = tiny_llama().to(torch.bfloat16)
        settings = training_settings("fishmask", "paper")
        model = apply_method(copy.deepcopy(base), "fishmask", settings)
        owners, params = _owners(model), dict(model.named_parameters())
        for name in masked_names:
            _attach(model, params[name], torch.tensor([0, 3, 5]), owners, "dense")
        view = optimizer_view(model, [p for p in model.parameters() if p.requires_grad])
        assert len(view.dense) == len(masked_names)
        lm_loss(model, 0).backward()
        with Count() as count:
            view.pull_grads()
            view.push()
        assert all(full.grad is not None for _, full in view.dense)
        return count.n

    names = [n for n, _ in tiny_llama().named_parameters()]
    few, every = ops(names[:2]), ops(names)
    assert len(names) > 10 and few == every <= 8, (few, every)


def test_dense_masks_gradients_are_the_masked_entries_and_none_without_one():
    """pull_grads: each copy's gradient is its entries' gradient at the mask, exact zeros elsewhere (all tensors
    at once, or tensor by tensor when a masked tensor got no gradient: its copy then gets none)."""
    from harness.training import optimizer_view

    model = masked(tiny_llama().to(torch.bfloat16), "dense")
    view = optimizer_view(model, [p for p in model.parameters() if p.requires_grad])
    for drop in (False, True):
        view.zero_grad()
        lm_loss(model, 0).backward()
        want = [m.entries.grad.float() for m, _ in view.dense]
        if drop:
            view.dense[1][0].entries.grad = None
        view.pull_grads()
        for i, (m, full) in enumerate(view.dense):
            if drop and i == 1:
                assert full.grad is None
                continue
            expected = torch.zeros(full.numel()).index_copy_(0, m.saved_index, want[i]).view_as(full)
            assert full.grad.dtype == torch.float32 and torch.equal(full.grad, expected)
            assert m.entries.grad is None
