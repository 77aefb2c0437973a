"""A loaded tokenizer must tokenize like a subword tokenizer: a guard against broken conversions.

Round 7 of the results (docs/benchmarks.md (d)): transformers 5.17.0 converts the Gemma 3 GGUF's tokenizer into one
that splits text into single characters (" True" -> "▁", "T", "r", "u", "e"; 5.25.0 gives "▁True"), with the same
weights file, so the same run ids, and every score silently wrong (the model never saw such inputs). The weights'
fingerprint cannot see this; the tokenizer's output can. :func:`check_tokenizer` refuses a tokenizer that needs more
than half a token per character on plain English (every subword tokenizer needs about a quarter; one per
character is the failure), before any run of the model is scored. A model that is byte- or character-level by
design (ByT5, CANINE) passes with ``HARNESS_ALLOW_CHAR_TOKENIZER=1``.
"""

from __future__ import annotations

import os

from harness.errors import HarnessError

PROBE = "The committee reviewed the proposal on Tuesday and approved it without any changes."
MAX_TOKENS_PER_CHAR = 0.5
ALLOW_ENV = "HARNESS_ALLOW_CHAR_TOKENIZER"  # "1": the model is byte/character-level by design


def tokens_per_char(tokenizer, text: str = PROBE) -> float:
    """Tokens (no special tokens) per character of ``text``."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) / len(text)


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
