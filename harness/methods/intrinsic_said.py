"""Intrinsic SAID (Aghajanyan et al. 2021, "Intrinsic Dimensionality Explains the Effectiveness of Language Model
Fine-Tuning", arXiv 2012.13255), T-Few's structure-aware intrinsic-dimension baseline, written by hand (neither
peft nor AdapterHub has it), following r-three/t-few ``src/models/intrinsic.py`` (Aghajanyan's code) and
``configs/intrinsic_said_20k.json``.

One shared vector ``theta`` (``intrinsic_dim - m`` entries, zero at the start) and one scalar ``lambda_i`` per
adapted tensor (``m`` of them, one at the start) are the only trainable parameters: ``intrinsic_dim`` in all, as
in the paper, where the ``m`` scalars are part of the ``d`` (T-Few: ``intrinsic_dimension -= said_size + 1``).
Each tensor ``i`` gets its own random Fastfood projection ``P_i = H G Pi H B`` (Le et al. 2013; ``H``
Walsh-Hadamard, ``G`` Gaussian, ``Pi`` a permutation, ``B`` random signs, all seeded by ``projection_seed`` and
rebuilt from it), applied to ``theta`` zero-padded to ``L = 2^ceil(log2(max(len(theta), D_i)))`` entries; the first
``D_i`` outputs, scaled as T-Few scales them (norm-preserving in expectation), are the ray ``r_i``. As in T-Few's
code (``DD = np.sum(v0.size())``, not the commented-out ``np.prod``), ``D_i`` is the *sum* of the tensor's shape:

- a weight matrix ``W`` [out, in] gets the rank-1 update ``W0 + lambda_i * r_i[:out] r_i[out:]^T``;
- a vector (a norm's weight) gets ``w0 + lambda_i * r_i``.

Two deliberate differences from T-Few's code: (1) ``L`` is at least ``len(theta)``: T-Few pads ``theta`` to the
tensor's own ``L`` with ``F.pad``, which *crops* ``theta`` when the tensor is smaller (a 1,024-wide attention matrix
of T5 sees only the first 2,048 of 20,000 entries); here every entry reaches every tensor, Aghajanyan's definition
of a projection of the whole subspace. (2) The matrices are not re-materialised: a forward hook adds
``lambda_i * (x . r_in) r_out`` to the layer's output, the same function as the updated weight, at the cost of a
rank-1 adapter (no dense weight gradient, which T-Few's re-materialised weights pay: full fine-tuning's backward).
Vectors use a ``torch.nn.utils.parametrize`` parametrization.

Targets: T-Few adapts every parameter (``str_filter=set()``). Here the default is every linear layer of the model
and every norm weight (SmolLM2-135M: 7 x 30 projections + 61 RMSNorms = 271 tensors; biases, which SmolLM2 lacks,
are not adapted), everything but the embedding matrix, which SmolLM2 ties to the output projection (a rank-1
update of a 49,152-row lookup and of the logits would need both sides hooked; left out). ``targets=a|b`` (module
name suffixes) narrows it. Because the rank-1 updates are quadratic in ``theta``, their gradient is zero at
``theta = 0``: training starts through the vectors (norms), whose update is linear, as in T-Few, where the layer
norms are among all parameters. Targets without any vector therefore cannot train and are refused.

Defaults: ``intrinsic_dim=20000``, Adafactor lr 3e-2 (T-Few's ``intrinsic_said_20k.json``; ``scale_parameter``
true, T-Few's Config.py default), linear decay after 6% warmup; loss L_LM; the quick preset keeps them. With
``scale_parameter`` Adafactor steps ``theta`` by ``lr x max(1e-3, rms(theta))`` (tiny while ``theta`` is near zero)
and the lambdas by ~3% of their value: on SmolLM2-135M, 4 steps of one cb example each move the loss 2.20 ->
2.69 -> 1.04 -> 1.96. ``scale_parameter=false`` at 3e-2 diverges (loss 2.2 -> 48 -> 288): full-size steps of
the 20,000 entries of ``theta`` make rank-1 changes as large as the weights.

Costs (:class:`harness.methods.base.Overhead`): training pays, per forward, one Fastfood projection per tensor, two
Walsh-Hadamard transforms of ``L log2 L`` additions and ``2 L`` multiplies plus ``D_i`` scalings (``O(L log L)``,
``train_per_forward``; the algorithm's count: the transforms here run as Kronecker products of 32 x 32
Hadamard matmuls, ~6x those additions as FLOPs but a few BLAS calls instead of 15 passes), and per token ``2 (d_in + d_out)`` per adapted matrix for the rank-1 hook
(``train_per_token``). Inference: zero per token: the change folds into the weights (:func:`merge` does it), so a
deployed model is the base model's size and speed (we score unmerged; the hooks' FLOPs are not counted there).

Checkpoint (``tensors`` artifact): ``theta``, the lambdas and the projection seed (``saved_projection_seed``);
``restore`` checks the seed, and the projections are rebuilt from it, so a reload scores identically.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math

from harness.errors import HarnessError
from harness.methods import MethodInfo, register
from harness.methods.base import Overhead, TrainConfig, as_names, check, is_int, resolve_targets

MODULE = "intrinsic_said"  # the submodule of the model holding theta and the lambdas
SEED = "saved_projection_seed"  # buffers named saved_* are saved with the trainable tensors
FACTOR_BITS = 5  # Walsh-Hadamard transforms as Kronecker products of 32 x 32 Hadamard matrices


@dataclasses.dataclass
class IntrinsicSAIDArgs(TrainConfig):
    """Defaults (r-three/t-few ``configs/intrinsic_said_20k.json``): ``intrinsic_dim=20000`` trainable parameters
    (the shared vector plus one scalar per tensor), Adafactor lr 3e-2; ``targets=None``: every linear layer and
    norm weight except the embedding (module docstring); ``projection_seed=0`` seeds the Fastfood projections."""

    intrinsic_dim: int = 20000
    targets: tuple[str, ...] | None = None
    projection_seed: int = 0
    lr: float = 3e-2

    def __post_init__(self):
        super().__post_init__()
        check(is_int(self.intrinsic_dim) and self.intrinsic_dim >= 2,
              f"intrinsic_said: intrinsic_dim must be an integer >= 2, got {self.intrinsic_dim!r}")
        check(is_int(self.projection_seed) and 0 <= self.projection_seed < 2 ** 63,
              f"intrinsic_said: projection_seed must be a non-negative integer, got {self.projection_seed!r}")
        self.targets = as_names(self.targets, "intrinsic_said: targets")


# ------------------------------------------------------------------------------------------------ Fastfood

@functools.lru_cache(maxsize=16)
def _hadamard(n: int, dtype, device):
    import torch

    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def fwht(x):
    """Orthonormal Walsh-Hadamard transform (Sylvester order) along the last dimension (a power of two):
    ``H_n = H_a (x) H_b (x) ...``, one small factor per axis of ``x`` reshaped to ``[..., a, b, ...]``; each step
    transforms the last axis and rotates it to the front, so after all factors the axes are back in order."""
    n = x.shape[-1]
    bits = n.bit_length() - 1
    if n < 1 or 2 ** bits != n:
        raise ValueError(f"fwht: the last dimension must be a power of two, got {n}")
    sizes = [FACTOR_BITS] * (bits // FACTOR_BITS) + ([bits % FACTOR_BITS] if bits % FACTOR_BITS else [])
    y = x.reshape(-1, *[2 ** s for s in sizes])
    for _ in sizes:
        y = (y @ _hadamard(y.shape[-1], x.dtype, x.device)).movedim(-1, 1)
    return y.reshape(x.shape) / math.sqrt(n)


def fastfood_size(n_in: int, n_out: int) -> int:
    """``L``: the power of two both the input vector and the output fit in."""
    return 1 << max(1, math.ceil(math.log2(max(n_in, n_out))))


def fastfood_flops(size: int, n_out: int) -> int:
    """FLOPs of one Fastfood projection: two Walsh-Hadamard transforms (``L log2 L`` additions each), the sign and
    Gaussian multiplies (``2 L``) and the final scaling (``n_out``)."""
    return 2 * size * int(math.log2(size)) + 2 * size + n_out


@functools.cache
def _state_cls():
    import torch

    class SAIDState(torch.nn.Module):
        """``theta``, the lambdas, and per tensor the seeded Fastfood factors (not saved: rebuilt from the seed).

        All rays are computed together, once per forward (:meth:`rays`), and kept until ``theta`` or the lambdas
        change (their version counters: optimizer steps and ``load_state_dict`` bump them; a write through
        ``.data`` does not and is not seen), the grad mode changes, or a backward pass has gone through them (then
        their graph is freed)."""

        def __init__(self, sizes: list[int], n_theta: int, seed: int, device):
            super().__init__()
            self.sizes = list(sizes)
            size = fastfood_size(n_theta, max(sizes))
            gen = torch.Generator().manual_seed(seed)
            signs = (torch.randint(0, 2, (len(sizes), size), generator=gen) * 2 - 1).float()
            perms = torch.argsort(torch.rand(len(sizes), size, generator=gen), dim=1)
            gauss = torch.randn(len(sizes), size, generator=gen)
            # T-Few's normalisation: divide by sqrt(L sum G^2) sqrt(D / L) with unnormalised transforms
            scale = size / torch.sqrt(gauss.pow(2).sum(1) * torch.tensor(sizes, dtype=torch.float32))
            for name, t in (("signs", signs), ("perms", perms), ("gauss", gauss), ("scale", scale)):
                self.register_buffer(name, t.to(device), persistent=False)
            self.register_buffer(SEED, torch.tensor(seed, dtype=torch.int64, device=device))
            self.theta = torch.nn.Parameter(torch.zeros(n_theta, device=device))
            self.lambdas = torch.nn.Parameter(torch.ones(len(sizes), device=device))
            self._cache = None  # (key, rays)

        def project(self):
            """``[m, max D]``: row ``i`` holds ``r_i = P_i theta`` in its first ``sizes[i]`` entries (float32)."""
            x = torch.nn.functional.pad(self.theta, (0, self.signs.shape[1] - self.theta.shape[0]))
            x = fwht(x * self.signs)
            x = fwht(torch.gather(x, 1, self.perms) * self.gauss)
            return x[:, : max(self.sizes)] * self.scale[:, None]

        def _spent(self, grad):
            self._cache = None
            return grad

        def rays(self):
            key = (self.theta._version, self.lambdas._version, torch.is_grad_enabled(), self.theta.device)
            if self._cache is None or self._cache[0] != key:
                rays = self.project()
                if rays.requires_grad:
                    rays.register_hook(self._spent)
                self._cache = (key, rays)
            return self._cache[1]

        def ray(self, i: int):
            """``r_i`` (``sizes[i]`` entries)."""
            return self.rays()[i, : self.sizes[i]]

        def delta(self, i: int):
            """The ray of tensor ``i`` times its lambda (for a vector: its additive change)."""
            return self.lambdas[i] * self.ray(i)

        def __deepcopy__(self, memo):
            self._cache = None  # a tensor inside a graph cannot be deep-copied; the copy recomputes its rays
            new = type(self).__new__(type(self))
            memo[id(self)] = new
            new.__dict__.update(copy.deepcopy(self.__dict__, memo))
            return new

    return SAIDState


@functools.cache
def _vector_delta_cls():
    import torch

    class VectorDelta(torch.nn.Module):
        """``w -> w0 + lambda_i r_i`` for a vector (a norm's weight)."""

        def __init__(self, state, index: int):
            super().__init__()
            self._state = [state]  # a list: the shared state is not a submodule of every parametrization
            self.index = index

        def forward(self, weight):
            return weight + self._state[0].delta(self.index).to(weight.dtype)

    return VectorDelta


# ------------------------------------------------------------------------------------------------ targets

def _weight(module):
    """The stored weight of a leaf module (the original under a parametrization), or None for other modules."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations["weight"].original
    if any(name != "parametrizations" for name, _ in module.named_children()):
        return None
    return module._parameters.get("weight")


def plan(model, cfg: IntrinsicSAIDArgs) -> list[tuple[str, object, str, int, int]]:
    """(name, module, kind, rows, cols) per adapted tensor, in module order: kind ``linear`` (weight [out, in],
    rows = out), ``conv1d`` (gpt2's transposed linear, weight [in, out], rows = in) or ``vector``. Validates the
    targets against ``cfg``: at least one vector, fewer tensors than ``intrinsic_dim``."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vocab = {id(base.get_input_embeddings()), id(base.get_output_embeddings())}
    vocab_weights = {id(_weight(m)) for m in (base.get_input_embeddings(), base.get_output_embeddings())}
    explicit = resolve_targets(base, (), cfg.targets, MODULE) if cfg.targets is not None else None
    out = []
    for name, module in base.named_modules():
        weight = _weight(module)
        if weight is None or name == MODULE or name.startswith(MODULE + "."):
            continue
        if explicit is not None and not any(name == t or name.endswith("." + t) for t in explicit):
            continue
        is_vocab = id(module) in vocab or id(weight) in vocab_weights
        kind = ("linear" if isinstance(module, torch.nn.Linear) else "conv1d" if type(module).__name__ == "Conv1D"
                else "vector" if weight.dim() == 1 else None)
        if is_vocab or kind is None:
            if explicit is not None:
                what = "the embedding / output projection" if is_vocab else f"a {type(module).__name__}"
                raise HarnessError(f"intrinsic_said: target {name} is {what}; only linear layers and 1-D weights "
                                   "(norms) can be adapted")
            continue
        rows = weight.shape[0]
        out.append((name, module, kind, rows, weight.shape[1] if weight.dim() == 2 else 0))
    n_vectors = sum(kind == "vector" for _, _, kind, _, _ in out)
    check(n_vectors > 0, "intrinsic_said: the targets hold no vector (norm weight): the rank-1 updates of weight "
                         "matrices have zero gradient at the zero start, so nothing would train; add a norm "
                         "(e.g. targets=...|input_layernorm) or leave targets out")
    check(len(out) < cfg.intrinsic_dim,
          f"intrinsic_said: intrinsic_dim {cfg.intrinsic_dim} must exceed the number of adapted tensors ({len(out)}): "
          "it counts the shared vector plus one scalar per tensor")
    return out


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


def apply(model, cfg: IntrinsicSAIDArgs):
    """Freeze the model, add the shared state as ``model.intrinsic_said``, hook the matrices and parametrize the
    vectors."""
    from torch.nn.utils import parametrize

    targets = plan(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    sizes = [rows + cols for _, _, _, rows, cols in targets]
    state = _state_cls()(sizes, cfg.intrinsic_dim - len(targets), cfg.projection_seed, device)
    model.add_module(MODULE, state)
    for index, (_, module, kind, rows, _) in enumerate(targets):
        if kind == "vector":
            parametrize.register_parametrization(module, "weight", _vector_delta_cls()(state, index))
        else:
            setattr(module, HOOK, [state, index, rows, kind])
            module.register_forward_hook(_linear_hook)
    return model


def merge(model) -> None:
    """Fold the trained change into the weights, in place, and remove the method (hooks, parametrizations, state):
    the deployed model has the base model's size and speed, no overhead per token."""
    import torch
    from torch.nn.utils import parametrize

    state = getattr(model, MODULE)
    with torch.no_grad():
        for module in list(model.modules()):
            if parametrize.is_parametrized(module, "weight") and isinstance(
                    module.parametrizations["weight"][0], _vector_delta_cls()):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            elif hasattr(module, HOOK):
                _, index, rows, kind = getattr(module, HOOK)
                ray = state.ray(index)
                first, second = ray[:rows] * state.lambdas[index], ray[rows:]
                module.weight.add_(torch.outer(first, second).to(module.weight.dtype))
                for key, hook in list(module._forward_hooks.items()):
                    if hook is _linear_hook:
                        del module._forward_hooks[key]
                delattr(module, HOOK)
    delattr(model, MODULE)


def restore(model, saved: dict) -> None:
    """Before the saved tensors load: check they were trained with this model's targets and projection seed."""
    state = getattr(model, MODULE, None)
    if state is None:
        raise HarnessError("intrinsic_said: apply the method before loading its tensors")
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
    """``intrinsic_dim``: the shared vector (``intrinsic_dim - m``) plus one lambda per adapted tensor (``m``)."""
    plan(model, cfg)
    return cfg.intrinsic_dim


def overhead(model, cfg: IntrinsicSAIDArgs) -> Overhead:
    """Training only (module docstring): per forward one Fastfood projection per tensor and the vectors' adds; per
    token ``2 (d_in + d_out)`` per hooked matrix. Inference: 0 (merged)."""
    targets = plan(model, cfg)
    sizes = [rows + cols for _, _, _, rows, cols in targets]
    size = fastfood_size(cfg.intrinsic_dim - len(targets), max(sizes))
    per_forward = sum(fastfood_flops(size, d) for d in sizes)
    per_forward += sum(rows for _, _, kind, rows, _ in targets if kind == "vector")
    per_token = sum(2 * (rows + cols) for _, _, kind, rows, cols in targets if kind != "vector")
    return Overhead(train_per_token=per_token, train_per_forward=per_forward)


register(MethodInfo(
    "intrinsic_said", "peft", "intrinsic SAID (Aghajanyan et al. 2021): 20k-dim Fastfood subspace + one scale per "
    "tensor", config_cls=IntrinsicSAIDArgs, apply=apply, overhead=overhead, artifact="tensors",
    family="reparametrization", merges=True, restore=restore))
