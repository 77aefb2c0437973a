"""LoRA (Hu et al. 2021, arXiv 2106.09685) through peft's ``LoraConfig``: a trainable low-rank update
``W + (alpha / r) * B A`` on the target linear layers, ``B`` initialised to zero so training starts at the base model.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from harness.methods import MethodInfo, register
from harness.methods.base import (Overhead, TrainConfig, as_names, check, is_int, is_number, matched_linears,
                                  per_token_overhead, resolve_targets, uses_conv1d, wrap_peft)

ROLES = ("q", "v")  # Hu et al. adapt W_q and W_v


@dataclasses.dataclass
class LoraArgs(TrainConfig):
    """Defaults: ``r=8``, ``alpha=16`` on the query and value projections (Hu et al. 2021 adapt W_q and W_v; alpha
    = 2r as in peft's and most published LoRA recipes), ``dropout=0``; AdamW, lr 2e-4 (Hu et al. 2021, table 11,
    GPT-2), linear decay after 6% warmup, no weight decay; loss L_LM. ``targets=None``: q,v of the model's family
    (llama-style ``q_proj|v_proj``, gpt2-style ``c_attn``); ``targets=a|b`` names module-name suffixes.

    Under the ``quick`` preset (20 steps) the default lr is 2e-3: at 2e-4 the 20 steps barely train (cb, SmolLM2-135M:
    loss 5.0 -> 3.3, accuracy unchanged at zero-shot's 0.25; at 2e-3: loss -> 0.65, accuracy 0.53; docs/metrics.md,
    "Training recipe").
    """

    QUICK_DEFAULTS: ClassVar[dict] = {"lr": 2e-3}
    NAME: ClassVar[str] = "lora"  # in error messages (subclasses: dora, qlora)

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None
    lr: float = 2e-4
    optimizer: str = "adamw"

    def __post_init__(self):
        super().__post_init__()
        check(is_int(self.r) and self.r >= 1, f"{self.NAME}: r must be a positive integer, got {self.r!r}")
        check(is_number(self.alpha) and self.alpha > 0,
              f"{self.NAME}: alpha must be a positive number, got {self.alpha!r}")
        check(is_number(self.dropout) and 0 <= self.dropout < 1,
              f"{self.NAME}: dropout must be in [0, 1), got {self.dropout!r}")
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)
        self.targets = as_names(self.targets, f"{self.NAME}: targets")


def apply(model, cfg: LoraArgs):
    from peft import LoraConfig

    targets = resolve_targets(model, ROLES, cfg.targets, "lora")
    config = LoraConfig(task_type="CAUSAL_LM", r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=targets, fan_in_fan_out=uses_conv1d(model, targets), bias="none")
    return wrap_peft(model, config, "lora")


def overhead(model, cfg: LoraArgs) -> Overhead:
    """Unmerged LoRA: per token and adapted layer, ``x A^T`` (2 r d_in) and ``(.) B^T`` (2 r d_out) FLOPs; the
    scaling and the add (d_out each) are not counted. Merged into W the overhead would be 0; we score unmerged."""
    targets = resolve_targets(model, ROLES, cfg.targets, "lora")
    return per_token_overhead((n, 2 * cfg.r * (d_in + d_out)) for n, d_in, d_out in matched_linears(model, targets))


register(MethodInfo(
    "lora", "peft", "LoRA (Hu et al. 2021): low-rank updates of q,v (r=8, alpha=16), AdamW 2e-4",
    config_cls=LoraArgs, apply=apply, overhead=overhead, family="reparametrization", merges=True,
    mixed_batches=True))
