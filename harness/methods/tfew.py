"""T-Few (Liu et al. 2022, arXiv 2205.05638): (IA)^3 trained with L_LM + L_UL + L_LN and T-Few's hyperparameters.

Differences from the paper, by necessity: the base model is the harness's causal LM (not T0-3B), and the
(IA)^3 vectors start from 1 rather than from T-Few's multitask pre-training on the P3 mixture.
"""

from __future__ import annotations

import dataclasses

from harness.methods import MethodInfo, register
from harness.methods.ia3 import IA3Args, make_apply, make_overhead


@dataclasses.dataclass
class TFewArgs(IA3Args):
    """Defaults (Liu et al. 2022 sec. 3.3; r-three/t-few ``configs/ia3.json`` + per-task configs such as
    ``configs/cb.json``): (IA)^3 on k, v and the feed-forward down-projection input; losses L_LM + L_UL + L_LN
    (``mc_loss=1, unlikely_loss=1, length_norm=1``); Adafactor lr 3e-3 with ``scale_parameter=True,
    relative_step=False, warmup_init=False``, linear decay after 6% warmup, no weight decay, gradient clipping at
    1. Batch 8 and 1000 steps come from the ``paper`` preset.
    """

    losses: tuple[str, ...] = ("lm", "ul", "ln")


register(MethodInfo(
    "tfew", "peft", "T-Few recipe: (IA)^3 + losses L_LM+L_UL+L_LN, Adafactor 3e-3, 6% warmup, linear decay",
    config_cls=TFewArgs, apply=make_apply("tfew"), overhead=make_overhead("tfew"),
    family="additive", merges=True, mixed_batches=True))
