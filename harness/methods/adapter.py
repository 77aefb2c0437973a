"""Houlsby adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", arXiv 1902.00751):
a bottleneck ``y + up(f(down(y)))`` after the attention block and after the feed-forward of every layer, before
each residual addition (section 2.1, figure 2). Written by hand in :mod:`harness.methods.bottleneck` (AdapterHub's
``adapters`` does not import with the harness's transformers 5 / huggingface_hub 1; see there). Saved as the
trainable tensors in one safetensors file.

Trainable parameters: ``2 * L * (2*d*m + m + d)`` for ``L`` layers, hidden size ``d``, bottleneck
``m = d // reduction`` (SmolLM2-135M: L=30, d=576, m=36: 2,525,040). The base model's layer norms stay frozen
(Houlsby also trains them; T-Few's ``adapter.json`` too: a difference of ``2*L*d`` parameters, ``ln_tuning``
measures layer norms alone). Inference overhead: ``4*d*m`` FLOPs per token per adapter (two matmuls); adapters
cannot be merged into the base weights (the nonlinearity).
"""

from __future__ import annotations

import dataclasses

from harness.methods import MethodInfo, register
from harness.methods.base import Overhead, per_token_overhead
from harness.methods.bottleneck import BottleneckArgs, add_adapters, hidden_size, site_items

PLACES = ("attn", "ffn")


@dataclasses.dataclass
class AdapterArgs(BottleneckArgs):
    """Defaults: reduction factor 16 (``m = d/16``; Pfeiffer et al. 2021, arXiv 2005.00247, section 5 / appendix:
    the reduction factor 16 used for their single-task adapters, AdapterHub's default); ReLU (T-Few's
    ``adapter.json``; Houlsby do not name theirs); near-identity initialisation (Houlsby section 3.6: std 1e-2),
    with the up-projection at exactly zero (``zero_up=true``) so step 0 is the base model; Adafactor lr 3e-3
    (T-Few ``configs/adapter.json``); loss L_LM."""


def apply(model, cfg: AdapterArgs):
    return add_adapters(model, cfg, PLACES, "adapter")


def overhead_for(places):
    def overhead(model, cfg: BottleneckArgs) -> Overhead:
        d = hidden_size(model)
        return per_token_overhead(site_items(model, places, "adapter", 2 * d * cfg.width(d) * 2))
    return overhead


register(MethodInfo(
    "adapter", "peft", "Houlsby adapters (Houlsby et al. 2019): bottleneck (d/16) after attention and feed-forward",
    config_cls=AdapterArgs, apply=apply, overhead=overhead_for(PLACES), artifact="tensors",
    family="additive", merges=False, mixed_batches=True, trains_model_dtype=True))
