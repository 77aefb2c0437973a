"""``peft:<type>``: any method peft implements (``peft:loha``, ``peft:lokr``, ``peft:vera``, ``peft:boft``, ...),
configured with peft's own config class for that type from ``--method-args`` (``targets`` is an alias of
``target_modules``). peft's defaults apply to everything not given, including its per-architecture target
modules. Nothing is counted as inference overhead for these methods (not modelled).
"""

from __future__ import annotations

import dataclasses

from harness.errors import HarnessError, suggest
from harness.methods import MethodInfo
from harness.methods.base import TrainConfig, wrap_peft

# Family of each peft type (Lialin et al. 2023's taxonomy; harness.methods.FAMILIES), from each method's paper;
# a type not listed is "other". merges: peft can fold it into the base weights (merge_and_unload).
PEFT_FAMILIES = {
    "additive": ("adaption_prompt", "cartridge", "cpt", "ia3", "multitask_prompt_tuning", "p_tuning",
                 "prefix_tuning", "prompt_tuning"),
    "selective": ("ln_tuning", "shira", "trainable_tokens"),
    "reparametrization": ("adalora", "boft", "c3a", "delora", "fourierft", "gralora", "hira", "hra", "loha", "lokr",
                          "lora", "miss", "oft", "randlora", "road", "tinylora", "vblora", "vera", "waveft"),
    "hybrid": ("glora", "poly", "xlora"),
}
# peft types whose trainable parameters keep the model's dtype (peft casts the others' adapters to float32):
# copies of the model's own modules (LayerNorm tuning) or rows of its embedding (tests/test_master_weights.py)
MODEL_DTYPE_TYPES = frozenset({"ln_tuning", "trainable_tokens"})
MERGEABLE = set(PEFT_FAMILIES["reparametrization"]) | {"ia3", "ln_tuning", "shira"}


def peft_family(key: str) -> str:
    """The family of peft type ``key`` (lower case), "other" if unclassified."""
    return next((family for family, keys in PEFT_FAMILIES.items() if key in keys), "other")


RESERVED = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode")


@dataclasses.dataclass
class GenericPeftArgs(TrainConfig):
    """Defaults: peft's own for the method; AdamW lr 1e-3 (a middle-of-the-road adapter rate, tune with --lr),
    linear decay after 6% warmup; loss L_LM. ``peft_args`` holds the keyword arguments for peft's config class.
    """

    peft_args: dict = dataclasses.field(default_factory=dict)
    lr: float = 1e-3
    optimizer: str = "adamw"
    peft_config_cls = None  # set on the per-type subclass made by generic_method

    @classmethod
    def from_args(cls, args: dict, method: str) -> "GenericPeftArgs":
        train_keys = set(cls.training_fields())
        training = {k: v for k, v in args.items() if k in train_keys}
        own = {("target_modules" if k == "targets" else k): v for k, v in args.items() if k not in train_keys}
        cfg = cls(peft_args=own, **training)
        cfg.peft_config()  # validates the arguments with peft's class
        return cfg

    def method_args(self) -> dict:
        return dict(self.peft_args)

    def peft_config(self):
        known = [f.name for f in dataclasses.fields(self.peft_config_cls) if f.name not in RESERVED]
        for key in self.peft_args:
            if key not in known:
                raise suggest(key, known, f"argument of {self.peft_config_cls.__name__}")
        kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in self.peft_args.items()}
        try:
            return self.peft_config_cls(task_type="CAUSAL_LM", **kwargs)
        except Exception as exc:  # peft validates in __post_init__ with ValueError/TypeError
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise HarnessError(f"{self.peft_config_cls.__name__}: {first}") from exc


def generic_method(type_name: str) -> MethodInfo:
    """A :class:`MethodInfo` for peft's method ``type_name`` (case-insensitive, e.g. ``loha``, ``p_tuning``)."""
    from peft.config import PromptLearningConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    known = {t.value.lower(): t for t in PEFT_TYPE_TO_CONFIG_MAPPING}
    key = type_name.strip().lower()
    if key not in known:
        raise suggest(f"peft:{type_name}", [f"peft:{k}" for k in known], "peft method")
    peft_cls = PEFT_TYPE_TO_CONFIG_MAPPING[known[key]]
    args_cls = type(f"Peft{peft_cls.__name__}Args", (GenericPeftArgs,), {"peft_config_cls": peft_cls})
    prompt_learning = issubclass(peft_cls, PromptLearningConfig)

    def apply(model, cfg: GenericPeftArgs):
        return wrap_peft(model, cfg.peft_config(), f"peft:{key}")

    return MethodInfo(
        f"peft:{key}", "peft", f"peft's {peft_cls.__name__} (arguments via --method-args)", config_cls=args_cls,
        supports_kv_cache=not prompt_learning, apply=apply,
        position_ids=not prompt_learning or key in ("prefix_tuning", "cartridge"),
        family=peft_family(key), merges=key in MERGEABLE, mixed_batches=prompt_learning,
        trains_model_dtype=key in MODEL_DTYPE_TYPES, shares_block_graph=key != "prefix_tuning")
