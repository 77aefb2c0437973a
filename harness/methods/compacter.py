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
``4*d*m`` FLOPs per token per layer, and per forward call the PHM weights (:func:`phm_weight_flops`: ``W_left
@ W_right``, then the Kronecker products and their sum, ``d*m*(2/n + 2n - 1)`` per PHM layer); not mergeable. The up
projection's right factors start at zero (``zero_up``), so step 0 is the base model (T-Few starts from
glorot-uniform factors, not the identity).
"""

from __future__ import annotations

import dataclasses

from harness.methods import MethodInfo, register
from harness.methods.base import Overhead, check, is_int, per_token_overhead
from harness.methods.bottleneck import BottleneckArgs, add_adapters, count_sites, hidden_size, site_items

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


def phm_weight_flops(d_in: int, d_out: int, n: int) -> int:
    """FLOPs of one PHM layer's weight, rebuilt on every forward call (``PHMLinear.weight``): ``W_left @ W_right``
    (rank 1: ``2 d_in d_out / n``), the products ``A_i kron W_i`` (``n d_in d_out``) and their sum over ``i``
    (``(n - 1) d_in d_out``)."""
    return 2 * d_in * d_out // n + (2 * n - 1) * d_in * d_out


def overhead(model, cfg: CompacterArgs) -> Overhead:
    """Per token ``4 d m`` per site (as the other adapters); per forward call both PHM weights of every site
    (differentiated in training: backward 2x)."""
    d = hidden_size(model)
    m = cfg.width(d)
    sites = count_sites(model, PLACES, "compacter")
    per_call = sites * (phm_weight_flops(d, m, cfg.n) + phm_weight_flops(m, d, cfg.n))
    return per_token_overhead(site_items(model, PLACES, "compacter", 2 * d * m * 2), per_forward=per_call,
                              per_forward_backward=2 * per_call)


register(MethodInfo(
    "compacter", "peft", "Compacter++ (Karimi Mahabadi et al. 2021): PHM (n=4, rank 1) bottleneck after the FFN",
    config_cls=CompacterArgs, apply=apply, overhead=overhead, artifact="tensors",
    family="hybrid", merges=False, mixed_batches=True, trains_model_dtype=True,
    costs_version=1))  # 1: per-forward-call FLOPs (Overhead.per_forward)
