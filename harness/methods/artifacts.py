"""Saving and reloading trained methods, all in safetensors.

- ``peft`` methods: the adapter only, with peft's ``save_pretrained`` (``adapter_model.safetensors`` +
  ``adapter_config.json``), reloaded with ``PeftModel.from_pretrained`` onto a fresh base;
- ``model`` (full fine-tuning): the whole model with transformers' ``save_pretrained``;
- ``tensors`` (hand-written methods such as BitFit): the trainable tensors, ``trainable.safetensors``.

A save goes to a temporary folder renamed into place, so a killed process never leaves a half-written adapter.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from harness.errors import HarnessError

TENSORS_FILE = "trainable.safetensors"
SAVED_BUFFER_PREFIX = "saved_"  # buffers named saved_* (FishMask's indices) are saved with the trainable tensors


def save_trained(model, info, directory: str | os.PathLike) -> Path:
    """Save what ``info.artifact`` says of ``model`` under ``directory`` (replacing an earlier save)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    try:
        if info.artifact in ("peft", "model"):
            model.save_pretrained(str(tmp), safe_serialization=True)
        else:
            from safetensors.torch import save_file

            tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            tensors |= {n: b.detach().cpu().contiguous() for n, b in model.named_buffers()
                        if n.rsplit(".", 1)[-1].startswith(SAVED_BUFFER_PREFIX)}
            save_file(tensors, str(tmp / TENSORS_FILE))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _load_state(model, files: list[Path], directory: Path, restore=None) -> None:
    from safetensors.torch import load_file

    if not files:
        raise HarnessError(f"no .safetensors file in {directory}")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    if restore is not None:
        restore(model, state)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise HarnessError(f"{directory}: tensors not in the model: {', '.join(result.unexpected_keys[:5])}")
    return result


def _missing_without_aliases(model, missing_keys: list[str]) -> list[str]:
    """The missing keys that no loaded key stands for: a tied parameter is saved once under one of its names
    (a tied output projection, T5's ``shared`` / ``encoder.embed_tokens`` / ``decoder.embed_tokens``)."""
    names_of: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), set()).add(name)
    missing = set(missing_keys)
    aliases = {n: names for names in names_of.values() for n in names}
    return [k for k in missing_keys if not (aliases.get(k, {k}) - missing)]


def load_trained(base_model, info, directory: str | os.PathLike):
    """``base_model`` (a freshly loaded base) with the method saved under ``directory`` applied, in eval mode."""
    directory = Path(directory)
    if not directory.is_dir():
        raise HarnessError(f"no saved adapter at {directory}; rerun the training run")
    if info.artifact == "peft":
        from peft import PeftModel

        from harness.compat import peft_legacy_calls

        with peft_legacy_calls():  # PeftModel.__init__ reads model.is_gradient_checkpointing
            model = PeftModel.from_pretrained(base_model, str(directory))
    elif info.artifact == "model":
        result = _load_state(base_model, sorted(directory.glob("*.safetensors")), directory)
        missing = _missing_without_aliases(base_model, result.missing_keys)
        if missing:
            raise HarnessError(f"{directory}: the saved model lacks {', '.join(missing[:5])}")
        model = base_model
    else:
        _load_state(base_model, [directory / TENSORS_FILE] if (directory / TENSORS_FILE).exists() else [], directory,
                    info.restore)
        model = base_model
    model.eval()
    return model
