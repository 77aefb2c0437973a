"""Encode a shared prefix (the k demonstrations) once; hand out its KV cache per batch.

Two ways to use it:

- :meth:`PrefixCache.shared` gives the prefix's keys and values once (batch 1) for
  :mod:`harness.attention`'s shared-prefix attention: no copy per row (the default on CUDA);
- :meth:`PrefixCache.expand` gives a fresh copy repeated to the batch size, for any architecture: transformers'
  cache objects are updated in place by every forward, so each batch gets its own copy (``deepcopy``, exact
  also for sliding-window layers, then ``batch_repeat_interleave``).

The prefix itself is computed exactly once per (task, template, seed, k).
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from harness.attention import SharedPrefix
from harness.compat import output_cache


@dataclasses.dataclass
class PrefixCache:
    """The KV cache of the token ids ``ids``."""

    ids: list[int]
    past: object | None  # transformers Cache for the prefix, batch 1; None when the prefix is empty

    @classmethod
    @torch.no_grad()
    def encode(cls, model, ids: list[int]) -> "PrefixCache":
        if not ids:
            return cls([], None)
        device = next(model.parameters()).device
        out = model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1)
        return cls(list(ids), output_cache(out))

    def expand(self, batch: int):
        """A fresh copy of the prefix cache repeated ``batch`` times (None for an empty prefix)."""
        if self.past is None:
            return None
        past = copy.deepcopy(self.past)
        if batch > 1:
            past.batch_repeat_interleave(batch)
        return past

    def shared(self) -> SharedPrefix | None:
        """Per layer the prefix's keys and values [1, Hkv, P, D], not copied (None for an empty prefix)."""
        if self.past is None:
            return None
        layers = getattr(self.past, "layers", None)
        if layers is not None:
            return SharedPrefix([layer.keys for layer in layers], [layer.values for layer in layers])
        return SharedPrefix(list(self.past.key_cache), list(self.past.value_cache))  # older transformers
