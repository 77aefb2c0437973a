"""QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv 2305.14314): LoRA through
peft's ``LoraConfig`` over a frozen base quantized to 4-bit NormalFloat (NF4, with double quantization, sec. 3)
by bitsandbytes, loaded through transformers' ``BitsAndBytesConfig`` (:func:`harness.models.load_model`,
``quantize="nf4"``); the LoRA weights and the compute stay in the run's dtype. On CUDA, or on the CPU where the
installed bitsandbytes has CPU 4-bit kernels (0.50.2 has: the ``qlora`` extra installs it, and the tests train it
on the CPU); otherwise :func:`harness.api.plan` refuses it before any model loads
(:func:`harness.models.check_quantize`).

Trainable parameters: LoRA's, ``r (d_in + d_out)`` per adapted layer, here on every linear of each block.
SmolLM2-135M at r=64: 30 x 64 x (1152 + 768 + 768 + 1152 + 3 x 2112) = 19,537,920.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from harness.errors import HarnessError
from harness.methods import MethodInfo, register
from harness.methods.base import (Overhead, matched_linears, per_token_overhead, resolve_targets, uses_conv1d,
                                  wrap_peft)
from harness.methods.lora import LoraArgs

ROLES = ("q", "k", "v", "o", "ffn_in", "ffn_out")  # "LoRA on all linear transformer block layers" (sec. 4)


@dataclasses.dataclass
class QloraArgs(LoraArgs):
    """Defaults (Dettmers et al. 2023, sec. 4 and appendix B, the Guanaco hyperparameters): LoRA on every linear
    layer of each block, ``r=64``, ``alpha=16``, ``dropout=0.1`` (their 7B/13B value), AdamW lr 2e-4 (7B/13B),
    constant schedule as theirs; quick preset lr 2e-3 (as ``lora``). The paged optimizer and group-by-length
    batching are not used.
    """

    QUICK_DEFAULTS: ClassVar[dict] = {"lr": 2e-3}
    NAME: ClassVar[str] = "qlora"

    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.1
    schedule: str = "constant"


def apply(model, cfg: QloraArgs):
    from peft import LoraConfig, prepare_model_for_kbit_training

    if not getattr(model, "is_loaded_in_4bit", False):
        raise HarnessError("qlora: the base model is not 4-bit; load it with load_model(..., quantize='nf4')")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = resolve_targets(model, ROLES, cfg.targets, "qlora")
    config = LoraConfig(task_type="CAUSAL_LM", r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=targets, fan_in_fan_out=uses_conv1d(model, targets), bias="none")
    return wrap_peft(model, config, "qlora")


def trainable_params(model, cfg: QloraArgs) -> int:
    """``r (d_in + d_out)`` per adapted linear (the module docstring's count), from the unquantized model's shapes
    or the 4-bit one's (bitsandbytes keeps ``in_features``/``out_features``)."""
    targets = resolve_targets(model, ROLES, cfg.targets, "qlora")
    return sum(cfg.r * (d_in + d_out) for _, d_in, d_out in matched_linears(model, targets))


def overhead(model, cfg: QloraArgs) -> Overhead:
    """As unmerged LoRA: ``2 r (d_in + d_out)`` per token and layer (dequantization is not counted). Merging
    into a 4-bit base loses the quantization, so ``merges`` is False."""
    targets = resolve_targets(model, ROLES, cfg.targets, "qlora")
    return per_token_overhead((n, 2 * cfg.r * (d_in + d_out)) for n, d_in, d_out in matched_linears(model, targets))


register(MethodInfo(
    "qlora", "peft", "QLoRA (Dettmers et al. 2023): LoRA r=64 on all linears over a 4-bit NF4 base (bitsandbytes)",
    config_cls=QloraArgs, apply=apply, overhead=overhead, family="reparametrization", merges=False,
    mixed_batches=True, quantize="nf4", costs_version=1))  # 1: the 4-bit base's parameters and LoRA overhead counted
    # from the layers' shapes (before, bitsandbytes' packed weights halved the base FLOPs and hid every adapted layer)
