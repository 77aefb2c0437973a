"""VeRA (Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024, arXiv 2310.11454) through
peft's ``VeraConfig``: one pair of frozen random low-rank matrices ``A`` (r x d_in), ``B`` (d_out x r), shared by
all adapted layers (Kaiming-uniform, from a fixed seed), and per layer two trained scaling vectors:
``W + diag(b) B diag(d) A`` (paper sec. 3.1, eq. 2), ``b`` initialised to 0 (training starts at the base model),
``d`` to ``d_initial``.

Trainable parameters: per adapted layer ``r + d_out`` (SmolLM2-135M, q,v at r=256:
30 x (256 + 576 + 256 + 192) = 38,400). The saved adapter also holds the shared ``A``/``B``
(``save_projection``), so it reloads without regenerating them.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from harness.methods import MethodInfo, register
from harness.methods.base import (Overhead, TrainConfig, as_names, check, is_int, is_number, matched_linears,
                                  per_token_overhead, resolve_targets, uses_conv1d, wrap_peft)

ROLES = ("q", "v")  # the paper adapts the query and value projections, as LoRA (sec. 4)


@dataclasses.dataclass
class VeraArgs(TrainConfig):
    """Defaults: q and v (Kopiczko et al. 2024, sec. 4, following LoRA); ``r=256`` (peft's default; the paper uses
    ranks up to 1024, sec. 4), ``d_initial=0.1`` (sec. 3.1 and peft), ``dropout=0``; AdamW lr 1e-2: the vectors
    need rates about 10x LoRA's (the paper's VeRA rates are of order 1e-2 where LoRA's are of order 1e-4,
    appendix hyperparameter tables); the quick preset keeps it. ``seed`` is the PRNG key of the shared random
    matrices (peft's ``projection_prng_key``).
    """

    QUICK_DEFAULTS: ClassVar[dict] = {}

    r: int = 256
    d_initial: float = 0.1
    dropout: float = 0.0
    seed: int = 0
    targets: tuple[str, ...] | None = None
    lr: float = 1e-2
    optimizer: str = "adamw"

    def __post_init__(self):
        super().__post_init__()
        check(is_int(self.r) and self.r >= 1, f"vera: r must be a positive integer, got {self.r!r}")
        check(is_number(self.d_initial), f"vera: d_initial must be a number, got {self.d_initial!r}")
        check(is_number(self.dropout) and 0 <= self.dropout < 1,
              f"vera: dropout must be in [0, 1), got {self.dropout!r}")
        check(is_int(self.seed) and self.seed >= 0, f"vera: seed must be an integer >= 0, got {self.seed!r}")
        self.d_initial, self.dropout = float(self.d_initial), float(self.dropout)
        self.targets = as_names(self.targets, "vera: targets")


def apply(model, cfg: VeraArgs):
    from peft import VeraConfig

    targets = resolve_targets(model, ROLES, cfg.targets, "vera")
    config = VeraConfig(task_type="CAUSAL_LM", r=cfg.r, d_initial=cfg.d_initial, vera_dropout=cfg.dropout,
                        projection_prng_key=cfg.seed, save_projection=True, target_modules=targets,
                        fan_in_fan_out=uses_conv1d(model, targets), bias="none")
    return wrap_peft(model, config, "vera")


def overhead(model, cfg: VeraArgs) -> Overhead:
    """Unmerged: ``x A^T`` (2 r d_in), ``* d`` (r), ``(.) B^T`` (2 r d_out), ``* b`` (d_out) per token and layer.
    Merged: 0."""
    targets = resolve_targets(model, ROLES, cfg.targets, "vera")
    return per_token_overhead((n, 2 * cfg.r * (d_in + d_out) + cfg.r + d_out)
                              for n, d_in, d_out in matched_linears(model, targets))


register(MethodInfo(
    "vera", "peft", "VeRA (Kopiczko et al. 2024): shared frozen random A,B; trained vectors b,d (q,v, r=256)",
    config_cls=VeraArgs, apply=apply, overhead=overhead, family="reparametrization", merges=True,
    mixed_batches=True))
