"""FishMask (Sung et al. 2021, "Training Neural Networks with Fixed Sparse Masks", arXiv 2111.09839), T-Few's
sparse baseline (r-three/t-few ``src/models/fishmask.py``, configs ``fishmask_002.json``: keep 0.2%).

Before training, the empirical Fisher information of every parameter entry is estimated on the training
subset: the squared gradient of the training loss, summed over the training examples one at a time (Sung et al.
eq. 2; T-Few's ``create`` mode sums ``grad ** 2`` the same way). The ``keep_ratio`` share of all entries with the
largest Fisher values (one global top-k over every tensor, tied weights counted once) is the fixed mask; only
those entries train.

Each tensor holding masked entries gets a ``torch.nn.utils.parametrize`` parametrization, so that the model's
trainable parameters are the masked entries only (the trainable-parameter count, ``train_flops`` and the artifact
are the mask's), with ``update`` saying how the optimizer sees them:

- ``dense`` (default; T-Few's ``apply`` mode): ``W = W0`` with the masked entries replaced by ``entries``
  (initialised to W0's). The optimizer steps a float32 copy of the *whole* tensor (its master weight) whose gradient is the dense
  gradient times the 0/1 mask (:class:`DenseMasks`, which :func:`harness.training.optimizer_view` picks up in
  place of :class:`harness.master_weights.MasterWeights`), then the masked entries are copied back. This is
  T-Few's rule (``param.grad *= mask`` before the optimizer step, clipping after): Adafactor scales the step by
  ``RMS(W)`` of the full tensor, factors the second moments of the full masked gradient and clips the update over
  the full tensor. Unmasked entries are read from the frozen ``W0``, so they stay bit-identical to the base
  (Adafactor's and AdamW's update of an entry whose gradient is always zero is zero anyway); weight decay would
  shrink the whole copy (and so its RMS) where T-Few would decay every weight of the model, so ``update=dense``
  refuses ``weight_decay > 0``.
- ``sparse`` (the first implementation, kept as an option): ``W = W0 + scatter(index, values)`` with ``values``
  (one per masked entry, zero-initialised) a parameter of its own. For SGD-like optimizers without weight decay
  this is the same update, but not for T-Few's Adafactor: with ``scale_parameter=True`` the step is ``lr x
  max(eps2=1e-3, RMS(values))`` and ``RMS(values)`` starts at 0, so each entry moves at most ``lr x 1e-3`` (3e-7 at
  lr 3e-4) per step. Measured on an H100 with SmolLM2-135M (paper preset: 1000 steps, batch 8, copa): all 20
  sparse FishMask runs ended with training loss 1.7-3.1 (every other method ~0.00) and zero-shot accuracy; it
  never trained. On the CPU (copa, 30 steps of 8, the same batches) the dense rule's loss is 0.5-0.9 below the
  sparse one's from step 8 on.

The artifact (``tensors``) is the trainable tensor (``entries``: the trained values; ``values``: the deltas) and
the ``saved_index`` buffers; reloading rebuilds the parametrizations from the indices (:func:`restore`, which
tells the two modes apart by the saved tensor's name).

Costs: the Fisher pass is one forward + backward with every parameter's gradient per training example; the
runner adds ``costs.train_flops(dims, fisher work, total params)`` to the run's ``train_flops``. During training
the weight gradients of the parametrized tensors are computed dense and then gathered; ``train_flops`` counts
only the masked entries' ``2 x trainable`` per token (a lower bound for this implementation; the method's
definition; the dense mode's elementwise optimizer work over the full tensors is not counted either). At
inference the change merges into the weights (no overhead per token; scored unmerged, the scatter per forward is
O(parameters), not per token, and not counted).
"""

from __future__ import annotations

import dataclasses
import functools
import random

from harness.methods import MethodInfo, register
from harness.methods.base import Overhead, TrainConfig, check, is_int, is_number

INDEX = "saved_index"  # buffers named saved_* are saved with the trainable tensors (harness.methods.artifacts)
UPDATES = ("dense", "sparse")


