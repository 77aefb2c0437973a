"""The optimizer step of a packed training (:mod:`harness.packed`): N groups' tensors stacked as [N, ...], each
slice updated exactly as its group's own optimizer would update it alone, in one pass for all groups.

- AdamW (LoRA) is elementwise: ``torch.optim.AdamW`` over the stacked tensors is N separate AdamWs (the step count
  is shared: every group steps together).
- Adafactor (IA3, T-Few) is not: its second moments are factored over a tensor's last two dimensions and its update
  clipping and ``scale_parameter`` step size use the RMS of the whole tensor. :class:`SlicedAdafactor` is
  transformers' ``Adafactor`` (T-Few's configuration: ``relative_step=False, warmup_init=False, beta1=None``) op
  for op with every reduction taken per slice: the same update as N transformers Adafactors, within float32
  rounding (``tests/test_packed_training.py`` compares with separate trainings).
- :func:`clip_per_group`: ``torch.nn.utils.clip_grad_norm_`` per group (the norm of the per-tensor norms of the
  group's slices), for all groups at once.

So a packed step's optimizer, clipping and norm costs do not grow with N (per adapted tensor, not per group and
tensor: on a GPU, where a small model's step is bound by kernel launches, that is what packing is for), nor with
the number of adapted tensors: tensors of one shape (SmolLM2's 60 key/value and 30 feed-forward (IA)3 vectors)
are stacked and updated in one pass (:func:`harness.optim.factored_update_` for the factored ones).
"""

from __future__ import annotations

import math

import torch

from harness.errors import HarnessError
from harness.optim import factored_update_, stacked_update_

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _slice_rms(t: torch.Tensor) -> torch.Tensor:
    """Per slice of t [N, ...]: ``norm(2) / sqrt(numel)`` as transformers' ``Adafactor._rms``, shaped [N, 1, ...]."""
    dims = tuple(range(1, t.dim()))
    rms = torch.linalg.vector_norm(t, 2, dim=dims) / (math.prod(t.shape[1:]) ** 0.5)  # [N]
    return rms.view(-1, *([1] * (t.dim() - 1)))


