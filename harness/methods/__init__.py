"""The method registry: every method the harness can run, by name.

Three kinds:

- ``zeroshot`` / ``icl``: no training; scored by :mod:`harness.icl_runner` (registered here so names validate);
- ``peft``: a module of this package each (``lora``, ``dora``, ``adalora``, ``vera``, ``lokr``, ``oft``, ``qlora``,
  ``ia3``, ``tfew``, ``prompt_tuning``, ``prefix_tuning``, ``ptuning``, ``ln_tuning``, ``bitfit``, ``fishmask``,
  ``intrinsic_said``, ``full``; the
  bottleneck adapters ``adapter``, ``adapter_pfeiffer``, ``compacter``, ``mam`` and ``unipelt``, hand-written in
  :mod:`harness.methods.bottleneck`), plus ``peft:<type>`` for any other method peft implements (``peft:loha``,
  ``peft:boft``, ...), built from peft's own config class.

Each PEFT method has a validated config dataclass (its own arguments plus its preferred training defaults,
see :class:`harness.methods.base.TrainConfig`). :func:`training_settings` resolves preset + method defaults +
``--method-args`` + CLI overrides into one flat, JSON-able dict (sequences as tuples, so it can be hashed); that
dict is ``RunSpec.train`` and is all :func:`apply_method` and :func:`harness.training.train` need.

Importing this package imports neither torch nor peft (the CLI validates names before loading a model).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from harness.errors import HarnessError, suggest
from harness.methods.base import RUN_KEYS, Overhead, TrainConfig, check, is_int

KINDS = ("zeroshot", "icl", "peft")
ARTIFACTS = ("peft", "model", "tensors")
# Lialin et al. 2023 ("Scaling Down to Scale Up", arXiv 2303.15647), section 3: additive (adapters, soft prompts,
# (IA)3), selective (BitFit, LN tuning, FishMask), reparametrization-based (LoRA and kin, intrinsic SAID), hybrid
# (MAM, UniPELT, Compacter); plus the two reference points the harness also runs.
# "other": a ``peft:<type>`` the harness has not classified (harness.methods.generic.PEFT_FAMILIES).
FAMILIES = ("in-context", "additive", "selective", "reparametrization", "hybrid", "full", "other")


@dataclasses.dataclass(frozen=True)
class MethodInfo:
    """One registered method.

    ``apply(model, config) -> model`` freezes the base and makes only the method's parameters trainable;
    ``overhead(model, config) -> Overhead`` says what it adds to each forward (for the FLOPs figures);
    ``artifact`` is how a trained model is saved: ``peft`` (adapter via peft's save_pretrained, safetensors),
    ``model`` (the whole model via save_pretrained) or ``tensors`` (the trainable tensors, one safetensors file);
    ``position_ids`` is False where peft drops explicit position ids (prompt tuning, p-tuning): those are
    trained on right-padded rows and scored one row at a time so padding never shifts positions.

    Properties shown by ``harness methods`` (and grouped on in reports): ``family`` (one of :data:`FAMILIES`);
    ``merges``: the trained change can be folded into the base weights, so a deployed model has no inference
    overhead (LoRA, (IA)3, BitFit; not adapters or soft prompts); ``mixed_batches``: one batch can hold examples of
    different tasks, each with its own trained parameters, without merging (T-Few section 3.3: (IA)3 and soft
    prompts do; selective methods and full fine-tuning change shared weights and cannot).

    ``trains_model_dtype``: the method trains parameters in the model's own dtype (the base weights, or modules it
    adds in that dtype) rather than float32 adapters as peft makes; in bfloat16/float16 those are trained through
    float32 master weights (:mod:`harness.master_weights`), which the run id records (``RunSpec.master_weights``).

    ``costs_version``: bumped (from 0) when the method's FLOPs formula changes the FLOPs its runs store; the run id
    hashes it when nonzero (``RunSpec.costs_version``), so a store's runs with the old figures are made again rather
    than served as new. 1: the per-forward-call work (``Overhead.per_forward``; dora, oft, compacter, ptuning).
    2 (oft): constrained OFT's per-call projection counted (only ``coft`` runs' FLOPs changed). 1 (qlora): its
    4-bit base counted as the matrices it holds (:func:`harness.costs.logical_numel`), its adapted layers found.

    Optional hooks: ``on_step(model, step)`` runs after every optimizer step, gradients still in place (AdaLoRA's
    rank allocation), and ``step_state`` = (get(model) -> dict, set(model, dict)) saves and restores what it keeps
    between steps, so a killed training resumes (:mod:`harness.train_state`); ``quantize`` (``"nf4"``) asks the model loader for a quantized base (QLoRA), checked in
    :func:`harness.api.plan` before any model loads.
    Data-dependent methods (FishMask): ``prepare(model, tokenizer, train_examples, task, settings, seed) -> Work``
    runs after ``apply`` and before training (the runner adds its forward + backward FLOPs, with every parameter's
    gradient, to ``train_flops``); ``restore(model, state)`` rebuilds the method's structure from a saved
    ``tensors`` artifact before its tensors are loaded.
    """

    name: str
    kind: str  # "zeroshot" | "icl" | "peft"
    description: str  # one line, for `harness methods`
    config_cls: type | None = None
    supports_kv_cache: bool = True  # False for prompt/prefix tuning and p-tuning: score with use_cache=False
    apply: Callable | None = None
    overhead: Callable | None = None
    artifact: str = "peft"
    position_ids: bool = True
    family: str = "additive"
    merges: bool = False
    mixed_batches: bool = False
    on_step: Callable | None = None
    step_state: tuple[Callable, Callable] | None = None
    quantize: str | None = None
    prepare: Callable | None = None
    restore: Callable | None = None
    trains_model_dtype: bool = False
    costs_version: int = 0
    shares_block_graph: bool = True  # False: each transformer block reads its own layer's state (the prefix
    # family's cache entry, SAID's per-tensor rays), so compiled blocks would trace a graph per layer and pass
    # dynamo's recompile limit: --compile on/graphs trains such a method eagerly, with a warning

    @property
    def resumable(self) -> bool:
        """Whether a killed training of this method can continue from its saved state (harness.train_state):
        not when state lives outside the parameters and optimizer and the method cannot save it (``on_step``
        without ``step_state``; ``prepare``: FishMask's masks). AdaLoRA saves its allocator's (session 29)."""
        return (self.on_step is None or self.step_state is not None) and self.prepare is None

    def __post_init__(self):
        check(self.kind in KINDS, f"method {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        check(self.family in FAMILIES, f"method {self.name!r}: family must be one of {FAMILIES}, got {self.family!r}")
        check(self.quantize in (None, "nf4"), f"method {self.name!r}: quantize must be None or 'nf4'")
        check(self.artifact in ARTIFACTS, f"method {self.name!r}: artifact must be one of {ARTIFACTS}")
        if self.kind == "peft":
            check(self.config_cls is not None and self.apply is not None,
                  f"PEFT method {self.name!r} needs a config class and an apply function")


_REGISTRY: dict[str, MethodInfo] = {}


def register(info: MethodInfo) -> MethodInfo:
    """Add ``info`` to the registry (a name can be registered once)."""
    check(info.name not in _REGISTRY, f"method {info.name!r} is already registered")
    check(re.fullmatch(r"[a-z][a-z0-9_]*", info.name) is not None, f"bad method name {info.name!r}")
    _REGISTRY[info.name] = info
    return info


def get_method(name: str) -> MethodInfo:
    """The method called ``name``; ``peft:<type>`` builds a generic peft method; unknown names suggest."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("peft:"):
        from harness.methods.generic import generic_method

        return generic_method(name.split(":", 1)[1])
    raise suggest(name, list(_REGISTRY) + ["peft:<type>"], "method")


def list_methods() -> list[MethodInfo]:
    """Registered methods: in-context first, then PEFT, each group by name."""
    return sorted(_REGISTRY.values(), key=lambda m: (KINDS.index(m.kind), m.name))


# --------------------------------------------------------------------------------------- argument parsing

def _typed(raw: str):
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def parse_method_args(text: str | dict | None) -> dict:
    """``"r=16,alpha=32,targets=q_proj|v_proj"`` -> ``{"r": 16, "alpha": 32, "targets": ["q_proj", "v_proj"]}``.

    Values become int, float, bool (true/false), None (none/null) or str; ``|`` separates list items.
    A dict is returned unchanged (already parsed).
    """
    if isinstance(text, dict):
        return dict(text)
    out: dict = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise HarnessError(f"--method-args: expected key=value, got {part.strip()!r} "
                               "(example: r=16,alpha=32,targets=q_proj|v_proj)")
        key, raw = (s.strip() for s in part.split("=", 1))
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise HarnessError(f"--method-args: {key!r} is not a valid argument name")
        if key in out:
            raise HarnessError(f"--method-args: {key!r} is given twice")
        if raw == "":
            raise HarnessError(f"--method-args: {key!r} has no value")
        out[key] = [_typed(v.strip()) for v in raw.split("|")] if "|" in raw else _typed(raw)
    return out


# --------------------------------------------------------------------------------------- settings

def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        raise HarnessError(f"nested settings are not supported: {value!r}")
    return value


def _check_run_keys(run: dict) -> None:
    for key in ("steps", "batch_size", "grad_accum", "n_train"):
        check(is_int(run[key]) and run[key] >= 1, f"{key.replace('_', '-')} must be a positive integer, "
                                                   f"got {run[key]!r}")
    check(run["train_template"] is None or (isinstance(run["train_template"], str) and run["train_template"]),
          f"train-template must be a template name, got {run['train_template']!r}")
    check(run["max_length"] is None or (is_int(run["max_length"]) and run["max_length"] >= 8),
          f"max_length must be an integer >= 8 or none, got {run['max_length']!r}")


def training_settings(name: str, preset: str, overrides: dict | None = None) -> dict:
    """Fully resolved settings of one PEFT method: run keys (steps, batch_size, grad_accum, n_train,
    train_template, max_length) from the preset, the method config's training defaults and arguments, then
    ``overrides`` (None values = not given; ``method_args`` = a dict or a ``--method-args`` string) on top.

    Under the ``quick`` preset the method's ``QUICK_DEFAULTS`` (e.g. a higher ``lr``: 20 steps of the paper's
    rate leave the model where it started) replace its field defaults; ``--method-args`` and the CLI flags still
    win. The ``paper`` preset uses the field defaults, T-Few's."""
    from harness.spec import get_preset

    info = get_method(name)
    if info.kind != "peft":
        raise HarnessError(f"method {name!r} is {info.kind}: it has no training settings")
    p = get_preset(preset)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    method_args = parse_method_args(given.pop("method_args", None))
    allowed = list(RUN_KEYS) + list(TrainConfig.training_fields())
    for key in given:
        if key not in allowed:
            raise suggest(key, allowed, "training setting")
    for key in RUN_KEYS:
        if key in method_args:
            raise HarnessError(f"--method-args: {key!r} is a run setting; pass --{key.replace('_', '-')} instead")
    quick = dict(info.config_cls.QUICK_DEFAULTS) if preset == "quick" else {}
    cfg_args = quick | method_args | {k: v for k, v in given.items() if k not in RUN_KEYS}
    cfg = info.config_cls.from_args(cfg_args, info.name)
    run = {"steps": p.steps, "batch_size": p.batch_size, "grad_accum": 1, "n_train": p.n_train,
           "train_template": None, "max_length": None}
    run |= {k: v for k, v in given.items() if k in RUN_KEYS}
    _check_run_keys(run)
    own = cfg.method_args()
    clash = set(own) & (set(run) | set(cfg.training()))
    check(not clash, f"method {name!r}: argument(s) {sorted(clash)} clash with training settings")
    return {k: _hashable(v) for k, v in (run | cfg.training() | own).items()}


def method_config(name: str, settings: dict) -> TrainConfig:
    """The validated config of method ``name`` from resolved ``settings`` (a ``training_settings`` dict or the
    ``train`` dict of a stored run)."""
    info = get_method(name)
    if info.kind != "peft":
        raise HarnessError(f"method {name!r} is {info.kind}: it is not trained")
    return info.config_cls.from_args({k: v for k, v in settings.items() if k not in RUN_KEYS}, info.name)


def apply_method(model, name: str, settings: dict):
    """Wrap/modify ``model`` so that only the parameters of method ``name`` are trainable; return the model
    to train (a ``PeftModel`` for peft methods, ``model`` itself for ``full`` and ``bitfit``)."""
    info = get_method(name)
    cfg = method_config(name, settings)
    if getattr(cfg, "total_step", 0) is None and settings.get("steps"):  # AdaLoRA's schedule spans the run
        cfg.total_step = settings["steps"]
    return info.apply(model, cfg)


def method_overhead(model, name: str, settings: dict) -> Overhead:
    """What method ``name`` adds to each forward of ``model`` (before or after :func:`apply_method`)."""
    info = get_method(name)
    return info.overhead(model, method_config(name, settings)) if info.overhead else Overhead()


register(MethodInfo("zeroshot", "zeroshot", "no demonstrations, no training: the template's prompt alone",
                    family="in-context", merges=True, mixed_batches=True))
register(MethodInfo("icl", "icl", "k-shot in-context learning: k demonstrations before each prompt (--k)",
                    family="in-context", merges=True, mixed_batches=True))

# Built-in PEFT methods register themselves on import (each module imports no torch at import time).
from harness.methods import (  # noqa: E402,F401
    adalora,
    adapter,
    adapter_pfeiffer,
    bitfit,
    compacter,
    dora,
    fishmask,
    full,
    ia3,
    intrinsic_said,
    ln_tuning,
    lokr,
    lora,
    mam,
    oft,
    prefix_tuning,
    prompt_tuning,
    ptuning,
    qlora,
    tfew,
    unipelt,
    vera,
)
