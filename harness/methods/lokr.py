"""LoKr: a Kronecker-product update (KronA, Edalati et al. 2022, "KronA: Parameter Efficient Tuning with Kronecker
Adapter", arXiv 2212.10650; in the LyCORIS form, Yeh et al. 2024, "Navigating Text-To-Image Customization: From
LyCORIS Fine-Tuning to Model Evaluation", arXiv 2309.14859, sec. 3) through peft's ``LoKrConfig``:
``W + (alpha / r) (W1 kron W2)`` with ``d_out = u1 u2``, ``d_in = v1 v2`` factored near their square roots
(peft's ``factorization``), ``W1`` (u1 x v1) full and ``W2`` (u2 x v2) low-rank ``W2a W2b`` when ``r <
max(u2, v2) / 2`` (else full). ``W2b`` starts at zero, so training starts at the base model.

Trainable parameters: per adapted layer ``u1 v1 + r (u2 + v2)`` (low-rank W2) or ``u1 v1 + u2 v2``.
SmolLM2-135M, q (576 = 24 x 24 both ways) and v (192 = 12 x 16 out, 576 = 24 x 24 in) at r=8:
30 x ((576 + 8 x 48) + (288 + 8 x 40)) = 47,040.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from harness.methods import MethodInfo, register
from harness.methods.base import (Overhead, TrainConfig, as_names, check, is_int, is_number, matched_linears,
                                  per_token_overhead, resolve_targets, wrap_peft)

ROLES = ("q", "v")


@dataclasses.dataclass
class LokrArgs(TrainConfig):
    """Defaults: q and v, as LoRA (KronA adapts the same attention projections, Edalati et al. 2022 sec. 3);
    ``r=8``, ``alpha=8``, ``factor=-1`` (factor each dimension near its square root), peft's and LyCORIS's
    defaults; AdamW lr 1e-3 (the harness's generic adapter rate, as ``peft:<type>``; neither paper gives one for
    language-model classification); quick preset lr 5e-3. gpt2-style ``Conv1D`` targets are not supported by
    peft's LoKr (use llama-style models).
    """

    QUICK_DEFAULTS: ClassVar[dict] = {"lr": 5e-3}

    r: int = 8
    alpha: float = 8.0
    factor: int = -1
    decompose_both: bool = False
    targets: tuple[str, ...] | None = None
    lr: float = 1e-3
    optimizer: str = "adamw"

    def __post_init__(self):
        super().__post_init__()
        check(is_int(self.r) and self.r >= 1, f"lokr: r must be a positive integer, got {self.r!r}")
        check(is_number(self.alpha) and self.alpha > 0, f"lokr: alpha must be a positive number, got {self.alpha!r}")
        check(is_int(self.factor) and (self.factor == -1 or self.factor >= 1),
              f"lokr: factor must be -1 (near the square root) or a positive integer, got {self.factor!r}")
        check(isinstance(self.decompose_both, bool), "lokr: decompose_both must be true or false")
        self.alpha = float(self.alpha)
        self.targets = as_names(self.targets, "lokr: targets")


def apply(model, cfg: LokrArgs):
    from peft import LoKrConfig

    targets = resolve_targets(model, ROLES, cfg.targets, "lokr")
    config = LoKrConfig(task_type="CAUSAL_LM", r=cfg.r, alpha=cfg.alpha, decompose_factor=cfg.factor,
                        decompose_both=cfg.decompose_both, target_modules=targets)
    return wrap_peft(model, config, "lokr")


def overhead(model, cfg: LokrArgs) -> Overhead:
    """Unmerged, peft materialises ``W1 kron W2`` (input-independent, not counted) and runs a second matmul with
    it: ``2 d_in d_out`` per token and layer. Merged: 0."""
    targets = resolve_targets(model, ROLES, cfg.targets, "lokr")
    return per_token_overhead((n, 2 * d_in * d_out) for n, d_in, d_out in matched_linears(model, targets))


register(MethodInfo(
    "lokr", "peft", "LoKr (KronA / LyCORIS): Kronecker-product updates of q,v (r=8), AdamW 1e-3",
    config_cls=LokrArgs, apply=apply, overhead=overhead, family="reparametrization", merges=True,
    mixed_batches=True))
