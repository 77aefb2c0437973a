"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", arXiv 2303.10512)
through peft's ``AdaLoraConfig``: an SVD-shaped update ``W + P diag(E) Q`` per adapted layer whose singular values
``E`` are pruned during training by an importance score (sensitivity smoothed with ``beta1``/``beta2``), moving the
rank budget from ``init_r`` per layer on average down to ``target_r`` (cubic schedule between ``tinit`` and
``total_step - tfinal``, paper sec. 3.3, eq. 12). The pruning runs after every optimizer step
(``update_and_allocate``, through :class:`MethodInfo`'s ``on_step`` hook); ``total_step`` is the run's ``steps``.
The allocator's state is saved with a training's (``step_state``), so a killed AdaLoRA training resumes.
The hook runs :mod:`harness.methods.adalora_allocator`, peft's ``update_and_allocate`` in multi-tensor ops
(SmolLM2-135M: 10,713 aten ops a step down to 51 on the CPU, 447 on CUDA, where it keeps peft's per-tensor means),
bit-equal to peft's (``tests/test_adalora_allocator.py``, on the CPU): the results are peft's, so the config
fields and run ids are unchanged.

Trainable parameters (at initialisation, pruned entries stay parameters, masked to zero): per adapted layer
``init_r (d_in + d_out + 1)`` (P: d_out x r, Q: r x d_in, E: r). SmolLM2-135M, all 7 linears per block at init_r=12:
30 x 12 x (1153 + 769 + 769 + 1153 + 3 x 2113) = 3,665,880.

Limitation: the orthogonality regulariser ``orth_reg_weight`` (eq. 4) is added by peft only to a loss computed
from ``labels`` inside the forward; the harness computes its own losses, so it is not applied.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from harness.methods import MethodInfo, register
from harness.methods.base import (Overhead, TrainConfig, as_names, check, is_int, is_number, matched_linears,
                                  per_token_overhead, resolve_targets, uses_conv1d, wrap_peft)

ROLES = ("q", "k", "v", "o", "ffn_in", "ffn_out")  # the paper adapts every weight matrix (sec. 4)


@dataclasses.dataclass
class AdaLoraArgs(TrainConfig):
    """Defaults (Zhang et al. 2023): every linear of each block (W_q, W_k, W_v, W_o, W_f1, W_f2, sec. 4; llama's
    gate/up/down here), initial budget 1.5x the final (appendix: b(0) = 1.5 b(T)), so ``init_r=12``,
    ``target_r=8``; ``beta1=beta2=0.85`` (the paper's GLUE setting, appendix tables); ``alpha=8`` (scaling
    ``alpha / r`` as peft); ``tinit=tfinal=0`` and ``deltaT=1``, peft's defaults (the paper's warmup and final
    steps are tuned per task for thousands of steps). AdamW lr 1e-3 (the order of the paper's GLUE rates,
    appendix hyperparameter tables); quick preset lr 5e-3. ``total_step=None``: the run's steps.
    """

    QUICK_DEFAULTS: ClassVar[dict] = {"lr": 5e-3}

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    beta1: float = 0.85
    beta2: float = 0.85
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    total_step: int | None = None
    targets: tuple[str, ...] | None = None
    lr: float = 1e-3
    optimizer: str = "adamw"

    def __post_init__(self):
        super().__post_init__()
        for name in ("init_r", "target_r", "delta_t"):
            value = getattr(self, name)
            check(is_int(value) and value >= 1, f"adalora: {name} must be a positive integer, got {value!r}")
        check(self.target_r <= self.init_r, f"adalora: target_r ({self.target_r}) must be <= init_r ({self.init_r})")
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            check(is_int(value) and value >= 0, f"adalora: {name} must be an integer >= 0, got {value!r}")
        check(self.total_step is None or (is_int(self.total_step) and self.total_step > self.tinit + self.tfinal),
              f"adalora: total_step (the run's steps, {self.total_step!r}) must exceed tinit + tfinal "
              f"({self.tinit} + {self.tfinal}); lower tinit/tfinal or raise --steps")
        check(is_number(self.alpha) and self.alpha > 0, f"adalora: alpha must be a positive number, got {self.alpha!r}")
        check(is_number(self.dropout) and 0 <= self.dropout < 1,
              f"adalora: dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            check(is_number(value) and 0 <= value < 1, f"adalora: {name} must be in [0, 1), got {value!r}")
        self.alpha, self.dropout = float(self.alpha), float(self.dropout)
        self.beta1, self.beta2 = float(self.beta1), float(self.beta2)
        self.targets = as_names(self.targets, "adalora: targets")


def apply(model, cfg: AdaLoraArgs):
    from peft import AdaLoraConfig

    check(cfg.total_step is not None, "adalora: total_step is not set (apply it through apply_method with steps)")
    targets = resolve_targets(model, ROLES, cfg.targets, "adalora")
    config = AdaLoraConfig(task_type="CAUSAL_LM", init_r=cfg.init_r, target_r=cfg.target_r, lora_alpha=cfg.alpha,
                           lora_dropout=cfg.dropout, beta1=cfg.beta1, beta2=cfg.beta2, tinit=cfg.tinit,
                           tfinal=cfg.tfinal, deltaT=cfg.delta_t, total_step=cfg.total_step,
                           target_modules=targets, fan_in_fan_out=uses_conv1d(model, targets))
    return wrap_peft(model, config, "adalora")


def on_step(model, step: int) -> None:
    """After each optimizer step (gradients still in place): update importance scores, prune to the budget.
    peft's ``update_and_allocate`` computed in a few multi-tensor ops (:mod:`harness.methods.adalora_allocator`)."""
    from harness.methods.adalora_allocator import update_and_allocate

    update_and_allocate(model.base_model, step)


def get_step_state(model) -> dict:
    """What the rank allocation keeps between steps: peft's ``RankAllocator`` importance scores (``ipt``,
    ``exp_avg_ipt``, ``exp_avg_unc``: name -> tensor; with :mod:`harness.methods.adalora_allocator` views of its flat
    buffers) and the adapter's ``rank_pattern``, as CPU copies (:mod:`harness.train_state` saves them)."""
    tuner = model.base_model
    allocator = tuner.rankallocator
    config = tuner.peft_config[tuner.trainable_adapter_name]
    scores = {name: {k: v.detach().cpu().clone() for k, v in getattr(allocator, name).items()}
              for name in ("ipt", "exp_avg_ipt", "exp_avg_unc")}
    pattern = None if config.rank_pattern is None else {k: list(v) for k, v in config.rank_pattern.items()}
    return {**scores, "rank_pattern": pattern}


def set_step_state(model, state: dict) -> None:
    """Put :func:`get_step_state`'s dict back into a freshly applied model: peft's dicts hold the scores again (the
    fast allocator's flat buffers are rebuilt from them at its next step) and the config the rank pattern."""
    from harness.methods.adalora_allocator import FAST_ATTR, FastAllocator

    tuner = model.base_model
    allocator = tuner.rankallocator
    config = tuner.peft_config[tuner.trainable_adapter_name]
    device = next(p for p in model.parameters() if p.requires_grad).device
    for name in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        setattr(allocator, name, {k: v.to(device) for k, v in state[name].items()})
    config.rank_pattern = None if state["rank_pattern"] is None else {k: list(v) for k, v in
                                                                      state["rank_pattern"].items()}
    fast = getattr(allocator, FAST_ATTR, None)
    if isinstance(fast, FastAllocator):
        fast.release()  # rebinds to the dicts above at its next step


def overhead(model, cfg: AdaLoraArgs) -> Overhead:
    """Unmerged: ``x Q^T`` (2 r d_in), ``* E`` (r), ``(.) P^T`` (2 r d_out) per token and layer at r = init_r
    (peft masks pruned ranks, it does not drop them). Merged: 0."""
    targets = resolve_targets(model, ROLES, cfg.targets, "adalora")
    r = cfg.init_r
    return per_token_overhead((n, 2 * r * (d_in + d_out) + r) for n, d_in, d_out in matched_linears(model, targets))


register(MethodInfo(
    "adalora", "peft", "AdaLoRA (Zhang et al. 2023): SVD-form LoRA on all linears, rank budget 12 -> 8 pruned",
    config_cls=AdaLoraArgs, apply=apply, overhead=overhead, family="reparametrization", merges=True,
    mixed_batches=True, on_step=on_step, step_state=(get_step_state, set_step_state)))
