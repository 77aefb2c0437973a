"""(IA)^3 (Liu et al. 2022, arXiv 2205.05638, sec. 3.3) through peft's ``IA3Config``: learned vectors, initialised
to 1, rescale the keys, the values and the intermediate activation of the feed-forward block (the input of its
down-projection), as T-Few's ``lora_layers="k|v|wi_1.*"`` does on T5 (scaling wi_1's output in a gated T5 FFN
equals scaling the down-projection's input).
"""

from __future__ import annotations

import dataclasses

from harness.errors import HarnessError
from harness.methods import MethodInfo, register
from harness.methods.base import (Overhead, TrainConfig, as_names, family_role_names, matched_linears,
                                  per_token_overhead, resolve_targets, uses_conv1d, wrap_peft)

ROLES = ("k", "v", "ffn_out")


@dataclasses.dataclass
class IA3Args(TrainConfig):
    """Defaults (T-Few, Liu et al. 2022, and r-three/t-few ``configs/ia3.json``): vectors on k, v and the
    feed-forward down-projection input; Adafactor (``scale_parameter=True``, ``src/utils/Config.py``'s default,
    which ``ia3.json`` keeps), lr 3e-3, linear decay after 6% warmup, no weight decay, gradient clipping at 1;
    loss L_LM only (``tfew`` adds L_UL and L_LN). ``targets=None``: the family's
    ``k_proj|v_proj|down_proj`` (gpt2: ``c_attn|mlp.c_proj``); ``feedforward=None``: the family's
    down-projection names among the targets (their input is scaled instead of their output). The ``quick`` preset
    keeps lr 3e-3: its 20 steps already change 14 of 32 cb predictions of SmolLM2-135M (docs/metrics.md).
    """

    targets: tuple[str, ...] | None = None
    feedforward: tuple[str, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        self.targets = as_names(self.targets, "ia3: targets")
        self.feedforward = as_names(self.feedforward, "ia3: feedforward")


def _targets(model, cfg: IA3Args, method: str) -> tuple[list[str], list[str]]:
    targets = resolve_targets(model, ROLES, cfg.targets, method)
    if cfg.feedforward is not None:
        feedforward = list(cfg.feedforward)
        extra = [f for f in feedforward if f not in targets]
        if extra:
            raise HarnessError(f"{method}: feedforward modules {extra} must also be in targets {targets}")
    else:
        down = family_role_names(model, "ffn_out")
        feedforward = [t for t in targets if t in down]
    return targets, feedforward


def make_apply(method: str):
    def apply(model, cfg: IA3Args):
        from peft import IA3Config

        targets, feedforward = _targets(model, cfg, method)
        config = IA3Config(task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=feedforward,
                           fan_in_fan_out=uses_conv1d(model, targets))
        return wrap_peft(model, config, method)

    return apply


def make_overhead(method: str):
    def overhead(model, cfg: IA3Args) -> Overhead:
        """One multiply per scaled element and token: d_out for k/v (output scaled), d_in for feed-forward."""
        targets, feedforward = _targets(model, cfg, method)
        ff = set(feedforward)
        items = []
        for name, d_in, d_out in matched_linears(model, targets):
            is_ff = any(name == f or name.endswith("." + f) for f in ff)
            items.append((name, d_in if is_ff else d_out))
        return per_token_overhead(items)

    return overhead


register(MethodInfo(
    "ia3", "peft", "(IA)^3 (Liu et al. 2022): rescale keys, values, FFN inputs; Adafactor 3e-3; loss L_LM",
    config_cls=IA3Args, apply=make_apply("ia3"), overhead=make_overhead("ia3"),
    family="additive", merges=True, mixed_batches=True))
