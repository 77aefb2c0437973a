"""A loaded tokenizer must tokenize like a subword tokenizer: a guard against broken conversions.

Round 7 of the results (docs/benchmarks.md (d)): transformers 5.17.0 converts the Gemma 3 GGUF's tokenizer into one
that splits text into single characters (" True" -> "▁", "T", "r", "u", "e"; 5.25.0 gives "▁True"), with the same
weights file, so the same run ids, and every score silently wrong (the model never saw such inputs). The weights'
fingerprint cannot see this; the tokenizer's output can. :func:`check_tokenizer` refuses a tokenizer that needs more
than half a token per character on plain English (every subword tokenizer needs about a quarter; one per
character is the failure), before any run of the model is scored. A model that is byte- or character-level by
design (ByT5, CANINE) passes with ``HARNESS_ALLOW_CHAR_TOKENIZER=1``.

:func:`tokenizer_fingerprint` is what every run records beside its environment (``env["tokenizer"]``): a hash of
the vocabulary size and of the token ids of a few probe texts. The run identity cannot hold it (it is fixed before
any tokenizer loads), but two runs of one model whose fingerprints differ were tokenized differently, and
``benchmarks/results_sanity.py`` lists the fingerprints per model.
"""

from __future__ import annotations

import hashlib
import json
import os

from harness.errors import HarnessError

PROBE = "The committee reviewed the proposal on Tuesday and approved it without any changes."
MAX_TOKENS_PER_CHAR = 0.5
ALLOW_ENV = "HARNESS_ALLOW_CHAR_TOKENIZER"  # "1": the model is byte/character-level by design


def tokens_per_char(tokenizer, text: str = PROBE) -> float:
    """Tokens (no special tokens) per character of ``text``."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) / len(text)


FINGERPRINT_TEXTS = (PROBE, " True False Neither yes no", "Élan naïve café: 日本語, 12.5%\n\tend")


def tokenizer_fingerprint(tokenizer) -> str:
    """16 hex digits of sha256 over ``len(tokenizer)`` and the ids of :data:`FINGERPRINT_TEXTS` (no special tokens)."""
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in FINGERPRINT_TEXTS]
    return hashlib.sha256(json.dumps([len(tokenizer), ids]).encode()).hexdigest()[:16]


def run_env(env: dict | None, tokenizer) -> dict:
    """``env`` with the tokenizer's fingerprint added (what a run records once its model has loaded); unchanged
    for a model without a tokenizer (the unit tests' stand-ins)."""
    if tokenizer is None:
        return env or {}
    return (env or {}) | {"tokenizer": tokenizer_fingerprint(tokenizer)}


def check_tokenizer(tokenizer, model_name: str) -> None:
    """Raise :class:`HarnessError` when ``tokenizer`` splits plain English nearly per character."""
    if os.environ.get(ALLOW_ENV) == "1":
        return
    ratio = tokens_per_char(tokenizer)
    if ratio > MAX_TOKENS_PER_CHAR:
        import transformers

        raise HarnessError(
            f"model {model_name!r}: its tokenizer splits plain English into {ratio:.2f} tokens per character (a "
            f"subword tokenizer gives about 0.25): a broken tokenizer conversion (transformers 5.17's GGUF "
            f"conversion of Gemma 3 does this; this is transformers {transformers.__version__}); install another "
            f"transformers version (5.25 converts it correctly) and delete the converted copy in the harness cache "
            f"($HARNESS_CACHE_DIR/converted); a byte-level model by design (ByT5) needs {ALLOW_ENV}=1")
