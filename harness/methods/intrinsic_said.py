"""Intrinsic SAID (Aghajanyan et al. 2021, "Intrinsic Dimensionality Explains the Effectiveness of Language Model
Fine-Tuning", arXiv 2012.13255), T-Few's structure-aware intrinsic-dimension baseline, written by hand (neither
peft nor AdapterHub has it), following r-three/t-few ``src/models/intrinsic.py`` (Aghajanyan's code) and
``configs/intrinsic_said_20k.json``.

One shared vector ``theta`` (``intrinsic_dim - m`` entries, zero at the start) and one scalar ``lambda_i`` per
adapted tensor (``m`` of them, one at the start) are the only trainable parameters: ``intrinsic_dim`` in all, as
in the paper, where the ``m`` scalars are part of the ``d`` (T-Few: ``intrinsic_dimension -= said_size + 1``).
Each tensor ``i`` gets its own seeded Fastfood projection of ``theta`` (:mod:`harness.methods.fastfood`), whose
first ``D_i`` outputs are the ray ``r_i``. ``update`` chooses ``D_i`` for a matrix ``W`` [rows, cols]:

- ``rank1`` (default; T-Few's code, ``DD = np.sum(v0.size())``, not the commented-out ``np.prod``): ``D_i = rows +
  cols`` and ``W0 + lambda_i r_i[:rows] r_i[rows:]^T``, a rank-1 update;
- ``full`` (Aghajanyan et al.'s definition, ``np.prod``): ``D_i = rows x cols`` and ``W0 + lambda_i r_i`` reshaped
  to ``W``'s shape, a dense update of the whole matrix;
- a vector (a norm's weight) gets ``w0 + lambda_i r_i`` in both.

Two deliberate differences from T-Few's code: (1) ``L_i`` is at least ``len(theta)``: T-Few pads ``theta`` to the
tensor's own ``L`` with ``F.pad``, which *crops* ``theta`` when the tensor is smaller (a 1,024-wide attention matrix
of T5 sees only the first 2,048 of 20,000 entries); here every entry reaches every tensor, Aghajanyan's definition
of a projection of the whole subspace. (2) Under ``rank1`` the matrices are not re-materialised: a forward hook
adds ``lambda_i (x . r_in) r_out`` to the layer's output, the same function as the updated weight, at the cost of
a rank-1 adapter (no dense weight gradient, which T-Few's re-materialised weights pay: full fine-tuning's
backward). Under ``full`` the matrices are re-materialised, as in T-Few, through a ``torch.nn.utils.parametrize``
parametrization ``W0 + lambda_i r_i``; vectors always use one.

Targets: T-Few adapts every parameter (``str_filter=set()``). Here the default is every linear layer of the model
and every norm weight (SmolLM2-135M: 7 x 30 projections + 61 RMSNorms = 271 tensors; biases, which SmolLM2 lacks,
are not adapted), everything but the embedding matrix. ``embedding=true`` adds it (one tensor more, 272 on
SmolLM2): the lookup through a hook (``rank1``: ``E[id] + lambda r_rows[id] r_cols``, times a Gemma-style
``embed_scale``) or the parametrization (``full``); a tied output projection shares the tensor (same ray and
lambda: the hook ``lambda (h . r_cols) r_rows`` or the same parametrization), an untied one is a tensor of its own.
``targets=a|b`` (module name suffixes) narrows it. Because rank-1 updates are quadratic in ``theta``, their
gradient is zero at ``theta = 0``: training starts through the vectors (norms), whose update is linear, as in T-Few,
where the layer norms are among all parameters (``full`` updates are linear in ``theta`` too). Targets without any
vector are refused.

Defaults: ``intrinsic_dim=20000``, ``update=rank1``, ``embedding=false``, Adafactor lr 3e-2 (T-Few's
``intrinsic_said_20k.json``; ``scale_parameter`` true, T-Few's Config.py default), linear decay after 6% warmup;
loss L_LM; the quick preset keeps them. The two options are left out of the settings at their defaults
(``LATER_ARGS``), so runs stored before they existed keep their ids. With ``scale_parameter`` Adafactor steps
``theta`` by ``lr x max(1e-3, rms(theta))`` (tiny while ``theta`` is near zero) and the lambdas by ~3% of their
value: on SmolLM2-135M, 4 steps of one cb example each move the loss 2.20 -> 2.69 -> 1.04 -> 1.96.
``scale_parameter=false`` at 3e-2 diverges (loss 2.2 -> 48 -> 288): full-size steps of the 20,000 entries of
``theta`` make rank-1 changes as large as the weights.

Costs (:class:`harness.methods.base.Overhead`, training only; inference 0: the change folds into the weights,
:func:`merge`, so a deployed model is the base model's size and speed; we score unmerged, and the hooks' FLOPs are
not counted there). Per forward, one Fastfood projection per tensor (``fastfood_flops``: two Walsh-Hadamard
transforms of ``L log2 L`` additions, ``2 L`` multiplies, ``D_i`` scalings; the algorithm's count: the transforms
here run as Kronecker products of 32 x 32 Hadamard matmuls, ~6x those additions as FLOPs but a few BLAS calls
instead of 15 passes) and the vectors' adds (``train_per_forward``). ``rank1``: ``2 (d_in + d_out)`` per token and
hooked matrix (``train_per_token``), ``2 d`` per token for the embedding lookup, ``2 (V + d)`` per projected
position for an output projection (``train_per_logit``); all with the usual backward (x3). ``full``: one ``L_i``
per tensor size (``L = 2^20`` for a 576 x 1536 matrix; the rank-1 default shares one ``L = 32,768``), per forward
``2 rows cols`` per use of a matrix (``lambda r`` and the re-materialised ``W0 + lambda r``; a tied output
projection re-materialises it once more), no extra forward per token, and in the backward the dense weight
gradient ``2 rows cols`` per token and matrix (``train_backward_per_token``; per projected position for the output
projection, ``train_backward_per_logit``; an embedding lookup's is a scatter, 0): full fine-tuning's weight
gradients, with ``intrinsic_dim`` trainable parameters. The lambdas' scalings of the hooks' rays (``rows`` per call
and hooked module) are not counted. Memory, ``full``: the projection factors, 16 bytes per entry of every ``L_i``
(``fastfood.factor_bytes``: 2.2 GB on SmolLM2-135M, 2.7 GB with the embedding, against 142 MB for ``rank1``), and
per training step the dense rays, the re-materialised weights and their gradients (a few copies of the 106M
adapted matrix entries, 134M with the embedding) and the transforms' saved activations.

Checkpoint (``tensors`` artifact): ``theta``, the lambdas and the projection seed (``saved_projection_seed``); a
non-default variant also ``saved_variant`` (``[update is full, embedding]``; a default checkpoint is as before).
``restore`` checks the seed and the variant, and the projections are rebuilt from them, so a reload scores
identically.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

from harness.errors import HarnessError
from harness.methods import MethodInfo, register
from harness.methods.base import Overhead, TrainConfig, as_names, check, is_int, resolve_targets
from harness.methods.fastfood import (SEED, factor_bytes, fastfood_flops, fastfood_size,  # noqa: F401 (re-exported)
                                      fwht, projection_sizes, state_cls as _state_cls)

MODULE = "intrinsic_said"  # the submodule of the model holding theta and the lambdas
VARIANT = "saved_variant"  # saved with theta when an option is not the default: [update is full, embedding]
UPDATES = ("rank1", "full")


@dataclasses.dataclass
class IntrinsicSAIDArgs(TrainConfig):
    """Defaults (r-three/t-few ``configs/intrinsic_said_20k.json``): ``intrinsic_dim=20000`` trainable parameters
    (the shared vector plus one scalar per tensor), Adafactor lr 3e-2; ``targets=None``: every linear layer and
    norm weight except the embedding (module docstring); ``projection_seed=0`` seeds the Fastfood projections.

    Variants (module docstring): ``update=rank1`` (T-Few's code: ``D_i = rows + cols``, a rank-1 update per
    matrix) or ``full`` (Aghajanyan et al.: ``D_i = rows x cols``, a dense update of the whole matrix);
    ``embedding=true`` adapts the input embedding too (and, through it, a tied output projection)."""

    LATER_ARGS: ClassVar[dict] = {"update": "rank1", "embedding": False}  # runs stored before keep their ids

    intrinsic_dim: int = 20000
    targets: tuple[str, ...] | None = None
    projection_seed: int = 0
    update: str = "rank1"
    embedding: bool = False
    lr: float = 3e-2

    def __post_init__(self):
        super().__post_init__()
        check(is_int(self.intrinsic_dim) and self.intrinsic_dim >= 2,
              f"intrinsic_said: intrinsic_dim must be an integer >= 2, got {self.intrinsic_dim!r}")
        check(is_int(self.projection_seed) and 0 <= self.projection_seed < 2 ** 63,
              f"intrinsic_said: projection_seed must be a non-negative integer, got {self.projection_seed!r}")
        check(self.update in UPDATES,
              f"intrinsic_said: update must be one of {', '.join(UPDATES)} (rank-1 or dense updates of each "
              f"matrix), got {self.update!r}")
        check(isinstance(self.embedding, bool), f"intrinsic_said: embedding must be true or false, got "
                                                f"{self.embedding!r}")
        self.targets = as_names(self.targets, "intrinsic_said: targets")

    def variant(self) -> list[int] | None:
        """What the checkpoint records beyond theta, the lambdas and the seed (None: the defaults, as before)."""
        full, embedding = self.update == "full", self.embedding
        return [int(full), int(embedding)] if full or embedding else None


def describe_variant(variant) -> str:
    full, embedding = (0, 0) if variant is None else (int(v) for v in variant)
    return f"update={'full' if full else 'rank1'}, embedding={'true' if embedding else 'false'}"


@functools.cache
def _delta_cls():
    import torch

    class Delta(torch.nn.Module):
        """``w -> w0 + lambda_i r_i`` (a vector, or any tensor under the full-rank variant: ``r_i`` has its
        ``numel`` entries and takes its shape)."""

        def __init__(self, state, index: int):
            super().__init__()
            self._state = [state]  # a list: the shared state is not a submodule of every parametrization
            self.index = index

        def forward(self, weight):
            return weight + self._state[0].delta(self.index).view(weight.shape).to(weight.dtype)

    return Delta


# ------------------------------------------------------------------------------------------------ targets

def _weight(module):
    """The stored weight of a leaf module (the original under a parametrization), or None for other modules."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations["weight"].original
    if any(name != "parametrizations" for name, _ in module.named_children()):
        return None
    return module._parameters.get("weight")


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def plan(model, cfg: IntrinsicSAIDArgs) -> list[tuple[str, object, str, int, int]]:
    """(name, module, kind, rows, cols) per adapted tensor, in module order: kind ``linear`` (weight [out, in],
    rows = out), ``conv1d`` (gpt2's transposed linear, weight [in, out], rows = in), ``embedding`` (the input
    embedding [V, d], with ``embedding=true``) or ``vector``. A module whose weight is an adapted tensor's (a tied
    output projection) is not a tensor of its own (:func:`tied_uses`). Validates the targets against ``cfg``: at
    least one vector, fewer tensors than ``intrinsic_dim``."""
    import torch

    base = _base(model)
    emb_in, emb_out = base.get_input_embeddings(), base.get_output_embeddings()
    vocab = {id(emb_in), id(emb_out)}
    vocab_weights = {id(_weight(m)) for m in (emb_in, emb_out) if m is not None}
    explicit = resolve_targets(base, (), cfg.targets, MODULE) if cfg.targets is not None else None
    out, seen = [], set()
    for name, module in base.named_modules():
        weight = _weight(module)
        if weight is None or name == MODULE or name.startswith(MODULE + "."):
            continue
        if explicit is not None and not any(name == t or name.endswith("." + t) for t in explicit):
            continue
        is_vocab = id(module) in vocab or id(weight) in vocab_weights
        kind = ("embedding" if isinstance(module, torch.nn.Embedding) and weight.dim() == 2
                else "linear" if isinstance(module, torch.nn.Linear)
                else "conv1d" if type(module).__name__ == "Conv1D" else "vector" if weight.dim() == 1 else None)
        if (is_vocab and not cfg.embedding) or kind is None or (kind == "embedding" and not is_vocab):
            if explicit is not None:
                what = ("the embedding / output projection (add embedding=true)" if is_vocab and kind
                        else f"a {type(module).__name__}")
                raise HarnessError(f"intrinsic_said: target {name} is {what}; only linear layers, 1-D weights "
                                   "(norms) and, with embedding=true, the embedding can be adapted")
            continue
        if id(weight) in seen:  # a tied output projection: adapted through the embedding's tensor
            continue
        seen.add(id(weight))
        out.append((name, module, kind, weight.shape[0], weight.shape[1] if weight.dim() == 2 else 0))
    n_vectors = sum(kind == "vector" for _, _, kind, _, _ in out)
    check(n_vectors > 0, "intrinsic_said: the targets hold no vector (norm weight): the rank-1 updates of weight "
                         "matrices have zero gradient at the zero start, so nothing would train; add a norm "
                         "(e.g. targets=...|input_layernorm) or leave targets out")
    check(len(out) < cfg.intrinsic_dim,
          f"intrinsic_said: intrinsic_dim {cfg.intrinsic_dim} must exceed the number of adapted tensors ({len(out)}): "
          "it counts the shared vector plus one scalar per tensor")
    return out