class SlicedAdafactor(torch.optim.Optimizer):
    """transformers' Adafactor (relative_step=False, warmup_init=False, beta1=None) on stacked [N, ...] tensors, each
    slice its own parameter (module docstring)."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, scale_parameter: bool = True,
                 eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0, decay_rate: float = -0.8):
        defaults = dict(lr=lr, weight_decay=weight_decay, scale_parameter=scale_parameter, eps=eps,
                        clip_threshold=clip_threshold, decay_rate=decay_rate)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise HarnessError("SlicedAdafactor takes no closure")
        for group in self.param_groups:
            buckets: dict[tuple, list[torch.Tensor]] = {}  # same shape, dtypes, device, step: one pass each
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    kw = {"dtype": torch.float32 if p.grad.dtype in _LOW_PRECISION else p.grad.dtype,
                          "device": p.device}
                    if p.grad.dim() - 1 >= 2:  # factored, as transformers decides for one slice
                        state["exp_avg_sq_row"] = torch.zeros(p.shape[:-1], **kw)  # [N, ..., rows]
                        state["exp_avg_sq_col"] = torch.zeros(p.shape[:-2] + p.shape[-1:], **kw)  # [N, ..., cols]
                    else:
                        state["exp_avg_sq"] = torch.zeros(p.shape, **kw)
                state["step"] += 1
                buckets.setdefault((p.shape, p.dtype, p.grad.dtype, p.device, state["step"]), []).append(p)
            for (_, _, _, _, step), params in buckets.items():
                self._bucket_step(params, step, group)

    def _bucket_step(self, params: list[torch.Tensor], step: int, group: dict) -> None:
        """P stacked tensors [N, *slice] of one shape as P x N slices [P x N, *slice], in one pass."""
        states = [self.state[p] for p in params]
        if "exp_avg_sq" in states[0]:
            stacked_update_(params, states, ("exp_avg_sq",),
                            lambda p32, grad, m: _unfactored_update_(p32, grad, m["exp_avg_sq"], step, group),
                            slices_in_params=True)
        else:
            stacked_update_(params, states, ("exp_avg_sq_row", "exp_avg_sq_col"),
                            lambda p32, grad, m: factored_update_(p32, grad, m["exp_avg_sq_row"],
                                                                  m["exp_avg_sq_col"], step, group),
                            slices_in_params=True)


def _unfactored_update_(p32: torch.Tensor, grad: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
                        group: dict) -> None:
    """transformers' Adafactor update of M < 2-D parameters stacked as [M, ...] (one slice each), in place."""
    lr = group["lr"]
    if group["scale_parameter"]:  # max(eps[1], RMS(p)) x lr, per slice
        lr = _slice_rms(p32).clamp(min=group["eps"][1]) * lr  # [M, 1, ...]
    beta2t = 1.0 - math.pow(step, group["decay_rate"])
    exp_avg_sq.mul_(beta2t).add_((grad**2) + group["eps"][0], alpha=(1.0 - beta2t))
    update = exp_avg_sq.rsqrt().mul_(grad)
    update.div_((_slice_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
    update.mul_(lr)
    if group["weight_decay"] != 0:
        p32.add_(p32 * (-group["weight_decay"] * lr))
    p32.sub_(update)


def make_sliced_optimizer(params: list[torch.Tensor], settings: dict, *, fused: bool = False):
    """The optimizer of ``settings`` (:func:`harness.training.make_optimizer`'s) for stacked [N, ...] tensors."""
    from harness.training import make_optimizer

    if settings["optimizer"] == "adafactor":
        make_optimizer([torch.nn.Parameter(torch.zeros(1))], settings)  # the same checks of the options
        return SlicedAdafactor(params, lr=settings["lr"], weight_decay=settings["weight_decay"],
                               scale_parameter=settings["scale_parameter"])
    if settings["optimizer"] == "adamw":
        return make_optimizer(params, settings, fused=fused)
    raise HarnessError(f"packed training has no sliced {settings['optimizer']!r} optimizer (adafactor, adamw)")


@torch.no_grad()
def clip_per_group(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor | None:
    """Each group's gradient norm [N] (the norm of its slices' norms, as ``clip_grad_norm_`` computes one group's)
    and, with ``max_norm``, each group's slices scaled by ``clamp(max_norm / (norm + 1e-6), max=1)``; None without
    ``max_norm`` (no clipping, as :func:`harness.training.training_step`). Gradients of one shape are stacked
    [P, N, ...], so the ops do not grow with the number of tensors either."""
    if not max_norm:
        return None
    buckets: dict[tuple, list[torch.Tensor]] = {}
    order: dict[tuple, list[int]] = {}  # each bucket's tensors' positions among the grads
    for i, g in enumerate(p.grad for p in params if p.grad is not None):
        key = (g.shape, g.dtype, g.device)
        buckets.setdefault(key, []).append(g)
        order.setdefault(key, []).append(i)
    stacks = [torch.stack(grads) for grads in buckets.values()]  # [P, N, ...] each
    rows = [row for g in stacks for row in torch.linalg.vector_norm(g, 2, dim=tuple(range(2, g.dim()))).unbind(0)]
    in_grads_order: list[torch.Tensor] = [None] * len(rows)  # type: ignore[list-item]
    for i, row in zip((i for positions in order.values() for i in positions), rows):
        in_grads_order[i] = row
    # [N, T] in the grads' order, as clip_grad_norm_ stacks them: the same sum, bit for bit (no index tensor to
    # upload: a copy from host memory would synchronize the CUDA stream)
    norms = torch.stack(in_grads_order, dim=1)
    total = torch.linalg.vector_norm(norms, 2, dim=1)  # [N]
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # [N]
    for grads, stack in zip(buckets.values(), stacks):
        stack.mul_(coef.view(1, -1, *([1] * (stack.dim() - 2))).to(stack.dtype))
        torch._foreach_copy_(grads, list(stack.unbind(0)))
    return total
