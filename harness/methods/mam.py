"""MAM adapter ("Mix-And-Match", He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer
Learning", arXiv 2110.04366, section 4.6 and table 6): prefix tuning on the attention (``l`` prefix positions
per layer) plus a scaled parallel adapter on the feed-forward, ``FFN(x) + s * up(ReLU(down(x)))``.

The parallel adapter is written by hand in :mod:`harness.methods.bottleneck` (AdapterHub's ``adapters`` does not
import with the harness's transformers 5; see there); the prefix is peft's ``PrefixTuningConfig`` (without the MLP
reparameterization, so the trained prefix is the saved tensor), wrapped around the adapted model. Scored without
the KV-cache fast path (the prefix lives in the cache). Saved as the trainable tensors (adapter + prefix) in one
safetensors file.

Trainable parameters: ``L * (2*d*m + m + d)`` (adapter) ``+ l * L * 2 * d_kv`` (prefix keys and values;
``d_kv`` = key/value heads x head dim). SmolLM2-135M (L=30, d=576, m=d//reduction, d_kv=192, l=30).
Inference overhead: ``4*d*m`` FLOPs per token per layer plus ``l`` more keys per layer.
"""

from __future__ import annotations

import dataclasses

from harness.methods import MethodInfo, register
from harness.methods.base import Overhead, check, is_int, is_number, per_token_overhead
from harness.methods.bottleneck import BottleneckArgs, add_adapters, hidden_size, site_items

PLACES = ("ffn",)


@dataclasses.dataclass
class MamArgs(BottleneckArgs):
    """Defaults: He et al. (section 4.6, table 6): prefix length ``l=30``, parallel adapter on the FFN with scale
    ``s=4`` and bottleneck 512 on d=1024 models (BART-large, mBART-large), i.e. ``m = d/2``: ``reduction=2`` keeps
    that ratio at our scale (SmolLM2: m=288); ReLU; up-projection initialised at zero (their LoRA-style init);
    Adafactor lr 3e-3 (T-Few's adapter rate; He et al. train with Adam at 5e-5 for far longer runs); loss L_LM."""

    reduction: int = 2
    scale: float = 4.0
    n_virtual_tokens: int = 30

    def __post_init__(self):
        super().__post_init__()
        check(is_number(self.scale) and self.scale > 0, f"mam: scale must be a positive number, got {self.scale!r}")
        self.scale = float(self.scale)
        check(is_int(self.n_virtual_tokens) and self.n_virtual_tokens >= 1,
              f"mam: n_virtual_tokens must be a positive integer, got {self.n_virtual_tokens!r}")


def apply(model, cfg: MamArgs):
    from peft import PrefixTuningConfig

    from harness.methods.base import wrap_peft

    add_adapters(model, cfg, PLACES, "mam", parallel=cfg.scale)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.n_virtual_tokens,
                                prefix_projection=False)
    wrapped = wrap_peft(model, config, "mam")
    for name, p in wrapped.named_parameters():  # peft froze the whole base model, adapters included
        if ".adapter_" in name:
            p.requires_grad_(True)
    return wrapped


def overhead(model, cfg: MamArgs) -> Overhead:
    d = hidden_size(model)
    return per_token_overhead(site_items(model, PLACES, "mam", 2 * d * cfg.width(d) * 2),
                              prefix_keys=cfg.n_virtual_tokens)


register(MethodInfo(
    "mam", "peft", "MAM adapter (He et al. 2022): prefix (l=30) + scaled parallel adapter on the feed-forward",
    config_cls=MamArgs, supports_kv_cache=False, apply=apply, overhead=overhead, artifact="tensors",
    family="hybrid", merges=False, mixed_batches=True, trains_model_dtype=True, shares_block_graph=False))