def tied_uses(model, targets) -> list[tuple[str, object, int, str]]:
    """(name, module, tensor index, kind) of the modules that use an adapted tensor's weight without being its
    entry in ``targets``: a tied output projection (kind ``linear``) shares the input embedding's tensor."""
    import torch

    index = {id(_weight(module)): i for i, (_, module, _, _, _) in enumerate(targets)}
    mine = {id(module) for _, module, _, _, _ in targets}
    out = []
    for name, module in _base(model).named_modules():
        weight = _weight(module)
        if weight is not None and id(module) not in mine and id(weight) in index:
            kind = "linear" if isinstance(module, torch.nn.Linear) else "embedding"
            out.append((name, module, index[id(weight)], kind))
    return out


def tensor_sizes(targets, update: str) -> list[int]:
    """``D_i`` per tensor: ``rows + cols`` (rank-1, T-Few's ``np.sum``) or ``rows x cols`` (full, ``np.prod``);
    a vector's ``rows`` in both."""
    return [rows * cols if update == "full" and cols else rows + cols for _, _, _, rows, cols in targets]


HOOK = "_intrinsic_said"  # on a hooked module: [state, index, rows, kind] (a list, so deep copies follow the model)


def _linear_hook(module, args, output):
    """``y + lambda_i (x . r_in) r_out``: the output of the rank-1-updated weight."""
    state, index, rows, kind = getattr(module, HOOK)
    ray = state.ray(index)
    first, second = ray[:rows] * state.lambdas[index], ray[rows:]
    # linear: W [out, in] += first second^T, so y += (x . second) first; conv1d: W [in, out], y += (x . first) second
    read, write = (second, first) if kind == "linear" else (first, second)
    x = args[0]
    return output + ((x.to(read.dtype) @ read).unsqueeze(-1) * write).to(output.dtype)


