"""UniPELT (Mao et al. 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning",
arXiv 2110.07577, section 3 and figure 1): LoRA on the query and value projections, prefix tuning and a
sequential adapter after the feed-forward, the LoRA and adapter each scaled by a learned gate
``sigmoid(W_g x)`` (one ``d -> 1`` linear per submodule and layer).

The gated adapter and gated LoRA are written by hand in :mod:`harness.methods.bottleneck` (AdapterHub's
``adapters`` does not import with the harness's transformers 5; see there); the prefix is peft's
``PrefixTuningConfig`` without the MLP reparameterization. Limitation: the prefix's gate ``G_P`` (which scales the
prefix's attention output) is not implemented (peft's prefix has no hook for it), so the prefix is ungated; and
the gated LoRA needs ``q_proj``/``v_proj`` (or T5's ``q``/``v``) Linears (not gpt2's fused ``c_attn``). Scored without the
KV-cache fast path. Saved as the trainable tensors in one safetensors file.

Trainable parameters: adapter ``L * (2*d*m + m + d + d + 1)``; LoRA ``L * [r*(d + d_q) + r*(d + d_v) + 2*(d+1)]``;
prefix ``l * L * 2 * d_kv``. SmolLM2-135M (L=30, d=576, m=36, r=8, d_q=576, d_v=d_kv=192, l=10).
Inference overhead: ``4*d*m`` per token per layer (adapter) + ``2*r*(d_in+d_out)`` per LoRA + ``2*d`` per gate,
and ``l`` more keys per layer.
"""

from __future__ import annotations

import dataclasses

from harness.methods import MethodInfo, register
from harness.methods.base import Overhead, check, is_int, is_number, per_token_overhead
from harness.methods.bottleneck import (BottleneckArgs, add_adapters, add_gated_lora, decoder_layers, hidden_size,
                                        projection, site_items)

PLACES = ("ffn",)
LORA_TARGETS = ("q_proj", "v_proj")


@dataclasses.dataclass
class UniPeltArgs(BottleneckArgs):
    """Defaults (Mao et al. 2022, section 4.1 "Implementation details"): adapter bottleneck 48 on BERT-base
    (d=768, i.e. ``reduction=16``), LoRA ``r=8``, ``alpha=16``, prefix length ``l=10``; ReLU; adapter up-projection
    and LoRA B at zero (the gates are not); Adafactor lr 3e-3 (T-Few's adapter rate; Mao et al. use AdamW);
    loss L_LM."""

    r: int = 8
    alpha: float = 16.0
    n_virtual_tokens: int = 10

    def __post_init__(self):
        super().__post_init__()
        check(is_int(self.r) and self.r >= 1, f"unipelt: r must be a positive integer, got {self.r!r}")
        check(is_number(self.alpha) and self.alpha > 0, f"unipelt: alpha must be positive, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        check(is_int(self.n_virtual_tokens) and self.n_virtual_tokens >= 1,
              f"unipelt: n_virtual_tokens must be a positive integer, got {self.n_virtual_tokens!r}")


def apply(model, cfg: UniPeltArgs):
    from peft import PrefixTuningConfig

    from harness.methods.base import wrap_peft

    add_adapters(model, cfg, PLACES, "unipelt", gated=True)
    add_gated_lora(model, LORA_TARGETS, cfg.r, cfg.alpha, "unipelt")
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.n_virtual_tokens,
                                prefix_projection=False)
    wrapped = wrap_peft(model, config, "unipelt")
    for name, p in wrapped.named_parameters():  # peft froze the whole base model, adapters included
        if ".adapter_" in name:
            p.requires_grad_(True)
    return wrapped


def overhead(model, cfg: UniPeltArgs) -> Overhead:
    d = hidden_size(model)
    items = site_items(model, PLACES, "unipelt", 2 * d * cfg.width(d) * 2 + 2 * d)
    for name, _, attn, _ in decoder_layers(model):
        for t in LORA_TARGETS:
            proj = projection(attn, t)
            if proj is not None and hasattr(proj, "in_features"):
                items.append((name, 2 * cfg.r * (proj.in_features + proj.out_features) + 2 * proj.in_features))
    return per_token_overhead(items, prefix_keys=cfg.n_virtual_tokens)


register(MethodInfo(
    "unipelt", "peft", "UniPELT (Mao et al. 2022): gated LoRA (q,v) + gated FFN adapter + prefix (l=10, ungated)",
    config_cls=UniPeltArgs, supports_kv_cache=False, apply=apply, overhead=overhead, artifact="tensors",
    family="hybrid", merges=False, mixed_batches=True, trains_model_dtype=True, shares_block_graph=False))
