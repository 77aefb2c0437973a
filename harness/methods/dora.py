"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353) through peft's
``LoraConfig(use_dora=True)``: each adapted weight is split into a magnitude vector ``m`` (one entry per output
row, trainable, initialised to the row norms of W) and a direction updated by LoRA,
``W' = m * (W + (alpha / r) B A) / ||W + (alpha / r) B A||`` (row-wise norm; paper sec. 4, eq. 5).

Trainable parameters: LoRA's plus the magnitude vector, per adapted layer ``r (d_in + d_out) + d_out``
(SmolLM2-135M, q,v at r=8: 30 x (8 x (576+576) + 576 + 8 x (576+192) + 192) = 483,840).

``mixed_batches`` is a property of the method (per-example LoRA and magnitude); peft 0.21 itself refuses mixed
adapter batches (``adapter_names``) with DoRA.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from harness.methods import MethodInfo, register
from harness.methods.base import (Overhead, matched_linears, per_token_overhead, resolve_targets, uses_conv1d,
                                  wrap_peft)
from harness.methods.lora import LoraArgs

ROLES = ("q", "v")


@dataclasses.dataclass
class DoraArgs(LoraArgs):
    """Defaults: LoRA's (``r=8``, ``alpha=16``, q and v, AdamW lr 2e-4; quick preset lr 2e-3), so DoRA and LoRA
    compare like for like, as the paper does (sec. 5: DoRA against LoRA at the same rank and target modules).
    ``targets=None``: the family's q,v (llama-style ``q_proj|v_proj``, gpt2-style ``c_attn``)."""

    NAME: ClassVar[str] = "dora"


def apply(model, cfg: DoraArgs):
    from peft import LoraConfig

    targets = resolve_targets(model, ROLES, cfg.targets, "dora")
    config = LoraConfig(task_type="CAUSAL_LM", r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=targets, fan_in_fan_out=uses_conv1d(model, targets), bias="none",
                        use_dora=True)
    return wrap_peft(model, config, "dora")


def per_forward_flops(r: int, d_in: int, d_out: int) -> int:
    """FLOPs peft's DoRA layer spends on every forward call, whatever the rows (its cache is off by default):
    ``B A`` rebuilt as ``lora_B(lora_A(eye(d_in)))`` (``2 r d_in (d_in + d_out)``), ``W + s B A`` (``2 d_in
    d_out``), the row norms (``2 d_in d_out``: squares and sums) and ``m / norm`` (``2 d_out``: square roots and
    divisions)."""
    return 2 * r * d_in * (d_in + d_out) + 4 * d_in * d_out + 2 * d_out


def overhead(model, cfg: DoraArgs) -> Overhead:
    """Unmerged DoRA: LoRA's ``2 r (d_in + d_out)`` per token and layer plus the magnitude rescaling (``d_out``);
    per forward call the weight norm (:func:`per_forward_flops`). Its backward in training is the division's
    only (``2 d_out`` per layer): peft detaches ``B A`` and the norm (paper sec. 4.3). Merged: 0."""
    layers = matched_linears(model, resolve_targets(model, ROLES, cfg.targets, "dora"))
    return per_token_overhead(((n, 2 * cfg.r * (d_in + d_out) + d_out) for n, d_in, d_out in layers),
                              per_forward=sum(per_forward_flops(cfg.r, d_in, d_out) for _, d_in, d_out in layers),
                              per_forward_backward=sum(2 * d_out for _, _, d_out in layers))


register(MethodInfo(
    "dora", "peft", "DoRA (Liu et al. 2024): LoRA on the direction + trainable magnitude (q,v, r=8)",
    config_cls=DoraArgs, apply=apply, overhead=overhead, family="reparametrization", merges=True,
    mixed_batches=True, costs_version=1))  # 1: per-forward-call FLOPs (Overhead.per_forward)
