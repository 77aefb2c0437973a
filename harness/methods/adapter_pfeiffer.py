"""Pfeiffer adapters (Pfeiffer et al. 2021, "AdapterFusion", arXiv 2005.00247, section 3.1 and appendix: the
configuration found best places one bottleneck after the feed-forward block only): Houlsby's bottleneck
``y + up(f(down(y)))`` once per layer, on the output of the MLP before its residual addition. Written by hand in
:mod:`harness.methods.bottleneck` (AdapterHub's ``adapters`` does not import with the harness's transformers 5;
see there). Saved as the trainable tensors in one safetensors file.

Trainable parameters: ``L * (2*d*m + m + d)``, ``m = d // reduction`` (SmolLM2-135M: 1,262,520). Pfeiffer's
adapter also has its own residual/layer-norm arrangement around the FFN; ours keeps the model's layer norms as
they are (frozen). Inference overhead: ``4*d*m`` FLOPs per token per layer; not mergeable.
"""

from __future__ import annotations

import dataclasses

from harness.methods import MethodInfo, register
from harness.methods.adapter import overhead_for
from harness.methods.bottleneck import BottleneckArgs, add_adapters

PLACES = ("ffn",)


@dataclasses.dataclass
class PfeifferArgs(BottleneckArgs):
    """Defaults: reduction factor 16 (Pfeiffer et al. 2021, appendix: 16 for the single-task adapters), ReLU
    (their Pfeiffer configuration and T-Few's ``adapter.json``), near-identity initialisation with a zero
    up-projection (see :class:`harness.methods.bottleneck.BottleneckArgs`), Adafactor lr 3e-3 (T-Few
    ``configs/adapter.json``); loss L_LM."""


def apply(model, cfg: PfeifferArgs):
    return add_adapters(model, cfg, PLACES, "adapter_pfeiffer")


register(MethodInfo(
    "adapter_pfeiffer", "peft", "Pfeiffer adapters (Pfeiffer et al. 2021): bottleneck (d/16) after the feed-forward",
    config_cls=PfeifferArgs, apply=apply, overhead=overhead_for(PLACES), artifact="tensors",
    family="additive", merges=False, mixed_batches=True, trains_model_dtype=True))
