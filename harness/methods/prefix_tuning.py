"""Prefix tuning (Li & Liang 2021, arXiv 2101.00190) through peft's ``PrefixTuningConfig``: trainable key/value
vectors for ``n_virtual_tokens`` positions on every layer, attended to by every token; optionally produced by an
MLP from a smaller embedding (Li & Liang's reparameterization, which T-Few also uses).
"""

from __future__ import annotations

import dataclasses

from harness.methods import MethodInfo, register
from harness.methods.base import Overhead, TrainConfig, check, is_int, prompt_encoder_flops


@dataclasses.dataclass
class PrefixTuningArgs(TrainConfig):
    """Defaults (r-three/t-few ``configs/prefix_tuning.json``): 10 prefix positions, MLP reparameterization with
    a 512-wide hidden layer (``projection=true``, ``hidden=512``; T-Few's ``mlp-512``), Adafactor lr 1e-2 with
    ``scale_parameter=True`` (Config.py's default, kept by ``prefix_tuning.json``), linear decay after 6% warmup;
    loss L_LM.
    """

    n_virtual_tokens: int = 10
    projection: bool = True
    hidden: int = 512
    lr: float = 1e-2

    def __post_init__(self):
        super().__post_init__()
        check(is_int(self.n_virtual_tokens) and self.n_virtual_tokens >= 1,
              f"prefix_tuning: n_virtual_tokens must be a positive integer, got {self.n_virtual_tokens!r}")
        check(isinstance(self.projection, bool),
              f"prefix_tuning: projection must be true or false, got {self.projection!r}")
        check(is_int(self.hidden) and self.hidden >= 1,
              f"prefix_tuning: hidden must be a positive integer, got {self.hidden!r}")


def apply(model, cfg: PrefixTuningArgs):
    from peft import PrefixTuningConfig

    from harness.methods.base import wrap_peft

    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.n_virtual_tokens,
                                prefix_projection=cfg.projection, encoder_hidden_size=cfg.hidden)
    return wrap_peft(model, config, "prefix_tuning")


def overhead(model, cfg: PrefixTuningArgs) -> Overhead:
    """Every token attends to ``n_virtual_tokens`` more keys on every layer. The MLP reparameterization is
    input-independent: counted in training (peft recomputes it for every row), not at inference, where the
    prefix is computed once. Call on the wrapped model (the MLP is counted from its ``prompt_encoder``)."""
    return Overhead(prefix_keys=cfg.n_virtual_tokens,
                    train_per_row=prompt_encoder_flops(model, cfg.n_virtual_tokens) if cfg.projection else 0)


register(MethodInfo(
    "prefix_tuning", "peft", "prefix tuning (Li & Liang 2021): 10 trainable key/value positions per layer (MLP-512)",
    config_cls=PrefixTuningArgs, supports_kv_cache=False, apply=apply, overhead=overhead,
    family="additive", mixed_batches=True, shares_block_graph=False))
