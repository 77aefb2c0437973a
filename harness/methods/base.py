"""Shared pieces of the PEFT method modules: the training-defaults dataclass, validation helpers, target-module
resolution per architecture family, and the inference-overhead record.

Every method config subclasses :class:`TrainConfig`, so its fields are the method's own arguments (``r``,
``alpha``, ``targets``, ...) plus the training defaults it prefers (``lr``, ``optimizer``, ...). Both can be given
with ``--method-args``; the CLI flags ``--lr``/``--losses`` win over both.

This module imports no torch: the CLI imports the registry before loading any model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import ClassVar

from harness.errors import HarnessError, suggest

LOSSES = ("lm", "ul", "ln")  # T-Few's L_LM, L_UL (unlikelihood), L_LN (length-normalized)
OPTIMIZERS = ("adafactor", "adamw")
SCHEDULES = ("linear", "constant")
# transformers' Adafactor options, as T-Few passes them (r-three/t-few src/utils/get_optimizer.py)
ADAFACTOR_OPTIONS = ("scale_parameter", "relative_step", "warmup_init")

# Settings that come from the preset / CLI rather than from the method config.
RUN_KEYS = ("steps", "batch_size", "grad_accum", "n_train", "train_template", "max_length")


def check(condition: bool, message: str) -> None:
    """Raise :class:`HarnessError` with ``message`` unless ``condition``."""
    if not condition:
        raise HarnessError(message)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def as_names(value, what: str) -> tuple[str, ...] | None:
    """``None`` | ``"a"`` | ``"a|b"`` | ``["a", "b"]`` -> ``None`` | ``("a", "b")``."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [v for v in value.split("|")]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
        raise HarnessError(f"{what} must be module names separated by '|', got {value!r}")
    out = tuple(v.strip() for v in value)
    check(len(out) > 0, f"{what} must name at least one module")
    return out


