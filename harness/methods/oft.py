"""OFT (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning", NeurIPS 2023,
arXiv 2306.07280) through peft's ``OFTConfig``: each adapted weight is multiplied by a learned block-diagonal
orthogonal matrix ``R`` (``W' = W R`` on the input side), each block the Cayley transform ``(I + S)(I - S)^-1`` of
a skew-symmetric ``S`` (paper sec. 3.2-3.3), ``S = 0`` at start so training starts at the base model.

Trainable parameters: per adapted layer ``(d_in / b) b (b - 1) / 2`` (one skew-symmetric block per ``b`` inputs,
its upper triangle stored). SmolLM2-135M, q,v (d_in 576) at b=32: 30 x 2 x 18 x 496 = 535,680.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from harness.methods import MethodInfo, register
from harness.methods.base import (Overhead, TrainConfig, as_names, check, is_int, is_number, matched_linears,
                                  per_token_overhead, resolve_targets, uses_conv1d, wrap_peft)

ROLES = ("q", "v")
NEUMANN_TERMS = 5  # peft 0.21's OFTConfig default (use_cayley_neumann=True), passed explicitly by apply()


@dataclasses.dataclass
class OftArgs(TrainConfig):
    """Defaults: q and v (as LoRA, the paper's baseline; Qiu et al. adapt the attention projections of the
    diffusion U-Net, sec. 4); block size ``block_size=32`` (peft's default; the paper's block-diagonal
    r-block structure, sec. 3.3, sets the number of blocks instead); ``coft=False`` (no constrained OFT);
    AdamW lr 1e-3 (peft's example rate; the paper's 1e-5 is for Stable Diffusion); quick preset lr 5e-3.
    ``block_size`` must divide every target's input size.
    """

    QUICK_DEFAULTS: ClassVar[dict] = {"lr": 5e-3}

    block_size: int = 32
    coft: bool = False
    eps: float = 6e-5
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None
    lr: float = 1e-3
    optimizer: str = "adamw"

    def __post_init__(self):
        super().__post_init__()
        check(is_int(self.block_size) and self.block_size >= 2,
              f"oft: block_size must be an integer >= 2, got {self.block_size!r}")
        check(isinstance(self.coft, bool), "oft: coft must be true or false")
        check(is_number(self.eps) and self.eps > 0, f"oft: eps must be a positive number, got {self.eps!r}")
        check(is_number(self.dropout) and 0 <= self.dropout < 1,
              f"oft: dropout must be in [0, 1), got {self.dropout!r}")
        self.eps, self.dropout = float(self.eps), float(self.dropout)
        self.targets = as_names(self.targets, "oft: targets")


def apply(model, cfg: OftArgs):
    from peft import OFTConfig

    targets = resolve_targets(model, ROLES, cfg.targets, "oft")
    for name, d_in, _ in matched_linears(model, targets):
        check(d_in % cfg.block_size == 0,
              f"oft: block_size {cfg.block_size} does not divide the input size {d_in} of {name}; pass block_size=")
    config = OFTConfig(task_type="CAUSAL_LM", r=0, oft_block_size=cfg.block_size, coft=cfg.coft, eps=cfg.eps,
                       module_dropout=cfg.dropout, target_modules=targets, fan_in_fan_out=uses_conv1d(model, targets),
                       use_cayley_neumann=True, num_cayley_neumann_terms=NEUMANN_TERMS)
    return wrap_peft(model, config, "oft")


def per_forward_flops(d_in: int, b: int, terms: int = NEUMANN_TERMS) -> int:
    """FLOPs of peft's Cayley-Neumann rotation of one layer, redone on every forward call: per block of ``b``
    inputs (``d_in / b`` blocks), ``terms - 2`` products of ``b x b`` matrices (``2 b^3`` each: ``S^2 ... S^(t-1)``)
    and ``2 (terms - 1) b^2`` elementwise (``S - S^T`` and the sum ``I + 2 S + 2 S^2 + ... + S^(t-1)``)."""
    if terms < 4:
        raise ValueError(f"the formula is for at least 4 Neumann terms, got {terms}")
    return (d_in // b) * (2 * (terms - 2) * b ** 3 + 2 * (terms - 1) * b ** 2)


def coft_projection_flops(d_in: int, b: int) -> int:
    """FLOPs of constrained OFT's projection of one layer (peft's ``OFTRotationModule._project_batch``, run under
    ``no_grad`` before the rotation on every forward call), all elementwise: per block of ``b`` inputs
    (``d_in / b`` blocks; ``S``, ``Z``, ``D``: ``b x b``) ``8 b^2``: the skew-symmetric ``S = U - U^T`` from the
    stored upper triangle ``U`` (``b^2``), ``D = S - Z`` twice (peft subtracts its zero matrix ``Z`` for the
    difference and again inside the norm: ``2 b^2``), the Frobenius norm of ``D`` (``b^2`` squares, ``b^2 - 1``
    sums, a root: ``2 b^2``), ``D / norm``, ``eps *`` and ``Z +`` (``3 b^2``). ``torch.where`` selects (0); the
    comparison with ``eps`` (one per block) is left out."""
    return (d_in // b) * 8 * b ** 2


def overhead(model, cfg: OftArgs) -> Overhead:
    """Unmerged, peft rotates the input block by block: ``2 b d_in`` per token and layer, and per forward call
    builds the rotation blocks (:func:`per_forward_flops`; differentiated in training: backward 2x); with ``coft``
    it first projects the rotation parameters (:func:`coft_projection_flops`, every call, training and evaluation;
    under ``no_grad``: no backward). The training-only multiplicative dropout (0 by default) is not counted.
    Merged: 0."""
    layers = matched_linears(model, resolve_targets(model, ROLES, cfg.targets, "oft"))
    rotation = sum(per_forward_flops(d_in, cfg.block_size) for _, d_in, _ in layers)
    projection = sum(coft_projection_flops(d_in, cfg.block_size) for _, d_in, _ in layers) if cfg.coft else 0
    return per_token_overhead(((n, 2 * cfg.block_size * d_in) for n, d_in, _ in layers),
                              per_forward=rotation + projection, per_forward_backward=2 * rotation)


register(MethodInfo(
    "oft", "peft", "OFT (Qiu et al. 2023): block-diagonal orthogonal rotations of q,v inputs (block 32)",
    config_cls=OftArgs, apply=apply, overhead=overhead, family="reparametrization", merges=True,
    mixed_batches=True, costs_version=2))  # 1: per-forward-call FLOPs (Overhead.per_forward); 2: coft's projection
