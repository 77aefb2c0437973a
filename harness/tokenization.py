"""Token ids for scoring and training: lm-evaluation-harness's split of a (context, continuation) pair.

Tokenization follows lm-evaluation-harness so our log-likelihoods can be compared with other tools' on the same
strings: trailing whitespace of the context moves to the continuation, the whole string is encoded, and the
continuation's tokens are the tail of the whole encoding after the context's own encoding (:func:`encode_pair`).
:func:`encode_batch` gives the same ids for many items with one tokenizer call: each context is encoded once for
all its choices, and when every context starts with the same demonstrations, the head of them up to a cut known
to be safe (:func:`split_point`) is encoded once. :func:`tokenize_prompts` builds the :class:`Row` objects that
:mod:`harness.scoring` scores: one per prompt, or one per choice of a partial-scoring prompt
(:attr:`harness.templates.Prompt.contexts`). This module needs no torch; :mod:`harness.scoring` re-exports its
public names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from harness.templates import Prompt


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def bos_ids(tokenizer) -> list[int]:
    """BOS token to prepend when the tokenizer adds one by default (Gemma); none for SmolLM2."""
    probe = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and probe and probe[0] == bos else []


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split of (context, continuation) into token ids (BOS included in context)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return bos_ids(tokenizer) + ctx, whole[len(ctx):]


@dataclasses.dataclass
class Row:
    """One query's tokens: shared context ids and one continuation per choice."""

    context: list[int]
    continuations: list[list[int]]


def encode_batch(tokenizer, items: Sequence[tuple[str, Sequence[str]]],
                 shared: str = "") -> list[tuple[list[int], list[list[int]]]]:
    """Split each (context, choices) like :func:`encode_pair`, with one tokenizer call for every string.

    Moving the context's trailing whitespace to the continuation leaves the same stripped context for every
    choice, so it is encoded once per item; the whole strings are encoded once per choice. When every context
    starts with ``shared`` (the demonstrations) and the tokenizer allows it (:func:`split_point`), the head of
    ``shared`` up to a safe cut is encoded once and only the rest of each string per item.
    """
    cut = split_point(tokenizer, shared) if shared and all(c.startswith(shared) for c, _ in items) else 0
    out = _encode_items(tokenizer, items, cut, _encode(tokenizer, shared[:cut]) if cut else [])
    if cut and items:  # belt and braces: the first item must match the plain encoding exactly
        context, choices = items[0]
        pairs = [encode_pair(tokenizer, context, c) for c in choices]
        if out[0] != (pairs[0][0], [c for _, c in pairs]):
            out = _encode_items(tokenizer, items, 0, [])
    return out


def _encode_items(tokenizer, items, cut: int, head: list[int]) -> list[tuple[list[int], list[list[int]]]]:
    texts: list[str] = []
    for context, choices in items:
        stripped = context.rstrip()
        spaces = context[len(stripped):]
        texts.append(stripped[cut:])
        texts.extend(stripped[cut:] + spaces + c for c in choices)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    bos = bos_ids(tokenizer)
    out, pos = [], 0
    for _, choices in items:
        ctx = ids[pos]
        wholes = ids[pos + 1:pos + 1 + len(choices)]
        pos += 1 + len(choices)
        out.append((bos + head + ctx, [w[len(ctx):] for w in wholes]))
    return out


def split_point(tokenizer, text: str) -> int:
    """A cut c in ``text`` with encode(text[:c] + rest) == encode(text[:c]) + encode(text[c:] + rest) for any rest
    (0 when none is known to be safe).

    Holds for byte-level BPE with GPT-2's pre-tokenizer regex (SmolLM2, GPT-2; optionally with single digits) and
    no normalizer: BPE never merges across pre-tokens, and the regex, which has no look-behind or anchors, never
    extends a pre-token from a newline into a following non-space character. A run of whitespace W followed by a
    non-space character is pre-tokenized as W[:-1] and W[-1] (``\\s+(?!\\S)`` stops one short of the character),
    while at the end of a string all of W is one pre-token; so the cut is taken inside the last such run that ends
    in a newline, before its last character (after it when the run is that one newline), and only if no added token
    (special tokens are split out before pre-tokenization) occurs in ``text``.
    """
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.pre_tokenizer is None:
        return 0
    pre = json.loads(backend.pre_tokenizer.__getstate__())
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if (backend.normalizer is not None or type(backend.model).__name__ != "BPE" or len(byte_level) != 1
            or not byte_level[0].get("use_regex", True) or byte_level[0].get("add_prefix_space", False)
            or any(p.get("type") not in ("ByteLevel", "Digits") for p in parts)):
        return 0
    if any(t.content in text for t in getattr(tokenizer, "added_tokens_decoder", {}).values()):
        return 0
    for c in range(len(text) - 2, 0, -1):
        if text[c - 1] == "\n" and not text[c].isspace():
            return c if c < 2 or not text[c - 2].isspace() else c - 1
    return 0


def tokenize_prompts(tokenizer, prompts: Sequence[Prompt], prefix: str) -> list[Row]:
    """The token rows to score: one per prompt (its context once, all its choices), or for a partial-scoring
    prompt one per choice (that choice's context and the shared continuation)."""
    return _tokenize(tokenizer, prompts, prefix)[0]


def _tokenize(tokenizer, prompts: Sequence[Prompt], prefix: str) -> tuple[list[Row], list[int]]:
    """:func:`tokenize_prompts` and, per row, the index of its prompt."""
    items, owners = [], []
    for i, p in enumerate(prompts):
        if p.contexts:  # partial scoring: a context of its own per choice
            items.extend((prefix + context, [continuation]) for context, continuation in p.pairs())
            owners.extend([i] * len(p.choices))
        else:
            items.append((prefix + p.context, p.choices))
            owners.append(i)
    encoded = encode_batch(tokenizer, items, shared=prefix)
    rows = []
    for i, (ctx, conts) in zip(owners, encoded):
        if not all(conts):
            raise ValueError(f"empty continuation for example {prompts[i].example_id}: {prompts[i].choices}")
        rows.append(Row(ctx, conts))
    return rows, owners
