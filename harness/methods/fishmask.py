"""FishMask (Sung et al. 2021, "Training Neural Networks with Fixed Sparse Masks", arXiv 2111.09839), T-Few's
sparse baseline (r-three/t-few ``src/models/fishmask.py``, configs ``fishmask_002.json``: keep 0.2%).

Before training, the empirical Fisher information of every parameter entry is estimated on the training
subset: the squared gradient of the training loss, summed over the training examples one at a time (Sung et al.
eq. 2; T-Few's ``create`` mode sums ``grad ** 2`` the same way). The ``keep_ratio`` share of all entries with the
largest Fisher values (one global top-k over every tensor, tied weights counted once) is the fixed mask; only
those entries train.

Rather than masking dense gradients (T-Few's ``apply`` mode), each tensor holding masked entries gets a
``torch.nn.utils.parametrize`` parametrization ``W = W0 + scatter(index, values)``: ``W0`` frozen, ``values``
(one per masked entry) the only trainable tensor. The two are the same update rule for SGD-like optimizers with
no weight decay, the trainable-parameter count is the mask size, and the optimizer holds state for the masked
entries only. The artifact (``tensors``) is the ``values`` and the ``saved_index`` buffers; reloading rebuilds
the parametrizations from the indices (:func:`restore`).

Costs: the Fisher pass is one forward + backward with every parameter's gradient per training example; the
runner adds ``costs.train_flops(dims, fisher work, total params)`` to the run's ``train_flops``. During training
the weight gradients of the parametrized tensors are computed dense and then gathered; ``train_flops`` counts
only the masked entries' ``2 x trainable`` per token (a lower bound for this implementation; the method's
definition). At inference the change merges into the weights (no overhead per token; scored unmerged, the
scatter-add per forward is O(parameters), not per token, and not counted).
"""

from __future__ import annotations

import dataclasses
import random

from harness.methods import MethodInfo, register
from harness.methods.base import Overhead, TrainConfig, check, is_int, is_number

INDEX = "saved_index"  # buffers named saved_* are saved with the trainable tensors (harness.methods.artifacts)


