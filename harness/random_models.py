"""Randomly initialised models of real architectures, for speed measurements where no weights can be brought.

``--model random:NAME`` builds the architecture NAME with seeded random weights:

- ``smollm2-135m``: SmolLM2-135M (llama-style, 30 layers, d=576, vocab 49,152);
- ``llama-1b``: Llama-3.2-1B dimensions (16 layers, d=2048, 32 heads / 8 KV heads, MLP 8192, vocab 128,256,
  tied embeddings, llama3 RoPE with theta 500,000);
- ``qwen2.5-0.5b``: Qwen2.5-0.5B dimensions (24 layers, d=896, 14 heads / 2 KV heads, MLP 4864, vocab 151,936,
  tied embeddings, q/k/v biases);
- ``t5-small``, ``t5-base``: T5 (encoder-decoder, ReLU feed-forward, tied embeddings, vocab 32,128);
- ``t0-3b``: T0-3B (T5-XL dims: 24+24 layers, d=2048, 32 heads, gated-GELU feed-forward 5120, untied output),
  the T-Few paper's backbone;
- a path to a ``config.json`` (or a folder holding one) of any causal or encoder-decoder LM transformers knows
  (``is_encoder_decoder`` in the config selects ``AutoModelForSeq2SeqLM``).

The three named configurations are stored beside this module (``harness/configs/*.json``), copied from the
published ``config.json`` files. Weights do not change speed, so throughput, memory and FLOPs of these models are
those of the real ones; their predictions are meaningless, and runs with them are stored with ``is_random`` and
left out of reports' accuracy tables unless asked for.

Tokenizer: SmolLM2's real tokenizer (vocab 49,152), taken from the embedded model (converted once) and kept under
``$HARNESS_CACHE_DIR/tokenizers/smollm2-135m`` so that later builds (and machines without the GGUF package) need
only that folder. Llama 3's and Qwen 2.5's tokenizers cannot be had offline: their models are built with their
real vocabulary sizes (the embedding and output matrices, and so the FLOPs and memory, are the real ones) but
read text through SmolLM2's tokenizer, so token ids stay below 49,152 and prompts are a few percent longer or
shorter in tokens than with the real tokenizers. T5's SentencePiece tokenizer cannot be had offline either
(no ``spiece.model``, no ``sentencepiece``): random T5 models read text through SmolLM2's byte-level BPE cut to
its first 32,128 tokens (merges whose result lies beyond dropped; its merges are in id order, so the cut
tokenizer is a valid BPE), kept under ``$HARNESS_CACHE_DIR/tokenizers/smollm2-135m-32128``; the model's
vocabulary size (32,128) is the real one, the token counts are SmolLM2-like (a few percent more than a 49k
BPE's), never T5's. Token 0 (``<|endoftext|>``) is the pad and decoder start token, as T5's ``<pad>``. A ``config.json`` whose folder holds tokenizer files uses those.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from harness.errors import HarnessError, suggest

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
RANDOM_NAMES = ("smollm2-135m", "llama-1b", "qwen2.5-0.5b", "t5-small", "t5-base", "t0-3b")
T5_VOCAB = 32128
DEFAULT_SEED = 0
TOKENIZER_NAME = "smollm2-135m"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def config_path(name: str) -> Path:
    """The ``config.json`` behind ``random:NAME`` (a named architecture, a file, or a folder holding one)."""
    if name in RANDOM_NAMES:
        return CONFIG_DIR / f"{name}.json"
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "config.json"
    return path


def check_random_name(name: str) -> None:
    """Cheap check of ``random:NAME`` before anything loads: a known architecture or an existing config file."""
    if not name:
        raise HarnessError(f"--model random: needs an architecture: one of {', '.join(RANDOM_NAMES)} "
                           "or a path to a config.json")
    if name in RANDOM_NAMES:
        return
    looks_like_path = "/" in name or name.endswith(".json") or name.startswith((".", "~"))
    if not looks_like_path:
        raise suggest(name, list(RANDOM_NAMES), "random-model architecture")
    path = config_path(name)
    if not path.is_file():
        raise HarnessError(f"--model random:{name}: no config file at {path}; pass one of "
                           f"{', '.join(RANDOM_NAMES)} or a path to a config.json")


def load_config(name: str):
    """The transformers config of ``random:NAME`` (keys starting with ``_`` in our JSON files are notes)."""
    from transformers import AutoConfig

    check_random_name(name)
    path = config_path(name)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HarnessError(f"could not read model config {path}: {exc}") from exc
    data = {k: v for k, v in data.items() if not k.startswith("_") or k == "_attn_implementation"}
    if "model_type" not in data:
        raise HarnessError(f"model config {path} has no model_type")
    try:
        return AutoConfig.for_model(**data)
    except (ValueError, KeyError) as exc:
        raise HarnessError(f"model config {path}: {exc}") from exc


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in _TOKENIZER_FILES)


def cut_tokenizer(source: Path, vocab: int) -> Path:
    """SmolLM2's byte-level BPE cut to its first ``vocab`` tokens (for random T5 models; module docstring)."""
    from harness.model_files import cache_dir

    kept = cache_dir() / "tokenizers" / f"{TOKENIZER_NAME}-{vocab}"
    if _has_tokenizer(kept):
        return kept
    data = json.loads((source / "tokenizer.json").read_text())
    model = data["model"]
    model["vocab"] = {t: i for t, i in model["vocab"].items() if i < vocab}
    model["merges"] = [m for m in model["merges"]
                       if model["vocab"].get("".join(m) if isinstance(m, list) else m.replace(" ", ""), vocab) < vocab]
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < vocab]
    tmp = kept.with_name(f".{kept.name}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.update(pad_token="<|endoftext|>", eos_token="<|im_end|>", bos_token=None)
    (tmp / "tokenizer_config.json").write_text(json.dumps(config))
    try:
        tmp.replace(kept)
    except OSError:  # another process kept it first
        pass
    return kept if _has_tokenizer(kept) else tmp


def tokenizer_folder(name: str) -> Path:
    """Where the tokenizer of ``random:NAME`` is read from (see the module docstring)."""
    if name not in RANDOM_NAMES:
        own = config_path(name).parent
        if _has_tokenizer(own):
            return own
    if name != TOKENIZER_NAME and getattr(load_config(name), "is_encoder_decoder", False):
        return cut_tokenizer(tokenizer_folder(TOKENIZER_NAME), T5_VOCAB)
    from harness.model_files import cache_dir

    kept = cache_dir() / "tokenizers" / TOKENIZER_NAME
    if _has_tokenizer(kept):
        return kept
    from transformers import AutoTokenizer

    from harness.model_files import model_source

    source, _ = model_source(TOKENIZER_NAME)  # converts the embedded GGUF once
    tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
    kept.parent.mkdir(parents=True, exist_ok=True)
    tmp = kept.with_name(f".{kept.name}.tmp")
    tok.save_pretrained(tmp)
    try:
        tmp.replace(kept)
    except OSError:  # another process kept it first
        pass
    return kept if _has_tokenizer(kept) else tmp


def build_random_model(name: str, dtype: torch.dtype = torch.float32, seed: int = DEFAULT_SEED,
                       device: str | torch.device | None = None):
    """``(model, tokenizer)``: architecture NAME with weights drawn from a seeded generator, SDPA attention.

    The weights are drawn on ``device`` (default: the GPU when one is present, since drawing a billion numbers on
    the CPU takes tens of seconds); the same seed gives the same weights on the same kind of device. The caller's
    random state is left untouched (the draw happens inside ``torch.random.fork_rng``).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    config = load_config(name)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_folder(name)), local_files_only=True)
    vocab = getattr(getattr(config, "text_config", config), "vocab_size", None)
    if vocab is not None and len(tok) > vocab:
        raise HarnessError(f"random:{name}: the tokenizer has {len(tok)} tokens but the model only {vocab}")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), dev:
        torch.manual_seed(seed)
        if getattr(config, "is_encoder_decoder", False):  # T5 has no SDPA path: its relative position bias
            model = AutoModelForSeq2SeqLM.from_config(config, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    return model, tok
