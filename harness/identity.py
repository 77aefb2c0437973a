"""What makes two runs the same run: fingerprints of the model, the data and the code's numerics.

A run's id (:attr:`harness.spec.RunSpec.run_id`) hashes every input that can change its numbers. Besides the
grid coordinates and settings, that is:

- ``task_hash``: the normalized task definition (:meth:`harness.tasks.Task.fingerprint`);
- ``data_hash``: :func:`data_fingerprint` of the example rows the run actually reads (evaluation rows after
  ``--limit``, the demonstrations of an ICL run, the training rows of a PEFT run) and of where they came from
  (local files or the Hub; the T-Few subset file or the seeded fallback sample);
- ``model_fingerprint``: :func:`model_fingerprint`: a sha256 of the weights file (GGUF) or of every file of a
  local folder, the Hub commit of a Hub id, or the config and seed of a ``random:`` model; cached per file by
  (path, size, mtime) so a 100 MB file is read once, not once per run;
- ``scoring_version``: :data:`SCORING_VERSION`, bumped by hand whenever scoring or training numerics change
  (tokenization, the scorer, losses, optimizer semantics, schedule), so stores made by older code re-run. "Numerics"
  means in every dtype: a path equal in float32 can move bfloat16 scores (8817784's padding change did, under
  unchanged ids; reverted in bde8a16). Before landing a scorer or attention change, compare the stores of
  ``harness run --methods zeroshot --tasks wsc,wic --limit 48 --dtype bfloat16 --device cpu`` before and after.

- ``optimizer_version``: :func:`optimizer_version`, for PEFT runs trained by Adafactor on CUDA only (the CPU trains
  with transformers' own class): :data:`CUDA_ADAFACTOR_VERSION` of :mod:`harness.optim`'s update, whose float32
  rounding on CUDA depends on how its reductions are batched.

Changing any of these makes new run ids (the old runs stay in the store, untouched); unchanged inputs keep
their ids, so finished runs are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from harness.errors import HarnessError

# Bump when a change to scoring, tokenization, losses, the optimizer or the schedule changes any stored number.
# 2: T-Few's Adafactor options per method, n_chars without the delimiter, the new task fields.
SCORING_VERSION = 2
# Bump when the FLOPs figures of PEFT runs on encoder-decoder models change (RunSpec.seq2seq_costs; causal models'
# ids are untouched). 1: a method's per-token overhead charged to the stack it runs in (encoder tokens, decoder
# tokens, cross-attention K/V per encoder state and decoder row), no longer to every token. 2: under peft's prompt
# learning the prompt is counted as encoded once per choice, as it runs.
SEQ2SEQ_COSTS_VERSION = 2
ENCODER_DECODER_TYPES = ("t5", "mt5", "umt5")
# Bump when harness.optim.Adafactor's update (CUDA only: harness.training.make_optimizer's fused path) is computed
# differently, even if equal in exact arithmetic. 1: factored parameters of one shape updated as one stack, every
# reduction per slice (session 31; bit for bit the per-parameter update on the CPU, not promised on CUDA).
CUDA_ADAFACTOR_VERSION = 1


def optimizer_version(device: str, settings: dict) -> int:
    """The optimizer-implementation version a run's id hashes (``RunSpec.optimizer_version``): nonzero only for a
    training by Adafactor on CUDA, so every other run keeps its id."""
    return CUDA_ADAFACTOR_VERSION if device == "cuda" and settings.get("optimizer") == "adafactor" else 0

_HASH_CHUNK = 1 << 20


def rows_sha256(rows: list[dict]) -> str:
    """sha256 of example rows in order (canonical JSON per row: key order does not count, values do)."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def data_fingerprint(parts: dict) -> str:
    """16 hex digits over ``parts``: {"source": ..., "eval": rows_sha256, "demos"/"train": rows_sha256, ...}."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- models

def _fingerprint_cache() -> Path:
    from harness.models import cache_dir

    return cache_dir() / "fingerprints.json"


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, cached by (resolved path, size, mtime_ns) in the harness cache folder."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    cache_file = _fingerprint_cache()
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return cached[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    cached[key] = value
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cached, sort_keys=True))
        os.replace(tmp, cache_file)
    except OSError:  # a read-only cache only costs a re-hash next time
        pass
    return value


def folder_sha256(folder: Path) -> str:
    """sha256 over (relative name, file sha256) of every regular file under ``folder`` (hidden files skipped)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        digest.update(f"{relative.as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _hub_revision(name: str) -> str:
    """The commit of Hub model ``name``: from the local Hub cache if present, else asked of the Hub."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(name, local_files_only=True)
        return Path(folder).name
    except Exception:  # noqa: BLE001 - not cached: ask the Hub
        pass
    try:
        from huggingface_hub import HfApi

        sha = HfApi().model_info(name).sha
    except Exception as error:  # noqa: BLE001 - offline, unknown id, auth
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise HarnessError(f"cannot resolve the Hub revision of model {name!r} ({reason}); pass a local folder or "
                           "a .gguf file, or run online once") from None
    if not sha:
        raise HarnessError(f"the Hub gave no revision for model {name!r}; pass a local folder or a .gguf file")
    return sha


def model_fingerprint(name: str) -> str:
    """What identifies ``--model name``'s weights (and tokenizer): see the module docstring."""
    from harness.models import EMBEDDED, embedded_gguf

    if name.startswith("random:"):
        from harness.random_models import DEFAULT_SEED, config_path

        random_name = name.split(":", 1)[1]
        config = config_path(random_name)
        text = config.read_bytes() if config.is_file() else random_name.encode()
        return f"random:{hashlib.sha256(text).hexdigest()[:16]}:seed{DEFAULT_SEED}"
    if name in EMBEDDED:
        return f"sha256:{file_sha256(embedded_gguf(name))[:16]}"
    path = Path(name).expanduser()
    if path.is_file():
        return f"sha256:{file_sha256(path)[:16]}"
    if path.is_dir():
        return f"sha256-folder:{folder_sha256(path)[:16]}"
    return f"hub:{name}@{_hub_revision(name)}"


def is_encoder_decoder(name: str) -> bool:
    """Whether ``--model name`` is an encoder-decoder (T5 family), read from its ``config.json`` (a ``random:``
    architecture, a local folder, a Hub id's from the cache or the Hub: a small file, fetched at plan time as the
    Hub revision is) without loading a model; GGUF files and the embedded models are causal."""
    from harness.models import EMBEDDED

    if name in EMBEDDED or name.endswith(".gguf"):
        return False
    if name.startswith("random:"):
        from harness.random_models import config_path

        path = config_path(name.split(":", 1)[1])
    else:
        path = Path(name).expanduser() / "config.json"
        if not path.is_file():
            try:
                from huggingface_hub import hf_hub_download, try_to_load_from_cache

                cached = try_to_load_from_cache(name, "config.json")
                if not isinstance(cached, str):
                    cached = hf_hub_download(name, "config.json")
            except Exception:  # noqa: BLE001 - a malformed id or no network: the load reports it
                cached = None
            path = Path(cached) if isinstance(cached, str) else path
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return bool(config.get("is_encoder_decoder")) or config.get("model_type") in ENCODER_DECODER_TYPES


def model_display_name(name: str) -> str:
    """How a model is shown and grouped in tables: the embedded, random or Hub name as given, or the file or
    folder name of a local path (never a temporary folder's full path)."""
    from harness.models import EMBEDDED

    if name.startswith("random:") or name in EMBEDDED:
        return name
    path = Path(name).expanduser()
    if path.exists():
        return path.resolve().name
    return name  # a Hub id such as org/model