def _embedding_hook(module, args, output):
    """``E[id] + lambda_i r_rows[id] r_cols``: the lookup of the rank-1-updated embedding (times the module's
    ``embed_scale`` where it scales its output, as Gemma's does)."""
    state, index, rows, _ = getattr(module, HOOK)
    ray = state.ray(index)
    first, second = ray[:rows] * state.lambdas[index], ray[rows:]
    change = first[args[0]].unsqueeze(-1) * second
    scale = getattr(module, "embed_scale", None)
    if scale is not None:
        change = change * scale.to(change.dtype) if hasattr(scale, "to") else change * scale
    return output + change.to(output.dtype)


def _hook(module, state, index: int, rows: int, kind: str) -> None:
    setattr(module, HOOK, [state, index, rows, kind])
    module.register_forward_hook(_embedding_hook if kind == "embedding" else _linear_hook)


def apply(model, cfg: IntrinsicSAIDArgs):
    """Freeze the model, add the shared state as ``model.intrinsic_said``; rank-1: hook the matrices (and the
    embedding), parametrize the vectors; full: parametrize every adapted tensor (re-materialised weights)."""
    from torch.nn.utils import parametrize

    targets = plan(model, cfg)
    tied = tied_uses(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    sizes = tensor_sizes(targets, cfg.update)
    n_theta = cfg.intrinsic_dim - len(targets)
    lengths = projection_sizes(sizes, n_theta, shared=cfg.update == "rank1")
    state = _state_cls()(sizes, n_theta, cfg.projection_seed, device, lengths, cfg.variant())
    model.add_module(MODULE, state)
    uses = [(module, index, kind, rows) for index, (_, module, kind, rows, _) in enumerate(targets)]
    uses += [(module, index, kind, targets[index][3]) for _, module, index, kind in tied]
    for module, index, kind, rows in uses:
        if kind == "vector" or cfg.update == "full":
            parametrize.register_parametrization(module, "weight", _delta_cls()(state, index))
        else:
            _hook(module, state, index, rows, kind)
    return model


def merge(model) -> None:
    """Fold the trained change into the weights, in place, and remove the method (hooks, parametrizations, state):
    the deployed model has the base model's size and speed, no overhead per token. A tied weight is changed once."""
    import torch
    from torch.nn.utils import parametrize

    state = getattr(model, MODULE)
    done: set[int] = set()
    with torch.no_grad():
        for module in list(model.modules()):
            if parametrize.is_parametrized(module, "weight") and isinstance(
                    module.parametrizations["weight"][0], _delta_cls()):
                original = module.parametrizations["weight"].original
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=id(original) not in done)
                done.add(id(original))
            elif hasattr(module, HOOK):
                _, index, rows, kind = getattr(module, HOOK)
                if id(module.weight) not in done:
                    ray = state.ray(index)
                    first, second = ray[:rows] * state.lambdas[index], ray[rows:]
                    module.weight.add_(torch.outer(first, second).to(module.weight.dtype))
                    done.add(id(module.weight))
                for key, hook in list(module._forward_hooks.items()):
                    if hook in (_linear_hook, _embedding_hook):
                        del module._forward_hooks[key]
                delattr(module, HOOK)
    delattr(model, MODULE)


