"""LayerNorm tuning (Zhao et al. 2023, arXiv 2312.11420; T-Few's ``layernorm`` baseline) through peft's
``LNTuningConfig``: only the normalization layers' parameters are trained (on trainable copies peft makes).
"""

from __future__ import annotations

import dataclasses

from harness.errors import HarnessError
from harness.methods import MethodInfo, register
from harness.methods.base import Overhead, TrainConfig, as_names, resolve_targets


@dataclasses.dataclass
class LNTuningArgs(TrainConfig):
    """Defaults (r-three/t-few ``configs/layernorm.json``): every normalization layer (``targets=None``: each
    module whose class name ends in ``Norm``, e.g. SmolLM2's ``input_layernorm|post_attention_layernorm|norm``),
    Adafactor lr 3e-4 with ``scale_parameter=True`` (Config.py's default, kept by ``layernorm.json``), linear
    decay after 6% warmup; loss L_LM.
    """

    targets: tuple[str, ...] | None = None
    lr: float = 3e-4

    def __post_init__(self):
        super().__post_init__()
        self.targets = as_names(self.targets, "ln_tuning: targets")


def norm_names(model) -> list[str]:
    """Last name component of every module whose class is a LayerNorm/RMSNorm."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if name and type(m).__name__.endswith("Norm") and not list(m.children())}
    if not names:
        raise HarnessError(f"ln_tuning: {type(model).__name__} has no LayerNorm/RMSNorm modules; "
                           "pass targets=NAME|NAME in --method-args")
    return sorted(names)


def apply(model, cfg: LNTuningArgs):
    from peft import LNTuningConfig

    from harness.methods.base import wrap_peft

    targets = norm_names(model) if cfg.targets is None else resolve_targets(model, (), cfg.targets, "ln_tuning")
    return wrap_peft(model, LNTuningConfig(task_type="CAUSAL_LM", target_modules=targets), "ln_tuning")


def overhead(model, cfg: LNTuningArgs) -> Overhead:
    """None: the tuned norms replace the original ones."""
    return Overhead()


register(MethodInfo(
    "ln_tuning", "peft", "LayerNorm tuning: train only the normalization layers (peft LN tuning), Adafactor 3e-4",
    config_cls=LNTuningArgs, apply=apply, overhead=overhead, family="selective", merges=True, trains_model_dtype=True))
