"""The Fastfood projections of intrinsic SAID (:mod:`harness.methods.intrinsic_said`): a fast Walsh-Hadamard
transform, the projection sizes and FLOPs (pure functions), and the module holding ``theta``, the lambdas and
the seeded projection factors.

Each adapted tensor ``i`` has its own random Fastfood projection ``P_i = H G Pi H B`` (Le et al. 2013; ``H``
Walsh-Hadamard, ``G`` Gaussian, ``Pi`` a permutation, ``B`` random signs), applied to ``theta`` zero-padded to a
power of two ``L_i``; the first ``D_i`` outputs, scaled as T-Few scales them (norm-preserving in expectation), are
the ray ``r_i``. Tensors with the same ``L`` are projected together (one group, one stacked set of factors): the
rank-1 default has one ``L`` for all tensors, the full-rank variant one per tensor size (:func:`projection_sizes`).
All factors are drawn from one generator seeded by ``projection_seed``, group after group, so the projections are
rebuilt from the seed alone.

This module imports torch lazily (the method registry imports :mod:`harness.methods.intrinsic_said`).
"""

from __future__ import annotations

import copy
import functools
import math

FACTOR_BITS = 5  # Walsh-Hadamard transforms as Kronecker products of 32 x 32 Hadamard matrices
SEED = "saved_projection_seed"  # buffers named saved_* are saved with the trainable tensors


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


def projection_sizes(sizes: list[int], n_theta: int, shared: bool) -> list[int]:
    """``L_i`` per tensor of ``D_i = sizes[i]`` outputs: one ``L`` for all (``shared``: the rank-1 default, where
    the largest ``D_i`` sets it) or each tensor's own (the full-rank variant, where ``D_i`` spans 10^3 to 10^7)."""
    if shared:
        return [fastfood_size(n_theta, max(sizes))] * len(sizes)
    return [fastfood_size(n_theta, d) for d in sizes]


def fastfood_flops(size: int, n_out: int) -> int:
    """FLOPs of one Fastfood projection: two Walsh-Hadamard transforms (``L log2 L`` additions each), the sign and
    Gaussian multiplies (``2 L``) and the final scaling (``n_out``)."""
    return 2 * size * int(math.log2(size)) + 2 * size + n_out


def factor_bytes(lengths: list[int]) -> int:
    """Memory of the projection factors: per entry of each ``L_i`` a float32 sign, an int64 permutation index and
    a float32 Gaussian (16 bytes)."""
    return 16 * sum(lengths)


def _groups(lengths: list[int]) -> list[tuple[int, list[int]]]:
    """(L, tensor indices) per distinct ``L``, in order of first appearance."""
    out: dict[int, list[int]] = {}
    for i, size in enumerate(lengths):
        out.setdefault(size, []).append(i)
    return list(out.items())


@functools.cache
def state_cls():
    import torch

    class SAIDState(torch.nn.Module):
        """``theta``, the lambdas, and per group of tensors the seeded Fastfood factors (not saved: rebuilt from
        the seed). ``variant``: a saved buffer ``saved_variant`` recording non-default options (None: defaults,
        nothing more is saved).

        All rays are computed together, once per forward (:meth:`rays`), and kept until ``theta`` or the lambdas
        change (their version counters: optimizer steps and ``load_state_dict`` bump them; a write through
        ``.data`` does not and is not seen), the grad mode changes, or a backward pass has gone through them (then
        their graph is freed)."""

        def __init__(self, sizes: list[int], n_theta: int, seed: int, device, lengths: list[int] | None = None,
                     variant: list[int] | None = None):
            super().__init__()
            self.sizes = list(sizes)
            lengths = lengths or projection_sizes(self.sizes, n_theta, shared=True)
            gen = torch.Generator().manual_seed(seed)
            self.groups = _groups(lengths)
            self.where = [(0, 0)] * len(sizes)  # tensor -> (group, row in the group)
            for g, (size, members) in enumerate(self.groups):
                for row, i in enumerate(members):
                    self.where[i] = (g, row)
                signs = (torch.randint(0, 2, (len(members), size), generator=gen) * 2 - 1).float()
                perms = torch.argsort(torch.rand(len(members), size, generator=gen), dim=1)
                gauss = torch.randn(len(members), size, generator=gen)
                # T-Few's normalisation: divide by sqrt(L sum G^2) sqrt(D / L) with unnormalised transforms
                dims = torch.tensor([self.sizes[i] for i in members], dtype=torch.float32)
                scale = size / torch.sqrt(gauss.pow(2).sum(1) * dims)
                for name, t in (("signs", signs), ("perms", perms), ("gauss", gauss), ("scale", scale)):
                    self.register_buffer(self._name(name, g), t.to(device), persistent=False)
            self.register_buffer(SEED, torch.tensor(seed, dtype=torch.int64, device=device))
            if variant is not None:
                self.register_buffer("saved_variant", torch.tensor(variant, dtype=torch.int64, device=device))
            self.theta = torch.nn.Parameter(torch.zeros(n_theta, device=device))
            self.lambdas = torch.nn.Parameter(torch.ones(len(sizes), device=device))
            self._cache = None  # (key, rays per group)

        @staticmethod
        def _name(name: str, group: int) -> str:
            return name if group == 0 else f"{name}_{group}"

        def project_group(self, g: int):
            """``[n_g, max D]``: row ``k`` holds the ray of the group's ``k``-th tensor in its first ``D`` entries."""
            signs, perms, gauss, scale = (getattr(self, self._name(n, g)) for n in ("signs", "perms", "gauss", "scale"))
            x = torch.nn.functional.pad(self.theta, (0, signs.shape[1] - self.theta.shape[0]))
            x = fwht(x * signs)
            x = fwht(torch.gather(x, 1, perms) * gauss)
            return x[:, : max(self.sizes[i] for i in self.groups[g][1])] * scale[:, None]

        def project(self):
            """The rays of a single group (the rank-1 default): ``[m, max D]`` (float32)."""
            if len(self.groups) != 1:
                raise ValueError(f"project(): {len(self.groups)} projection groups; use project_group()")
            return self.project_group(0)

        def _spent(self, grad):
            self._cache = None
            return grad

        def rays(self):
            key = (self.theta._version, self.lambdas._version, torch.is_grad_enabled(), self.theta.device)
            if self._cache is None or self._cache[0] != key:
                rays = [self.project_group(g) for g in range(len(self.groups))]
                for r in rays:
                    if r.requires_grad:
                        r.register_hook(self._spent)
                self._cache = (key, rays)
            return self._cache[1]

        def ray(self, i: int):
            """``r_i`` (``sizes[i]`` entries)."""
            g, row = self.where[i]
            return self.rays()[g][row, : self.sizes[i]]

        def delta(self, i: int):
            """The ray of tensor ``i`` times its lambda (for a vector or a full-rank update: its additive change)."""
            return self.lambdas[i] * self.ray(i)

        def __deepcopy__(self, memo):
            self._cache = None  # a tensor inside a graph cannot be deep-copied; the copy recomputes its rays
            new = type(self).__new__(type(self))
            memo[id(self)] = new
            new.__dict__.update(copy.deepcopy(self.__dict__, memo))
            return new

    return SAIDState