def restore(model, saved: dict) -> None:
    """Before the saved tensors load: check they were trained with this model's targets, options and projection
    seed (the projections are rebuilt from them)."""
    state = getattr(model, MODULE, None)
    if state is None:
        raise HarnessError("intrinsic_said: apply the method before loading its tensors")
    mine, theirs = getattr(state, VARIANT, None), saved.get(f"{MODULE}.{VARIANT}")
    mine, theirs = (None if v is None else [int(x) for x in v] for v in (mine, theirs))
    if mine != theirs:
        raise HarnessError(f"intrinsic_said: the checkpoint was trained with {describe_variant(theirs)}, this run "
                           f"has {describe_variant(mine)}: the projections would differ")
    for name, mine in (("theta", state.theta), ("lambdas", state.lambdas)):
        got = saved.get(f"{MODULE}.{name}")
        if got is None or tuple(got.shape) != tuple(mine.shape):
            raise HarnessError(f"intrinsic_said: the saved {name} has shape "
                               f"{None if got is None else tuple(got.shape)}, this model's {tuple(mine.shape)} "
                               "(different targets or intrinsic_dim)")
    seed = saved.get(f"{MODULE}.{SEED}")
    if seed is None or int(seed) != int(getattr(state, SEED)):
        raise HarnessError(f"intrinsic_said: the saved projection seed {None if seed is None else int(seed)} is not "
                           f"this run's {int(getattr(state, SEED))}: the projections would differ")


