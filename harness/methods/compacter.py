"""Compacter++ (Karimi Mahabadi et al. 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers", arXiv
2106.04647, section 3 and "Compacter++" in section 4): a bottleneck after the feed-forward only whose down- and
up-projections are PHM layers, ``W = sum_{i=1..n} A_i kron (s_i t_i^T)`` with rank-1 factors, as in T-Few's
implementation (r-three/t-few ``src/models/AdapterVariants/VariantLayers.py`` ``PHMLinear`` with
``factorized_phm=true, phm_rank=1``, configured by ``configs/compacter_pp.json``). Written by hand in
:mod:`harness.methods.bottleneck` (AdapterHub's ``adapters`` does not import with the harness's transformers 5;
see there). Saved as the trainable tensors in one safetensors file.

As T-Few's ``compacter_pp.json``: ``compacter_shared_phm_rule=false``, so each PHM layer has its own rule
``A`` (n^3 numbers; the paper shares ``A`` across layers, which saves ``2*L*n^3 - n^3`` parameters: 3,776 on
SmolLM2). The bottleneck width is ``d // reduction`` rounded up to a multiple of ``n``.

Trainable parameters: ``L * [(n^3 + d + m + m) + (n^3 + m + d + d)]`` (down d->m, up m->d; each n^3 rule, rank-1
factors ``d_in + d_out``, bias ``d_out``). SmolLM2-135M (L=30, d=576, n=4, m=20): 57,480. Inference overhead:
``4*d*m`` FLOPs per token per layer (the Kronecker sum is formed once per forward); not mergeable. The up
projection's right factors start at zero (``zero_up``), so step 0 is the base model (T-Few starts from
glorot-uniform factors, not the identity).
"""

from __future__ import annotations

import dataclasses

from harness.methods import MethodInfo, register
from harness.methods.adapter import overhead_for
from harness.methods.base import check, is_int
from harness.methods.bottleneck import BottleneckArgs, add_adapters, hidden_size

PLACES = ("ffn",)


@dataclasses.dataclass
class CompacterArgs(BottleneckArgs):
    """Defaults (r-three/t-few ``configs/compacter_pp.json``): reduction factor 32, ReLU, ``n=4``
    (``compacter_hypercomplex_division``), rank-1 factorized PHM weights, per-layer rules initialised normal
    (std 0.02), Adafactor lr 3e-3; loss L_LM. ``n`` must divide the hidden size."""

    reduction: int = 32
    n: int = 4

    def __post_init__(self):
        super().__post_init__()
        check(is_int(self.n) and self.n >= 1, f"compacter: n must be a positive integer, got {self.n!r}")

    def width(self, hidden: int) -> int:
        m = self.size if self.size is not None else max(1, hidden // self.reduction)
        return -(-m // self.n) * self.n


def apply(model, cfg: CompacterArgs):
    d = hidden_size(model)
    check(d % cfg.n == 0, f"compacter: n={cfg.n} must divide the hidden size {d}")
    return add_adapters(model, cfg, PLACES, "compacter", phm=cfg.n)


register(MethodInfo(
    "compacter", "peft", "Compacter++ (Karimi Mahabadi et al. 2021): PHM (n=4, rank 1) bottleneck after the FFN",
    config_cls=CompacterArgs, apply=apply, overhead=overhead_for(PLACES), artifact="tensors",
    family="hybrid", merges=False, mixed_batches=True, trains_model_dtype=True))
