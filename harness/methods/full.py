"""Full fine-tuning: every parameter of the model is trained; the whole model is saved with save_pretrained."""

from __future__ import annotations

import dataclasses

from harness.methods import MethodInfo, register
from harness.methods.base import Overhead, TrainConfig


@dataclasses.dataclass
class FullArgs(TrainConfig):
    """Defaults: AdamW lr 1e-5 (a common full fine-tuning rate for small LMs; T-Few's ``finetune.json`` uses
    Adafactor 3e-4 on T0-3B), linear decay after 6% warmup, no weight decay, clipping at 1; loss L_LM.
    """

    lr: float = 1e-5
    optimizer: str = "adamw"


def apply(model, cfg: FullArgs):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


register(MethodInfo(
    "full", "peft", "full fine-tuning: all parameters, AdamW 1e-5 (saves the whole model)",
    config_cls=FullArgs, apply=apply, overhead=lambda model, cfg: Overhead(), artifact="model",
    family="full", merges=True, trains_model_dtype=True))