def trainable_params(model, cfg: IntrinsicSAIDArgs) -> int:
    """``intrinsic_dim``: the shared vector (``intrinsic_dim - m``) plus one lambda per adapted tensor (``m``), in
    every variant (``m`` counts the embedding with ``embedding=true``; a tied output projection is the same
    tensor)."""
    plan(model, cfg)
    return cfg.intrinsic_dim


def _matrix_uses(model, targets) -> list[tuple[str, int, int, bool]]:
    """(kind, rows, cols, is the output projection) per module using an adapted matrix (tied uses included)."""
    out_module = _base(model).get_output_embeddings()
    uses = [(module, kind, rows, cols) for _, module, kind, rows, cols in targets if kind != "vector"]
    uses += [(module, kind, targets[index][3], targets[index][4]) for _, module, index, kind in tied_uses(model, targets)]
    return [(kind, rows, cols, module is out_module) for module, kind, rows, cols in uses]


def overhead(model, cfg: IntrinsicSAIDArgs) -> Overhead:
    """Training only (module docstring, "Costs"); inference: 0 (merged). Per forward: one Fastfood projection per
    tensor and the vectors' adds; rank-1: per token ``2 (d_in + d_out)`` per hooked matrix (at the projected
    positions for the output projection) and ``2 d`` for the embedding lookup; full: per forward ``2 numel`` per
    use of a matrix (``lambda r`` and ``W0 + lambda r``), in the backward ``2 numel`` per token (the dense weight
    gradient; at the projected positions for the output projection; a lookup's is a scatter, 0)."""
    targets = plan(model, cfg)
    sizes = tensor_sizes(targets, cfg.update)
    lengths = projection_sizes(sizes, cfg.intrinsic_dim - len(targets), shared=cfg.update == "rank1")
    per_forward = sum(fastfood_flops(size, d) for size, d in zip(lengths, sizes))
    per_forward += sum(rows for _, _, kind, rows, _ in targets if kind == "vector")
    uses = _matrix_uses(model, targets)
    if cfg.update == "full":
        per_forward += sum(2 * rows * cols for _, rows, cols, _ in uses)
        return Overhead(train_per_forward=per_forward,
                        train_backward_per_token=sum(2 * rows * cols for kind, rows, cols, out in uses
                                                     if kind != "embedding" and not out),
                        train_backward_per_logit=sum(2 * rows * cols for _, rows, cols, out in uses if out))
    return Overhead(train_per_token=sum(2 * cols if kind == "embedding" else 2 * (rows + cols)
                                        for kind, rows, cols, out in uses if not out),
                    train_per_forward=per_forward,
                    train_per_logit=sum(2 * (rows + cols) for _, rows, cols, out in uses if out))


register(MethodInfo(
    "intrinsic_said", "peft", "intrinsic SAID (Aghajanyan et al. 2021): 20k-dim Fastfood subspace + one scale per "
    "tensor", config_cls=IntrinsicSAIDArgs, apply=apply, overhead=overhead, artifact="tensors",
    family="reparametrization", merges=True, restore=restore, shares_block_graph=False))