@dataclasses.dataclass
class FishMaskArgs(TrainConfig):
    """Defaults: ``keep_ratio=0.002`` (0.2% of all parameters: T-Few's ``fishmask_002.json``, the setting of its
    table 1), the Fisher from every training example (``fisher_examples=None``; Sung et al. use the training
    set), Adafactor lr 3e-4 (T-Few's baseline rate, as ``bitfit.json``); loss L_LM."""

    keep_ratio: float = 0.002
    fisher_examples: int | None = None
    lr: float = 3e-4

    def __post_init__(self):
        super().__post_init__()
        check(is_number(self.keep_ratio) and 0 < self.keep_ratio <= 1,
              f"fishmask: keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        self.keep_ratio = float(self.keep_ratio)
        check(self.fisher_examples is None or (is_int(self.fisher_examples) and self.fisher_examples >= 1),
              f"fishmask: fisher_examples must be a positive integer or none, got {self.fisher_examples!r}")


def _sparse_delta_cls():
    import torch

    class SparseDelta(torch.nn.Module):
        """``W -> W + scatter(index, values)`` on the flattened tensor."""

        def __init__(self, index: torch.Tensor, dtype, device):
            super().__init__()
            self.register_buffer(INDEX, index.to(device=device, dtype=torch.long))
            self.values = torch.nn.Parameter(torch.zeros(index.numel(), dtype=dtype, device=device))

        def forward(self, weight):
            flat = weight.reshape(-1).index_add(0, getattr(self, INDEX), self.values.to(weight.dtype))
            return flat.view_as(weight)

    return SparseDelta


def _owners(model) -> dict[int, list[tuple[object, str]]]:
    """id(parameter) -> every (module, attribute) holding it (tied weights: several)."""
    out: dict[int, list] = {}
    for module in model.modules():
        for attr, p in module.named_parameters(recurse=False):
            out.setdefault(id(p), []).append((module, attr))
    return out


def _attach(model, param, index, owners) -> None:
    from torch.nn.utils import parametrize

    delta = _sparse_delta_cls()(index, param.dtype, param.device)
    for module, attr in owners[id(param)]:
        parametrize.register_parametrization(module, attr, delta)


def apply(model, cfg: FishMaskArgs):
    """Freeze everything; :func:`prepare` (with the training data) picks the mask and makes it trainable."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def prepare(model, tokenizer, examples, task, settings: dict, seed: int):
    """Estimate the empirical Fisher on ``examples``, keep the top ``keep_ratio`` entries, attach the
    parametrizations; return the :class:`harness.costs.Work` of the Fisher forwards."""
    import torch

    from harness.costs import ModelDims, Work
    from harness.methods import method_config
    from harness.training import LOSS_FUNCTIONS, choice_logprobs

    cfg = method_config("fishmask", settings)
    dims = ModelDims.from_model(model)
    params, seen = [], set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            params.append((name, p))
    was_training = model.training
    for _, p in params:
        p.requires_grad_(True)
    fisher = [torch.zeros_like(p, dtype=torch.float32) for _, p in params]
    rng = random.Random(seed)
    templates = ([task.template(settings["train_template"])] if settings.get("train_template")
                 else list(task.templates))
    chosen = examples[: cfg.fisher_examples] if cfg.fisher_examples else examples
    work = Work()
    model.train()
    try:
        for ex in chosen:
            model.zero_grad(set_to_none=True)
            out = choice_logprobs(model, tokenizer, [task.render(rng.choice(templates), ex)],
                                  max_length=settings.get("max_length"), dims=dims)
            loss = sum(LOSS_FUNCTIONS[n](out.token_logprobs, out.token_mask, out.labels) for n in settings["losses"])
            loss.backward()
            for f, (_, p) in zip(fisher, params):
                if p.grad is not None:
                    f.add_(p.grad.detach().float() ** 2)
            work.add(out.work)
    finally:
        model.zero_grad(set_to_none=True)
        for _, p in params:
            p.requires_grad_(False)
        model.train(was_training)
    total = sum(p.numel() for _, p in params)
    k = max(1, round(cfg.keep_ratio * total))
    flat = torch.cat([f.reshape(-1) for f in fisher])
    keep = torch.topk(flat, k, sorted=False).indices.sort().values
    del flat, fisher
    owners = _owners(model)
    start = 0
    for _, p in params:
        end = start + p.numel()
        lo, hi = torch.searchsorted(keep, torch.tensor([start, end], device=keep.device)).tolist()
        if hi > lo:
            _attach(model, p, keep[lo:hi] - start, owners)
        start = end
    return work


def restore(model, state: dict) -> None:
    """Rebuild the parametrizations of a saved mask (``...parametrizations.<attr>.original`` layout) from the
    ``saved_index`` tensors of ``state``, before the values are loaded."""
    owners = _owners(model)
    marker = f".0.{INDEX}"
    for key, index in state.items():
        if not key.endswith(marker):
            continue
        path, attr = key[: -len(marker)].rsplit(".parametrizations.", 1)
        module = model.get_submodule(path)
        if hasattr(module, "parametrizations") and attr in module.parametrizations:
            continue  # a tied weight restored through its other owner
        _attach(model, getattr(module, attr), index, owners)


def trainable_params(model, cfg: FishMaskArgs) -> int:
    """``round(keep_ratio x total parameters)`` (tied weights once), at least 1."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return max(1, round(cfg.keep_ratio * total))


register(MethodInfo(
    "fishmask", "peft", "FishMask (Sung et al. 2021): the 0.2% entries of largest empirical Fisher, fixed sparse mask",
    config_cls=FishMaskArgs, apply=apply, overhead=lambda model, cfg: Overhead(), artifact="tensors",
    family="selective", merges=True, prepare=prepare, restore=restore, trains_model_dtype=True))
