"""Lossless short JSON for float32 numbers: the store's per-example log-probs and loss curves.

Every log-prob and loss the harness stores comes from a float32 tensor, so each is a double that float32 holds
exactly (checked on the committed store of 880 runs: all 2,052,096 of its log-probs and losses). Python's ``json`` writes such a
double with up to 17 digits (``0.10000000149011612``); the shortest decimal that float32 reads back as the same
value (``0.1``) has at most 9. :func:`compact` swaps every float32-exact double for the double of that shortest
decimal, which reads back to the same float32 (``float32(compact(x)) == x``); a double float32 cannot hold is kept
as it is. So the stored text shrinks (the committed store: 6.2 MB -> 4.3 MB as .xz) and no float32 value
changes; order and ties among values are kept, as is every prediction made from them.

Used for the committed exports only (``python -m benchmarks.compact_store``), not by :class:`harness.store.Store`:
a figure derived from stored values in double precision (e.g. calibration's ``p_cf`` from its content-free
log-probs) reproduces bit for bit only from the original doubles; from a compacted store, read each value as
float32 first (``float(numpy.float32(x))`` gives the original double back).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def compact_float(x: float) -> float:
    """``x`` itself, or, when float32 holds ``x`` exactly, the double of float32's shortest decimal for it."""
    if not math.isfinite(x):
        return x
    f = np.float32(x)
    if float(f) != x:  # not a float32 value: keep every bit
        return x
    return float(str(f))  # numpy prints float32's shortest round-trip decimal


def compact(obj: Any) -> Any:
    """``obj`` with every float (in lists, tuples and dict values, recursively) passed through
    :func:`compact_float`; other values unchanged."""
    if isinstance(obj, float):
        return compact_float(obj)
    if isinstance(obj, (list, tuple)):
        return [compact(v) for v in obj]
    if isinstance(obj, dict):
        return {k: compact(v) for k, v in obj.items()}
    return obj
