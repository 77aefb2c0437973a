"""Adafactor for few-shot PEFT training: transformers' update, without its per-parameter kernel storm.

T-Few (r-three/t-few ``src/utils/get_optimizer.py``) trains with ``transformers.Adafactor(params, lr=config.lr,
weight_decay=config.weight_decay, scale_parameter=config.scale_parameter, relative_step=False,
warmup_init=False)``: a fixed learning rate (given by the schedule), no first moment (``beta1=None``), and
parameter scaling on or off per method (``scale_parameter``: True by default in ``src/utils/Config.py``, False in
the prompt-tuning configs). :func:`harness.training.make_optimizer` uses transformers' class itself on the CPU and
this one on CUDA; ``tests/test_optim.py`` checks that both give the same parameters after every step.

``torch.optim.Adafactor`` (torch >= 2.5) is not the same optimizer and is not used: it always takes a relative
step ``min(lr, 1 / sqrt(t))`` and always scales it by ``max(eps2, RMS(param))`` (no ``scale_parameter=False``, no
``relative_step=False``: prompt tuning's lr 0.3 would be capped at ``1 / sqrt(t)`` from step 12 on), it clamps the
second-moment estimate at ``eps1**2`` instead of adding ``eps1`` to ``grad**2``, normalizes the factored row
statistic differently, and decays weights by ``1 - lr * weight_decay``. Its second-moment decay is the same,
``beta2_t = 1 - t**-0.8``.

``transformers.optimization.Adafactor`` loops over parameters in Python and launches ~20-30 small CUDA kernels per
parameter per step; with many small parameters the training step is host-bound. This
class computes the same update for T-Few's configuration (``relative_step=False, warmup_init=False, beta1=None``,
``scale_parameter`` either way), but the unfactored (< 2-D) parameters of a group that share device, dtype and
step count are updated together: laid end to end in flat buffers (their ``exp_avg_sq`` states are views of one),
with per-parameter RMS from one ``torch._foreach_norm`` and the result written back by one ``torch._foreach_copy_``.
The number of ops of one step does not depend on how many such parameters there are (18 ops, 20 for 16-bit
parameters; ``scale_parameter=True`` adds 8 for the parameters' RMS, 11 with weight decay: counted in
``tests/test_optim.py``). Factored (>= 2-D) parameters of one shape (and device, dtype, step count) are stacked
as ``[M, rows, cols]`` and updated in one pass with every reduction per slice (:func:`factored_update_`: bit for bit
the per-parameter update on the CPU), so their ops do not grow with M either. Note that peft stores (IA)^3's
vectors as 2-D (``[d_out, 1]`` for keys/values, ``[1, d_in]`` for the feed-forward), so HF, T-Few's setting and
this class all factor them (the factored estimate of a ``[d, 1]`` tensor equals the unfactored one up to
rounding): the 90 vectors of SmolLM2-135M are two stacks (``[60, 192, 1]``, ``[30, 1, 1536]``), 80 ops a
step (counted: docs/benchmarks.md) instead of 28 for each vector. Treating them as 1-D
would save launches but change the numbers at rounding level, and with them every stored (IA)^3 result.

The numerics follow HF op for op: float32 compute and moments for 16-bit parameters, ``beta2t = 1 -
step**decay_rate``, a second moment of ``grad**2 + eps[0]`` (factored into row/column means for >= 2-D
parameters), ``update = rsqrt(second moment) * grad``, divided by ``max(1, rms(update) / clip_threshold)``, times
the step size ``lr`` (with ``scale_parameter``: ``lr * max(eps[1], rms(param))``, the parameter's RMS before the
update, as HF's ``state["RMS"]``); then ``p += p * (-weight_decay * step size)`` and ``p -= update``. On the CPU
the parameters and states are bit-identical to HF's (weight decay with ``scale_parameter=True`` and parameters
whose RMS is below ``eps[1]`` aside: there the step size is rounded differently, within 1e-6); on CUDA within
float32 rounding. HF's ``state["RMS"]`` is not kept. ``lr`` is read from ``group["lr"]`` each step, so
learning-rate schedulers work; nothing in ``step()`` waits for the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def factored_update_(p32: torch.Tensor, grad: torch.Tensor, row: torch.Tensor, col: torch.Tensor, step: int,
                     group: dict[str, Any]) -> None:
    """HF's Adafactor update of M >= 2-D parameters stacked along dim 0, each slice as its own parameter (every
    reduction taken per slice), in place: p32 and grad [M, ..., rows, cols] (float32 or float64), the second-moment
    statistics row [M, ..., rows] and col [M, ..., cols]. HF's ops minus the unused ones; on the CPU bit for bit
    the same as one parameter at a time (``tests/test_optim.py``). Also the step of
    :class:`harness.packed_optim.SlicedAdafactor`, whose stacked groups are slices too."""
    lr, wd, clip, eps = group["lr"], group["weight_decay"], group["clip_threshold"], group["eps"]
    beta2t = 1.0 - math.pow(step, group["decay_rate"])
    dims, sqrt_numel = tuple(range(1, p32.dim())), math.prod(p32.shape[1:]) ** 0.5
    per_slice = (-1,) + (1,) * (p32.dim() - 1)  # a [M] vector viewed against [M, ..., rows, cols]
    update = torch.mul(grad, grad).add_(eps[0])
    row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
    col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
    step_size = lr
    if group["scale_parameter"]:  # HF's _get_lr: max(eps[1], RMS of the parameter before the update) * lr
        rms = torch.linalg.vector_norm(p32, 2, dim=dims).div_(sqrt_numel)  # [M]; torch.where: no wait for the device
        step_size = torch.where(rms > eps[1], rms * lr, rms.new_full((), eps[1] * lr)).view(per_slice)
    r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)  # [M, ..., rows, 1]
    c_factor = col.unsqueeze(-2).rsqrt()  # [M, ..., 1, cols]
    update = torch.mul(r_factor, c_factor).mul_(grad)
    denom = torch.linalg.vector_norm(update, 2, dim=dims).div_(sqrt_numel)  # [M], the update's RMS
    if clip != 1.0:
        denom.div_(clip)
    update.div_(denom.clamp_(min=1.0).view(per_slice)).mul_(step_size)
    if wd != 0 and group["scale_parameter"]:  # HF: p.add_(p, alpha=-wd * step size), a tensor here
        p32.add_(p32 * step_size.mul(-wd))
    elif wd != 0:
        p32.add_(p32, alpha=-wd * lr)
    p32.sub_(update)


def stacked_update_(params: list[torch.Tensor], states: list[dict[str, Any]], keys: Iterable[str],
                    update: Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], None], *,
                    slices_in_params: bool = False) -> None:
    """Run ``update(p32, grad, moments)`` once for P parameters of one shape and dtype, then write the results back.

    The parameters, their grads and their states' ``keys`` are stacked along a new dim 0 ([P, ...]), or, with
    ``slices_in_params`` (packed [N, ...] tensors, :mod:`harness.packed_optim`), joined along their own dim 0
    ([P x N, ...]); ``update`` treats every index of dim 0 as its own parameter and updates p32 and the moments in
    place. One tensor is viewed, not copied; 16-bit parameters are updated as float32 and rounded back."""
    keys = tuple(keys)

    def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
        if len(tensors) == 1:
            return tensors[0] if slices_in_params else tensors[0].unsqueeze(0)
        stacked = torch.stack(tensors)
        return stacked.flatten(0, 1) if slices_in_params else stacked

    def unstack(t: torch.Tensor) -> list[torch.Tensor]:
        return list((t.unflatten(0, (len(params), -1)) if slices_in_params else t).unbind(0))

    grad = stack([p.grad for p in params])
    grad = grad.float() if grad.dtype in _LOW_PRECISION else grad
    stacked_p = stack(params)
    p32 = stacked_p.float() if stacked_p.dtype in _LOW_PRECISION else stacked_p
    moments = {k: stack([s[k] for s in states]) for k in keys}
    update(p32, grad, moments)
    if len(params) > 1:  # the stacks are copies: write them back
        torch._foreach_copy_(params, unstack(p32))
        for k in keys:
            torch._foreach_copy_([s[k] for s in states], unstack(moments[k]))
    elif p32 is not stacked_p:
        stacked_p.copy_(p32)


class _Flat:
    """N < 2-D parameters laid end to end (T elements): their second moments live in one (T,) buffer, of which the
    per-parameter ``state["exp_avg_sq"]`` are views, and reusable (T,) buffers for the update and the parameter.
    """

    def __init__(self, params: list[torch.Tensor], state: dict[torch.Tensor, dict[str, Any]]) -> None:
        self.params = params
        sizes = [p.numel() for p in params]  # N sizes n_i, summing to T
        self.v = torch.cat([state[p]["exp_avg_sq"].reshape(-1) for p in params])  # (T,) second moments
        for p, view in zip(params, self.v.split(sizes)):
            state[p]["exp_avg_sq"] = view.view(p.shape)
        self.v_views = [state[p]["exp_avg_sq"] for p in params]
        self.u, self.p32 = torch.empty_like(self.v), torch.empty_like(self.v)  # (T,) update, float32 param
        self.u_views, self.p32_views = self.u.split(sizes), self.p32.split(sizes)
        # (T,) index of each element's parameter, (N,) sqrt(numel) as HF's ``numel ** 0.5``: non-blocking uploads
        ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        self.segment_ids = ids.to(self.v.device, non_blocking=True)
        self.sqrt_numel = torch.tensor([n**0.5 for n in sizes], dtype=self.v.dtype).to(self.v.device, non_blocking=True)

    def holds(self, params: list[torch.Tensor], state: dict[torch.Tensor, dict[str, Any]]) -> bool:
        """Same parameters, and their state still the views (a load_state_dict replaces it)."""
        return len(params) == len(self.params) and all(
            p is q and state[p]["exp_avg_sq"] is v for p, q, v in zip(params, self.params, self.v_views))


class Adafactor(torch.optim.Optimizer):
    """transformers' Adafactor with ``relative_step=False, warmup_init=False, beta1=None``: a fixed ``lr`` (set by
    the schedule), no first moment; ``scale_parameter`` as transformers' (default True, as there)."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float,
                 weight_decay: float = 0.0, eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0,
                 decay_rate: float = -0.8, scale_parameter: bool = True) -> None:
        if lr is None or lr < 0.0:
            raise ValueError(f"Adafactor needs a learning rate >= 0, got {lr!r}")
        if not isinstance(scale_parameter, bool):
            raise ValueError(f"scale_parameter must be True or False, got {scale_parameter!r}")
        defaults = {"lr": lr, "weight_decay": weight_decay, "eps": eps, "clip_threshold": clip_threshold,
                    "decay_rate": decay_rate, "scale_parameter": scale_parameter}
        super().__init__(params, defaults)
        # (group index, device, param dtype, grad dtype) -> that bucket's flat buffers, rebuilt when its params change
        self._flats: dict[tuple[Any, ...], _Flat] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            buckets: dict[tuple[torch.device, torch.dtype, torch.dtype, int], list[torch.Tensor]] = {}
            factored: dict[tuple[Any, ...], list[torch.Tensor]] = {}  # ... and shape: stacked, one pass each
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients.")
                state = self.state[p]
                if not state:
                    self._init_state(grad, state)
                state["step"] += 1
                if grad.dim() >= 2:
                    factored.setdefault((p.device, p.dtype, grad.dtype, state["step"], p.shape), []).append(p)
                else:
                    buckets.setdefault((p.device, p.dtype, grad.dtype, state["step"]), []).append(p)
            for (device, dtype, grad_dtype, step), params in buckets.items():
                self._unfactored_step(params, step, (index, device, dtype, grad_dtype), group)
            for (_, _, _, step, _), params in factored.items():
                self._factored_step(params, step, group)
        return loss

    @staticmethod
    def _init_state(grad: torch.Tensor, state: dict[str, Any]) -> None:
        state["step"] = 0
        kw = {"dtype": _compute_dtype(grad.dtype), "device": grad.device}
        shape = grad.shape
        if len(shape) >= 2:
            state["exp_avg_sq_row"] = torch.zeros(shape[:-1], **kw)  # (..., rows)
            state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], **kw)  # (..., cols)
        else:
            state["exp_avg_sq"] = torch.zeros(shape, **kw)  # like p

    def _factored_step(self, params: list[torch.Tensor], step: int, group: dict[str, Any]) -> None:
        """HF's update for M >= 2-D parameters of one shape, device, dtype and step count, stacked as [M, ...]."""
        stacked_update_(params, [self.state[p] for p in params], ("exp_avg_sq_row", "exp_avg_sq_col"),
                        lambda p32, grad, m: factored_update_(p32, grad, m["exp_avg_sq_row"], m["exp_avg_sq_col"],
                                                              step, group))

    def _unfactored_step(self, params: list[torch.Tensor], step: int, key: tuple[Any, ...],
                         group: dict[str, Any]) -> None:
        """HF's update for N < 2-D parameters of one device, dtype and step count, on flat (T,) buffers."""
        lr, wd, clip = group["lr"], group["weight_decay"], group["clip_threshold"]
        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        flat = self._flats.get(key)
        if flat is None or not flat.holds(params, self.state):  # first step, or new parameters or state
            flat = self._flats[key] = _Flat(params, self.state)
        params_1d = list(torch.atleast_1d(params))  # N tensors (n_i,): 0-d ones viewed as (1,)
        grad = torch.cat(torch.atleast_1d([p.grad for p in params])).to(flat.v.dtype)  # (T,), float32 for 16-bit
        if params[0].dtype == flat.v.dtype:  # (T,); cat's out= with another dtype would copy tensor by tensor on CUDA
            p32 = torch.cat(params_1d, out=flat.p32)
        else:
            p32 = flat.p32.copy_(torch.cat(params_1d))
        update = torch.mul(grad, grad).add_(group["eps"][0])  # grad**2 + eps[0]
        flat.v.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
        if group["scale_parameter"]:
            # HF's _get_lr per parameter: RMS(param) * lr where RMS > eps[1], else eps[1] * lr (a Python float
            # there, rounded to float32 by the multiply), as one (N,) vector
            rms = torch.stack(torch._foreach_norm(flat.p32_views)).div_(flat.sqrt_numel)
            eps2 = group["eps"][1]
            step_size = torch.where(rms > eps2, rms * lr, rms.new_full((), eps2 * lr))  # (N,)
        update = torch.rsqrt(flat.v, out=flat.u).mul_(grad)
        # per-parameter max(1, rms / clip) as one (N,) vector, then broadcast to the (T,) elements by one gather
        denom = torch.stack(torch._foreach_norm(flat.u_views)).div_(flat.sqrt_numel)
        if clip != 1.0:
            denom.div_(clip)
        update.div_(denom.clamp_(min=1.0).index_select(0, flat.segment_ids))
        if group["scale_parameter"]:
            update.mul_(step_size.index_select(0, flat.segment_ids))
            if wd != 0:  # HF: p.add_(p, alpha=-wd * step size), one step size per parameter
                p32.add_(p32 * step_size.mul(-wd).index_select(0, flat.segment_ids))
        else:
            update.mul_(lr)
            if wd != 0:
                p32.add_(p32, alpha=-wd * lr)
        p32.sub_(update)
        torch._foreach_copy_(params_1d, flat.p32_views)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The base-class load, then float32 moments back for 16-bit parameters (torch casts state to their dtype)."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            if p.dtype in _LOW_PRECISION:
                for key, value in state_dict["state"].get(i, {}).items():
                    if torch.is_tensor(value):
                        self.state[p][key] = value.to(device=p.device, dtype=torch.float32)
