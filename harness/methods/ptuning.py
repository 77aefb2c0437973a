"""P-tuning (Liu et al. 2021, "GPT Understands, Too", arXiv 2103.10385) through peft's ``PromptEncoderConfig``:
virtual-token embeddings produced by a small trainable prompt encoder (MLP or LSTM), placed before every input.

Like prompt tuning, peft prepends them on every forward and drops position ids: scored with ``use_cache=False``,
one row at a time.
"""

from __future__ import annotations

import dataclasses

from harness.methods import MethodInfo, register
from harness.methods.base import Overhead, TrainConfig, check, is_int, prompt_encoder_flops

ENCODERS = ("mlp", "lstm")


@dataclasses.dataclass
class PTuningArgs(TrainConfig):
    """Defaults (peft's P-tuning guide: 20 virtual tokens, encoder hidden size 128, lr 1e-3): 20 virtual tokens,
    an MLP prompt encoder 128 wide, AdamW lr 1e-3, linear decay after 6% warmup; loss L_LM.
    """

    n_virtual_tokens: int = 20
    encoder: str = "mlp"
    hidden: int = 128
    lr: float = 1e-3
    optimizer: str = "adamw"

    def __post_init__(self):
        super().__post_init__()
        check(is_int(self.n_virtual_tokens) and self.n_virtual_tokens >= 1,
              f"ptuning: n_virtual_tokens must be a positive integer, got {self.n_virtual_tokens!r}")
        check(self.encoder in ENCODERS,
              f"ptuning: encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        check(is_int(self.hidden) and self.hidden >= 1,
              f"ptuning: hidden must be a positive integer, got {self.hidden!r}")


def apply(model, cfg: PTuningArgs):
    from peft import PromptEncoderConfig, PromptEncoderReparameterizationType

    from harness.methods.base import wrap_peft

    kind = PromptEncoderReparameterizationType.MLP if cfg.encoder == "mlp" else PromptEncoderReparameterizationType.LSTM
    config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.n_virtual_tokens,
                                 encoder_reparameterization_type=kind, encoder_hidden_size=cfg.hidden)
    return wrap_peft(model, config, "ptuning")


def overhead(model, cfg: PTuningArgs) -> Overhead:
    """Virtual tokens are extra input positions of every sequence; the prompt encoder is input-independent:
    counted per row in training (peft recomputes it), not at inference (computed once)."""
    return Overhead(virtual_tokens=cfg.n_virtual_tokens,
                    train_per_row=prompt_encoder_flops(model, cfg.n_virtual_tokens))


register(MethodInfo(
    "ptuning", "peft", "P-tuning (Liu et al. 2021): 20 virtual tokens from an MLP prompt encoder, AdamW 1e-3",
    config_cls=PTuningArgs, supports_kv_cache=False, apply=apply, overhead=overhead, position_ids=False,
    family="additive", mixed_batches=True))
