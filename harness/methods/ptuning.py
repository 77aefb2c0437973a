"""P-tuning (Liu et al. 2021, "GPT Understands, Too", arXiv 2103.10385) through peft's ``PromptEncoderConfig``:
virtual-token embeddings produced by a small trainable prompt encoder (MLP or LSTM), placed before every input.

Like prompt tuning, peft prepends them on every forward and drops position ids: scored with ``use_cache=False``,
one row at a time.
"""

from __future__ import annotations

import dataclasses

from harness.methods import MethodInfo, register
from harness.methods.base import Overhead, TrainConfig, check, is_int
from harness.methods.bottleneck import hidden_size

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


LSTM_LAYERS = 2  # peft's PromptEncoderConfig.encoder_num_layers default (apply() does not change it)


def encoder_flops(d: int, cfg: PTuningArgs) -> int:
    """Matmul FLOPs of one call of peft's prompt encoder (``PromptEncoder``) on the ``n`` virtual tokens of one row:
    ``2 n`` x its weight matrices. MLP: ``d h + h h + h d``; LSTM: a bidirectional LSTM of ``LSTM_LAYERS`` layers
    (``2 x 4h (in + h)`` per layer, ``in = d`` then ``2h``) and an MLP head ``2h 2h + 2h d``. Biases, activations
    and the LSTM's gate products (elementwise) are left out, as in :func:`harness.methods.base.prompt_encoder_flops`.
    Both equal FlopCounterMode's count exactly (``tests/test_method_flops.py``; the LSTM as torch's cell loop)."""
    h = cfg.hidden
    if cfg.encoder == "mlp":
        weights = d * h + h * h + h * d
    else:
        weights = sum(2 * 4 * h * ((d if layer == 0 else 2 * h) + h) for layer in range(LSTM_LAYERS))
        weights += 2 * h * 2 * h + 2 * h * d
    return 2 * weights * cfg.n_virtual_tokens


def overhead(model, cfg: PTuningArgs) -> Overhead:
    """Virtual tokens are extra input positions of every sequence. The prompt encoder is input-independent: peft
    0.21 runs it once per forward call on one row and repeats the output over the rows (``get_prompt``), in
    training and in evaluation (differentiated in training: backward 2x; an upper bound for the LSTM, as for the
    body: torch's own LSTM cell loop skips the gradient of the zero initial states, ``LSTM_LAYERS x 2 directions x
    8 h^2`` less, 0.5% of the encoder's backward on SmolLM2-135M). A model in peft's inference mode (an adapter
    reloaded by ``PeftModel.from_pretrained``, which saved the encoder's output) reads the stored embeddings
    instead: no per-call work."""
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    per_call = 0 if getattr(config, "inference_mode", False) else encoder_flops(hidden_size(model), cfg)
    return Overhead(virtual_tokens=cfg.n_virtual_tokens, per_forward=per_call, per_forward_backward=2 * per_call)


register(MethodInfo(
    "ptuning", "peft", "P-tuning (Liu et al. 2021): 20 virtual tokens from an MLP prompt encoder, AdamW 1e-3",
    config_cls=PTuningArgs, supports_kv_cache=False, apply=apply, overhead=overhead, position_ids=False,
    family="additive", mixed_batches=True, costs_version=1))  # 1: per-forward-call FLOPs (Overhead.per_forward)