@dataclasses.dataclass
class TrainConfig:
    """Training defaults shared by the PEFT methods; the values here are T-Few's (Liu et al. 2022, sec. 3.3 and
    r-three/t-few ``src/utils/Config.py`` + ``configs/ia3.json``): Adafactor with ``scale_parameter=True,
    relative_step=False, warmup_init=False`` (``src/utils/get_optimizer.py``), lr 3e-3, linear decay after 6%
    warmup (``src/utils/get_scheduler.py``), no weight decay, gradient clipping at norm 1. ``losses`` is the subset
    of ``lm`` (L_LM), ``ul`` (L_UL), ``ln`` (L_LN) summed with weight 1 each; plain methods use ``lm`` only,
    ``tfew`` all three.

    The Adafactor options are settings like the others (recorded with the run, so part of its id). Left at
    ``None`` they resolve, for ``optimizer=adafactor``, to ``scale_parameter=ADAFACTOR_SCALE_PARAMETER`` (the
    method's T-Few value) and ``relative_step=warmup_init=False`` (T-Few's, always; ``true`` is refused: the
    learning rate comes from ``lr`` and the schedule); for ``optimizer=adamw`` they stay ``None`` and giving one
    is an error. ``QUICK_DEFAULTS`` are the method's defaults under the ``quick`` preset only (see
    :func:`harness.methods.training_settings`); the ``paper`` preset uses the field defaults.
    """

    ADAFACTOR_SCALE_PARAMETER: ClassVar[bool] = True  # T-Few's Config.py default (prompt tuning's configs: False)
    QUICK_DEFAULTS: ClassVar[dict] = {}
    # Method arguments added after runs were stored, with their defaults: left out of the settings (so of the run
    # id and the training group) at those values, so the runs stored before keep their ids and are not redone.
    LATER_ARGS: ClassVar[dict] = {}

    lr: float = 3e-3
    optimizer: str = "adafactor"
    schedule: str = "linear"
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    losses: tuple[str, ...] = ("lm",)
    scale_parameter: bool | None = None
    relative_step: bool | None = None
    warmup_init: bool | None = None

    def __post_init__(self):
        check(is_number(self.lr) and self.lr > 0, f"lr must be a positive number, got {self.lr!r}")
        self.lr = float(self.lr)
        check(self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        check(self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        check(is_number(self.warmup_ratio) and 0 <= self.warmup_ratio < 1,
              f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        check(is_number(self.weight_decay) and self.weight_decay >= 0,
              f"weight_decay must be >= 0, got {self.weight_decay!r}")
        check(self.max_grad_norm is None or (is_number(self.max_grad_norm) and self.max_grad_norm >= 0),
              f"max_grad_norm must be >= 0 (0 or none: no clipping), got {self.max_grad_norm!r}")
        self.losses = parse_losses(self.losses)
        self._resolve_adafactor_options()

    def _resolve_adafactor_options(self) -> None:
        if self.optimizer != "adafactor":
            given = [name for name in ADAFACTOR_OPTIONS if getattr(self, name) is not None]
            check(not given, f"{', '.join(given)}: Adafactor option{'s' if len(given) > 1 else ''}, but optimizer is "
                             f"{self.optimizer} (add optimizer=adafactor, or leave {'them' if len(given) > 1 else 'it'}"
                             " out)")
            return
        if self.scale_parameter is None:
            self.scale_parameter = self.ADAFACTOR_SCALE_PARAMETER
        for name in ("relative_step", "warmup_init"):
            if getattr(self, name) is None:
                setattr(self, name, False)
        for name in ADAFACTOR_OPTIONS:
            value = getattr(self, name)
            check(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
        for name in ("relative_step", "warmup_init"):
            check(not getattr(self, name), f"{name}=true is not supported: T-Few's Adafactor always has {name}=False "
                                           "(r-three/t-few src/utils/get_optimizer.py); the learning rate comes from "
                                           "lr and the schedule")

    # ----------------------------------------------------------------------------------------- conversions
    @classmethod
    def training_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(TrainConfig))

    @classmethod
    def from_args(cls, args: dict, method: str) -> "TrainConfig":
        """Build from ``--method-args``-style keys; unknown keys name the closest known ones."""
        known = [f.name for f in dataclasses.fields(cls)]
        for key in args:
            if key not in known:
                raise suggest(key, known, f"argument of method {method!r}")
        return cls(**args)

    def method_args(self) -> dict:
        """The method's own arguments (everything except the training defaults; :attr:`LATER_ARGS` only where they
        differ from their defaults)."""
        skip = set(self.training_fields())
        later = self.LATER_ARGS
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip
                and not (f.name in later and getattr(self, f.name) == later[f.name])}

    def training(self) -> dict:
        return {name: getattr(self, name) for name in self.training_fields()}


def parse_losses(value) -> tuple[str, ...]:
    """``"lm,ul"`` | ``"lm|ul"`` | ``["lm", "ul"]`` -> ``("lm", "ul")``, validated."""
    if isinstance(value, str):
        value = [v for v in value.replace("|", ",").split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not value:
        raise HarnessError(f"losses must be a non-empty list of {', '.join(LOSSES)}, got {value!r}")
    out = tuple(str(v).strip().lower() for v in value)
    for name in out:
        if name not in LOSSES:
            raise suggest(name, list(LOSSES), "loss")
    check(len(set(out)) == len(out), f"losses must not repeat, got {','.join(out)}")
    return out


# ------------------------------------------------------------------------------------ target modules

# Roles -> module-name suffixes per architecture family (peft matches a target by the end of the module name).
FAMILIES: dict[str, dict[str, tuple[str, ...]]] = {
    # llama, mistral, qwen2/3, gemma/gemma2/gemma3, smollm2, ...
    "llama": {"q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("o_proj",),
              "ffn_in": ("gate_proj", "up_proj"), "ffn_out": ("down_proj",)},
    # gpt2-style: fused qkv (Conv1D c_attn), attention and MLP outputs both called c_proj
    "gpt2": {"q": ("c_attn",), "k": ("c_attn",), "v": ("c_attn",), "o": ("attn.c_proj",),
             "ffn_in": ("c_fc",), "ffn_out": ("mlp.c_proj",)},
    # t5 / t0 / flan-t5 (issue 17): T-Few's lora_modules ".*SelfAttention|.*EncDecAttention|.*DenseReluDense";
    # its IA3 "k|v|wi_1.*" scales wi_1's output, i.e. wo's input: ffn_out "wo" with feedforward= (input scaled)
    "t5": {"q": ("q",), "k": ("k",), "v": ("v",), "o": ("o",), "ffn_in": ("wi", "wi_0", "wi_1"),
           "ffn_out": ("wo",)},
}
FAMILY_MARKERS = {"llama": "q_proj", "gpt2": "c_attn", "t5": "EncDecAttention"}


def module_names(model) -> list[str]:
    return [name for name, _ in model.named_modules()]


def detect_family(names: Iterable[str]) -> str | None:
    """The family whose marker module name appears in ``names`` (None if no family matches)."""
    leafs = {n.rsplit(".", 1)[-1] for n in names}
    for family, marker in FAMILY_MARKERS.items():
        if marker in leafs:
            return family
    return None


def resolve_targets(model, roles: Iterable[str], explicit: tuple[str, ...] | None, method: str) -> list[str]:
    """Module-name suffixes to adapt: ``explicit`` (``targets=``) if given, else the family's names for
    ``roles``. Every name must match at least one module of ``model``."""
    names = module_names(model)
    if explicit is None:
        family = detect_family(names)
        if family is None:
            raise HarnessError(
                f"{method}: cannot tell which modules to adapt in {type(model).__name__} (neither llama-style "
                f"q_proj/v_proj nor gpt2-style c_attn found); pass targets=NAME|NAME in --method-args")
        targets = list(dict.fromkeys(t for role in roles for t in FAMILIES[family][role]))
        if family == "t5":  # ReLU T5 has wi, gated T5 (v1.1, T0, Flan-T5) wi_0 and wi_1: keep those present
            targets = [t for t in targets if any(n.endswith("." + t) for n in names)]
    else:
        targets = list(explicit)
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            leafs = sorted({n.rsplit(".", 1)[-1] for n in names if n})
            raise suggest(t, leafs, f"{method} target module")
    return targets


def family_role_names(model, role: str) -> tuple[str, ...]:
    family = detect_family(module_names(model))
    return FAMILIES[family][role] if family else ()


# ------------------------------------------------------------------------------------ inference overhead

@dataclasses.dataclass(frozen=True)
class Overhead:
    """What a method adds to the base model's forward, for the FLOPs figures.

    - ``per_token``: extra FLOPs per processed token (unmerged LoRA matmuls, IA3 scalings);
    - ``train_per_row``: training-only FLOPs per forward row of an input-independent reparameterization
      (prefix tuning's MLP, p-tuning's prompt encoder); inference computes it once, so it is not counted there;
    - ``virtual_tokens``: input positions prepended to every sequence (prompt tuning, p-tuning);
    - ``prefix_keys``: extra key/value positions every token attends to on every layer (prefix tuning);
    - ``train_per_token``: training-only FLOPs per processed token, for a method that runs unmerged only while
      training (intrinsic SAID's rank-1 hooks; merged for inference, so not in ``per_token``);
    - ``train_per_forward``: training-only FLOPs per forward call, independent of its rows and tokens (intrinsic
      SAID's Fastfood projections, computed once per forward);
    - ``per_forward``: forward FLOPs of input-independent work the method redoes on every forward call, in
      evaluation and training alike (DoRA's ``B A`` and weight norm, OFT's Cayley-Neumann rotations, Compacter's
      PHM weights, p-tuning's prompt encoder); matmuls and elementwise ops, as ``per_token``;
    - ``per_forward_backward``: the training backward's FLOPs for that work per forward call: ``2 per_forward``
      where it is differentiated (the usual backward = 2 x forward), less where peft detaches it (DoRA's norm);
    - ``train_per_logit``: training-only FLOPs per position projected to the vocabulary (intrinsic SAID's rank-1
      hook on an adapted output projection), forward + backward as ``train_per_token``;
    - ``train_backward_per_token``, ``train_backward_per_logit``: training-only FLOPs of the backward alone, per
      token and per projected position (intrinsic SAID's full-rank variant: the dense weight gradients of its
      re-materialised matrices, which add nothing to the forward).

    Encoder-decoders (T5): a token passes through one stack only, so ``per_token`` is split by where the work
    runs (:func:`per_token_overhead`, ``split`` true): ``enc_per_token`` on every encoder token,
    ``cross_per_token`` (adapted cross-attention key/value projections) on every encoder state projected for a
    decoder row, the rest on every decoder token (:func:`per_token_flops`). Without a split (a method that does not
    say where its work runs) every token is charged all of ``per_token``: an upper bound.

    :func:`train_overhead_flops` turns it into training FLOPs; :func:`harness.peft_runner.eval_overhead_flops`
    into evaluation FLOPs.
    """

    per_token: int = 0
    enc_per_token: int = 0
    cross_per_token: int = 0
    split: bool = False
    train_per_row: int = 0
    virtual_tokens: int = 0
    prefix_keys: int = 0
    train_per_token: int = 0
    train_per_forward: int = 0
    per_forward: int = 0
    per_forward_backward: int = 0
    train_per_logit: int = 0
    train_backward_per_token: int = 0
    train_backward_per_logit: int = 0


def where_it_runs(name: str) -> str:
    """Where a module's per-token work runs in an encoder-decoder (T5 names): ``enc`` (once per encoder token),
    ``cross`` (the decoder's cross-attention key/value projections: once per encoder state and decoder row),
    ``dec`` (once per decoder token); ``""`` for a causal model's module."""
    name = name.removesuffix(".base_layer")
    if "EncDecAttention." in name and name.rsplit(".", 1)[-1] in ("k", "v"):
        return "cross"
    if name.startswith("encoder.") or ".encoder." in name:
        return "enc"
    if name.startswith("decoder.") or ".decoder." in name:
        return "dec"
    return ""


def per_token_overhead(items, **fields) -> Overhead:
    """An :class:`Overhead` whose ``per_token`` is the sum of ``items`` ((module name, FLOPs per token passing
    through it)), split by :func:`where_it_runs` for an encoder-decoder; ``fields``: its other fields."""
    total = enc = cross = 0
    split = False
    for name, flops in items:
        where = where_it_runs(name)
        total += flops
        enc += flops if where == "enc" else 0
        cross += flops if where == "cross" else 0
        split = split or bool(where)
    return Overhead(per_token=total, enc_per_token=enc, cross_per_token=cross, split=split, **fields)


def per_token_flops(overhead: Overhead, work) -> int:
    """``overhead.per_token`` over the tokens of ``work`` (a :class:`harness.costs.Work`), split between the stacks
    of an encoder-decoder where the overhead says where it runs (see :class:`Overhead`)."""
    if not (overhead.split and work.enc_tokens):
        return overhead.per_token * work.tokens
    dec = overhead.per_token - overhead.enc_per_token - overhead.cross_per_token
    return (overhead.enc_per_token * work.enc_tokens + dec * (work.tokens - work.enc_tokens)
            + overhead.cross_per_token * work.cross_tokens)


def train_overhead_flops(overhead: Overhead, tokens: int, rows: int, forwards: int, logits: int = 0,
                         work=None) -> int:
    """A method's own training FLOPs over ``tokens`` processed tokens, ``rows`` forward rows, ``forwards`` forward
    calls and ``logits`` positions projected to the vocabulary: forward + backward (3x the forward) of its
    per-token, per-row, per-logit and training-only per-forward work, plus its per-call work forward
    (``per_forward``) and backward (``per_forward_backward``), plus its backward-only work. ``work``: the
    :class:`harness.costs.Work` of those tokens, for the per-token split of an encoder-decoder."""
    per_token = per_token_flops(overhead, work) if work is not None else overhead.per_token * tokens
    return (3 * (per_token + overhead.train_per_token * tokens + overhead.train_per_row * rows
                 + overhead.train_per_forward * forwards + overhead.train_per_logit * logits)
            + (overhead.per_forward + overhead.per_forward_backward) * forwards
            + overhead.train_backward_per_token * tokens + overhead.train_backward_per_logit * logits)


def linear_layers(model):
    """(name, in_features, out_features) of every torch Linear (bitsandbytes' quantized ones too) / transformers
    Conv1D leaf of ``model``."""
    out = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2 or list(module.children()):
            continue
        kind = type(module).__name__
        if kind in ("Linear", "Linear4bit", "Linear8bitLt"):  # bitsandbytes' (qlora's base) keep in/out_features
            out.append((name, module.in_features, module.out_features))
        elif kind == "Conv1D":  # gpt2: weight [in, out]
            out.append((name, weight.shape[0], weight.shape[1]))
    return out


def matched_linears(model, targets: Iterable[str]):
    """Linears matched by the target suffixes (works before and after peft wraps them in ``base_layer``)."""
    targets = list(targets)
    out = []
    for n, i, o in linear_layers(model):
        n = n.removesuffix(".base_layer")
        if any(n == t or n.endswith("." + t) for t in targets):
            out.append((n, i, o))
    return out


def uses_conv1d(model, targets: Iterable[str]) -> bool:
    """True when the targets are transformers ``Conv1D`` layers (gpt2): peft then needs ``fan_in_fan_out``."""
    targets = list(targets)
    return any(type(m).__name__ == "Conv1D" and any(n == t or n.endswith("." + t) for t in targets)
               for n, m in model.named_modules())


def wrap_peft(model, peft_config, method: str):
    """``peft.get_peft_model`` with peft's complaints turned into one-line :class:`HarnessError`."""
    from peft import get_peft_model

    from harness.compat import peft_legacy_calls

    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and peft_config.task_type == "CAUSAL_LM":
        peft_config.task_type = "SEQ_2_SEQ_LM"  # T5 family (issue 17): prompt tuning prepends to the encoder
    try:
        with peft_legacy_calls():  # PeftModel.__init__ reads model.is_gradient_checkpointing
            return get_peft_model(model, peft_config)
    except (ValueError, TypeError, KeyError, NotImplementedError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HarnessError(f"{method}: peft cannot apply it to {type(model).__name__}: {first}") from exc


def prompt_encoder_flops(model, n_virtual_tokens: int) -> int:
    """Forward FLOPs of a peft prompt encoder for one row: 2 x its weights (embedding table excluded) x tokens."""
    encoders = getattr(model, "prompt_encoder", None)
    if encoders is None:
        return 0
    total = 0
    for name, p in encoders.named_parameters():
        if "embedding" not in name and p.dim() >= 2:
            total += p.numel()
    return 2 * total * n_virtual_tokens
