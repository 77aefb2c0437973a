"""Prompt tuning (Lester et al. 2021, arXiv 2104.08691) through peft's ``PromptTuningConfig``: trainable
embeddings of ``n_virtual_tokens`` virtual tokens placed before every input.

peft prepends them to the inputs on every forward and drops explicit position ids, so these runs score with
``use_cache=False`` and one row at a time (see :class:`harness.methods.MethodInfo`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from harness.methods import MethodInfo, register
from harness.methods.base import Overhead, TrainConfig, check, is_int

INITS = ("sample_vocab", "random")


@dataclasses.dataclass
class PromptTuningArgs(TrainConfig):
    """Defaults (r-three/t-few ``configs/prompt_tuning-10_prompts.json``; Lester et al. 2021 sec. 3): 10 virtual
    tokens initialised from the embeddings of tokens sampled from the vocabulary (``init=sample_vocab``; Lester
    et al. found it better than random), Adafactor lr 0.3 with ``scale_parameter=False`` (the only T-Few config
    that turns it off: ``"scale_parameter": false``), linear decay after 6% warmup; loss L_LM.
    """

    ADAFACTOR_SCALE_PARAMETER: ClassVar[bool] = False

    n_virtual_tokens: int = 10
    init: str = "sample_vocab"
    lr: float = 0.3

    def __post_init__(self):
        super().__post_init__()
        check(is_int(self.n_virtual_tokens) and self.n_virtual_tokens >= 1,
              f"prompt_tuning: n_virtual_tokens must be a positive integer, got {self.n_virtual_tokens!r}")
        check(self.init in INITS, f"prompt_tuning: init must be one of {', '.join(INITS)}, got {self.init!r}")


def apply(model, cfg: PromptTuningArgs):
    from peft import PromptTuningConfig, PromptTuningInit

    from harness.methods.base import wrap_peft

    init = PromptTuningInit.SAMPLE_VOCAB if cfg.init == "sample_vocab" else PromptTuningInit.RANDOM
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.n_virtual_tokens, prompt_tuning_init=init)
    return wrap_peft(model, config, "prompt_tuning")


def overhead(model, cfg: PromptTuningArgs) -> Overhead:
    """The virtual tokens are extra input positions of every sequence."""
    return Overhead(virtual_tokens=cfg.n_virtual_tokens)


register(MethodInfo(
    "prompt_tuning", "peft", "prompt tuning (Lester et al. 2021): 10 trainable input embeddings, Adafactor 0.3",
    config_cls=PromptTuningArgs, supports_kv_cache=False, apply=apply, overhead=overhead, position_ids=False,
    family="additive", mixed_batches=True))
