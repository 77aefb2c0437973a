"""Picking the predicted choice from per-choice scores: :func:`argmax_first` (deterministic ties, non-finite scores
an error with :func:`non_finite_message`). Below :mod:`harness.scoring` and :mod:`harness.store`, which both use it."""

from __future__ import annotations

import math
from collections.abc import Sequence

from harness.errors import HarnessError


def non_finite_message(example_id, choice: int, value) -> str:
    return (f"non-finite log-prob {value} for example {example_id!r}, choice {choice}: the model's scores "
            "overflowed or are NaN (a low-precision dtype? try --dtype float32); the run fails instead of "
            "predicting from them")


def argmax_first(values: Sequence[float], example_id: str | None = None) -> int:
    """Index of the largest value; ties break to the lowest index, deterministically (as ``np.argmax``).

    A NaN or infinite value raises :class:`HarnessError` naming the choice (and ``example_id`` when given): a
    prediction from an overflowed score would look like a real one, so the run must fail instead.
    """
    best, best_i = -math.inf, 0
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise HarnessError(non_finite_message("?" if example_id is None else example_id, i, v))
        if v > best:
            best, best_i = v, i
    return best_i


def norm_char_scores(logprobs: list[float], n_chars: list[int]) -> list[float]:
    """``logprob / n_chars`` per choice (an empty choice counts as one character, as per token)."""
    return [lp / max(n, 1) for lp, n in zip(logprobs, n_chars)]
