"""BitFit (Ben Zaken et al. 2022, arXiv 2106.10199): train only the bias terms; written by hand (peft has no
BitFit). A model without bias parameters (llama-style models such as SmolLM2) is an error, not a silent no-op.
Saved as the trainable tensors in one safetensors file.
"""

from __future__ import annotations

import dataclasses

from harness.errors import HarnessError
from harness.methods import MethodInfo, register
from harness.methods.base import Overhead, TrainConfig


@dataclasses.dataclass
class BitFitArgs(TrainConfig):
    """Defaults (r-three/t-few ``configs/bitfit.json``): every parameter whose name ends in ``bias``, Adafactor
    lr 3e-4 with ``scale_parameter=True`` (Config.py's default, kept by ``bitfit.json``), linear decay after 6%
    warmup; loss L_LM. (T-Few's BitFit also trains layer norms; ours trains biases
    only, as Ben Zaken et al. — combine with ``ln_tuning`` runs to compare.)
    """

    lr: float = 3e-4


def apply(model, cfg: BitFitArgs):
    biases = [(n, p) for n, p in model.named_parameters() if n.endswith("bias")]
    if not biases:
        raise HarnessError(f"bitfit: {type(model).__name__} has no bias parameters, so BitFit would train nothing; "
                           "use ln_tuning or ia3 for a comparably tiny method")
    for _, p in model.named_parameters():
        p.requires_grad_(False)
    for _, p in biases:
        p.requires_grad_(True)
    return model


register(MethodInfo(
    "bitfit", "peft", "BitFit (Ben Zaken et al. 2022): train only bias terms (needs a model with biases)",
    config_cls=BitFitArgs, apply=apply, overhead=lambda model, cfg: Overhead(), artifact="tensors",
    family="selective", merges=True, trains_model_dtype=True))
