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
from harness.compat import cache_kwargs, output_cache


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

    def head(self, n: int) -> "PrefixCache | None":
        """The cache of the first ``n`` of these tokens (a cropped copy; this cache is left as it is), for a
        shorter prefix (fewer demonstrations: :func:`harness.icl_runner.run_icl_curve`). None when this cache cannot
        be cropped (a sliding-window layer that has already rolled over): then the prefix is encoded anew."""
        if n <= 0 or self.past is None:
            return PrefixCache([], None)
        if n >= len(self.ids):
            return self
        try:
            past = copy.deepcopy(self.past)
            past.crop(n - len(self.ids))  # negative: remove that many (transformers 4.x and 5.x alike)
        except Exception:  # noqa: BLE001 - e.g. a cache type without crop()
            return None
        if past.get_seq_length() != n:
            return None
        # crop() leaves views of the whole prefix's storage: give the head its own (each batch's expand() copies it)
        for layer in getattr(past, "layers", None) or ():
            if getattr(layer, "keys", None) is not None:
                layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
        if getattr(past, "layers", None) is None and hasattr(past, "key_cache"):  # older transformers
            past.key_cache = [t.clone() for t in past.key_cache]
            past.value_cache = [t.clone() for t in past.value_cache]
        return PrefixCache(list(self.ids[:n]), past)

    @torch.no_grad()
    def extend(self, model, ids: list[int], copy_first: bool = False) -> "PrefixCache":
        """This cache with ``ids`` encoded after it (in place unless ``copy_first``)."""
        if not ids:
            return self
        if self.past is None:
            return PrefixCache.encode(model, list(ids))
        past = copy.deepcopy(self.past) if copy_first else self.past
        device = next(model.parameters()).device
        n = len(self.ids)
        out = model(input_ids=torch.tensor([ids], device=device), position_ids=torch.arange(n, n + len(ids),
                    device=device).unsqueeze(0), **cache_kwargs(past), use_cache=True, logits_to_keep=1)
        return PrefixCache(self.ids + list(ids), output_cache(out))

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