@dataclasses.dataclass
class FishMaskArgs(TrainConfig):
    """Defaults: ``keep_ratio=0.002`` (0.2% of all parameters: T-Few's ``fishmask_002.json``, the setting of its
    table 1), the Fisher from every training example (``fisher_examples=None``; Sung et al. use the training
    set), Adafactor lr 3e-4 (T-Few's baseline rate, as ``bitfit.json``); loss L_LM; ``update="dense"`` (T-Few's
    masked dense gradients; ``sparse``: the masked entries as their own zero-initialised parameter, see the module
    docstring)."""

    keep_ratio: float = 0.002
    fisher_examples: int | None = None
    lr: float = 3e-4
    update: str = "dense"

    def __post_init__(self):
        super().__post_init__()
        check(is_number(self.keep_ratio) and 0 < self.keep_ratio <= 1,
              f"fishmask: keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        self.keep_ratio = float(self.keep_ratio)
        check(self.fisher_examples is None or (is_int(self.fisher_examples) and self.fisher_examples >= 1),
              f"fishmask: fisher_examples must be a positive integer or none, got {self.fisher_examples!r}")
        check(self.update in UPDATES, f"fishmask: update must be one of {', '.join(UPDATES)} (dense: T-Few's masked "
                                      f"gradients on the whole tensors; sparse: the masked entries as their own "
                                      f"parameter), got {self.update!r}")
        check(self.update != "dense" or self.weight_decay == 0,
              f"fishmask: update=dense steps the whole tensors with masked gradients (T-Few's rule), where weight "
              f"decay would shrink the unmasked entries too; use weight_decay=0 or update=sparse, got weight_decay="
              f"{self.weight_decay!r}")


@functools.cache
def _classes() -> dict:
    """update -> the parametrization class (made once, so that every masked tensor's module has the same type)."""
    import torch

    class SparseDelta(torch.nn.Module):
        """``W -> W + scatter(index, values)`` on the flattened tensor, ``values`` zero-initialised."""

        def __init__(self, weight: torch.Tensor, index: torch.Tensor):
            super().__init__()
            self.register_buffer(INDEX, index.to(device=weight.device, dtype=torch.long))
            self.values = torch.nn.Parameter(torch.zeros(index.numel(), dtype=weight.dtype, device=weight.device))

        def forward(self, weight):
            flat = weight.reshape(-1).index_add(0, getattr(self, INDEX), self.values.to(weight.dtype))
            return flat.view_as(weight)

    class MaskedEntries(torch.nn.Module):
        """``W -> W`` with the flattened entries at ``index`` replaced by ``entries`` (initialised to W's)."""

        def __init__(self, weight: torch.Tensor, index: torch.Tensor):
            super().__init__()
            index = index.to(device=weight.device, dtype=torch.long)
            self.register_buffer(INDEX, index)
            self.entries = torch.nn.Parameter(weight.detach().reshape(-1)[index].clone())

        def forward(self, weight):
            flat = weight.reshape(-1).index_copy(0, getattr(self, INDEX), self.entries.to(weight.dtype))
            return flat.view_as(weight)

        @staticmethod
        def optimizer_view(model, params: list) -> "DenseMasks":
            """:func:`harness.training.optimizer_view`'s hook: the whole tensors, masked gradients."""
            return DenseMasks(model, params)

    return {"sparse": SparseDelta, "dense": MaskedEntries}


class DenseMasks:
    """The optimizer's view of a model with ``update=dense`` masks (the interface of
    :class:`harness.master_weights.MasterWeights`): for each masked tensor a float32 copy of the whole tensor (its
    master weight), whose gradient is the tensor's gradient times the mask (:meth:`pull_grads`) and whose masked
    entries go back to ``entries`` (:meth:`push`); the model's other trainable parameters in a
    :class:`~harness.master_weights.MasterWeights`.

    The masked tensors' copies of one device and dtype are views of one flat buffer (:class:`_FlatMasks`), so that
    scattering the gradients and gathering the entries back are a few ops per step, not a few per tensor (each op
    is a kernel launch on CUDA, and small-model training is launch-bound); the numbers are those of the per-tensor
    loop."""

    def __init__(self, model, params: list):
        import torch
        from torch.nn.utils.parametrize import ParametrizationList

        from harness.master_weights import LOW_PRECISION, MasterWeights

        cls, wanted = _classes()["dense"], {id(p) for p in params}
        found: list[tuple[object, torch.Tensor]] = []  # (MaskedEntries module, the frozen tensor W0)
        seen: set[int] = set()
        for plist in model.modules():
            if not isinstance(plist, ParametrizationList):
                continue
            for m in plist:
                if isinstance(m, cls) and id(m.entries) in wanted and id(m) not in seen:  # tied: one module
                    seen.add(id(m))
                    found.append((m, plist.original))
        groups: dict[tuple, list] = {}
        for m, original in found:
            groups.setdefault((original.device, original.dtype), []).append((m, original))
        self.flats = [_FlatMasks(members, torch.float32 if dtype in LOW_PRECISION else dtype)
                      for (_, dtype), members in groups.items()]
        full_of = {id(m): full for flat in self.flats for m, full in zip(flat.modules, flat.masters)}
        self.dense: list[tuple[object, torch.Tensor]] = [(m, full_of[id(m)]) for m, _ in found]  # (module, copy)
        covered = {id(m.entries) for m, _ in self.dense}
        self.rest = MasterWeights([p for p in params if id(p) not in covered])
        self.params = self.rest.params + [full for _, full in self.dense]  # what the optimizer holds
        self.low_precision = any(m.entries.dtype in LOW_PRECISION for m, _ in self.dense)

    @property
    def active(self) -> bool:
        """Whether any parameter has a float32 master (as :attr:`MasterWeights.active`)."""
        return self.rest.active or self.low_precision

    def pull_grads(self) -> None:
        """As :meth:`MasterWeights.pull_grads`; a masked tensor's copy gets its gradient at the masked entries and
        exact zeros elsewhere (T-Few's ``param.grad *= mask``)."""
        self.rest.pull_grads()
        for flat in self.flats:
            flat.pull_grads()

    def push(self) -> None:
        """The masked entries of each updated copy back into ``entries`` (one rounding to their dtype)."""
        self.rest.push()
        for flat in self.flats:
            flat.push()

    def zero_grad(self) -> None:
        self.rest.zero_grad()
        for m, full in self.dense:
            m.entries.grad = None
            full.grad = None


class _FlatMasks:
    """The float32 copies (``masters``, in the order of ``members``) of masked tensors of one device and dtype, as
    views of one flat buffer, with the masked entries' flat indices in it (``index``): a step's gradients are one
    scatter into a fresh zero buffer (:meth:`pull_grads`) and the updated entries one gather (:meth:`push`)."""

    def __init__(self, members: list, dtype):
        import torch

        self.modules = [m for m, _ in members]
        self.entries = [m.entries for m in self.modules]
        self.shapes = [original.shape for _, original in members]
        self.sizes = [original.numel() for _, original in members]
        self.counts = [m.entries.numel() for m in self.modules]
        offsets = [0]
        for n in self.sizes[:-1]:
            offsets.append(offsets[-1] + n)
        self.index = torch.cat([getattr(m, INDEX) + start for m, start in zip(self.modules, offsets)])
        flat = torch.empty(sum(self.sizes), dtype=dtype, device=members[0][1].device)
        for view, (_, original) in zip(flat.split(self.sizes), members):  # no second copy of them all at once
            view.copy_(original.detach().reshape(-1))
        flat[self.index] = torch.cat([e.detach().reshape(-1) for e in self.entries]).to(dtype)
        self.flat = flat
        self.masters = [torch.nn.Parameter(v.view(shape)) for v, shape in zip(flat.split(self.sizes), self.shapes)]

    def pull_grads(self) -> None:
        import torch

        grads = [e.grad for e in self.entries]
        buffer = torch.zeros_like(self.flat)  # fresh each step: its views are the copies' gradients until zero_grad
        views = [v.view(shape) for v, shape in zip(buffer.split(self.sizes), self.shapes)]
        if all(g is not None for g in grads):
            buffer.index_copy_(0, self.index, torch.cat(grads).to(buffer.dtype))
            for full, view in zip(self.masters, views):
                full.grad = view
        else:  # some masked tensor had no gradient this step: its copy gets none, as the optimizer expects
            for m, full, view, grad in zip(self.modules, self.masters, views, grads):
                full.grad = None if grad is None else view.view(-1).index_copy_(
                    0, getattr(m, INDEX), grad.to(buffer.dtype)).view_as(view)
        for e in self.entries:
            e.grad = None

    def push(self) -> None:
        import torch

        with torch.no_grad():
            values = self.flat.index_select(0, self.index)
            dtypes = {e.dtype for e in self.entries}
            if len(dtypes) == 1:
                values = values.to(dtypes.pop())  # the rounding copy_ would do, once for all
            torch._foreach_copy_(self.entries, list(values.split(self.counts)))


def _owners(model) -> dict[int, list[tuple[object, str]]]:
    """id(parameter) -> every (module, attribute) holding it (tied weights: several)."""
    out: dict[int, list] = {}
    for module in model.modules():
        for attr, p in module.named_parameters(recurse=False):
            out.setdefault(id(p), []).append((module, attr))
    return out


def _attach(model, param, index, owners, update: str = "dense") -> None:
    from torch.nn.utils import parametrize

    module = _classes()[update](param, index)
    for owner, attr in owners[id(param)]:
        parametrize.register_parametrization(owner, attr, module)


def apply(model, cfg: FishMaskArgs):
    """Freeze everything; :func:`prepare` (with the training data) picks the mask and makes it trainable."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def prepare(model, tokenizer, examples, task, settings: dict, seed: int):
    """Estimate the empirical Fisher on ``examples``, keep the top ``keep_ratio`` entries, attach the
    parametrizations of ``update``; return the :class:`harness.costs.Work` of the Fisher forwards."""
    import torch

    from harness.costs import ModelDims, Work
    from harness.methods import method_config
    from harness.training import LOSS_FUNCTIONS, choice_logprobs, training_templates

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
    templates = training_templates(task, settings)
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
            _attach(model, p, keep[lo:hi] - start, owners, cfg.update)
        start = end
    return work


def restore(model, state: dict) -> None:
    """Rebuild the parametrizations of a saved mask (``...parametrizations.<attr>.original`` layout) from the
    ``saved_index`` tensors of ``state``, before the trained tensors are loaded: ``update=sparse`` where ``state``
    holds the mask's ``values`` (deltas), else ``update=dense`` (``entries``, the trained values)."""
    owners = _owners(model)
    marker = f".0.{INDEX}"
    for key, index in state.items():
        if not key.endswith(marker):
            continue
        path, attr = key[: -len(marker)].rsplit(".parametrizations.", 1)
        module = model.get_submodule(path)
        if hasattr(module, "parametrizations") and attr in module.parametrizations:
            continue  # a tied weight restored through its other owner
        update = "sparse" if key[: -len(INDEX)] + "values" in state else "dense"
        _attach(model, getattr(module, attr), index, owners, update)


def trainable_params(model, cfg: FishMaskArgs) -> int:
    """``round(keep_ratio x total parameters)`` (tied weights once), at least 1."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return max(1, round(cfg.keep_ratio * total))


register(MethodInfo(
    "fishmask", "peft", "FishMask (Sung et al. 2021): the 0.2% entries of largest empirical Fisher, fixed sparse mask",
    config_cls=FishMaskArgs, apply=apply, overhead=lambda model, cfg: Overhead(), artifact="tensors",
    family="selective", merges=True, prepare=prepare, restore=restore, trains_model_dtype=True))
