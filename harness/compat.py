"""The one place that knows which transformers / peft API is installed (supported: pyproject.toml's pins).

KV cache argument and output field: transformers 5.24 renamed the ``past_key_values`` argument of every model's
``forward`` (and the field of its outputs) to ``cache``; the old name still works there but warns (FutureWarning,
"removed in version 5.40.0"). transformers 5.17 to 5.23 know only ``past_key_values``, and do NOT reject ``cache=``:
it would fall into ``**kwargs`` and be ignored, silently scoring without the prefix. So the name is picked once
(:func:`cache_name`), from the installed transformers' output dataclass, and every call site uses :func:`cache_kwargs` /
:func:`output_cache`.

peft 0.21 (the newest release) itself still uses names transformers deprecated: ``PeftModel.__init__`` reads
``model.is_gradient_checkpointing`` (deprecated in transformers 5.23 for ``is_activation_checkpointing``) and prefix
tuning passes its prefix as ``past_key_values=`` to the base model. Those are peft's calls, not ours; they keep
working until transformers 5.40 (the upper pin), and :func:`peft_legacy_calls` silences exactly those two warnings
around the peft calls that make them, so that our own deprecated calls stay visible (and fail the test suite).
It also silences peft's UserWarning that prompt tuning and p-tuning ignore position ids: harness knows
(``MethodInfo.position_ids`` is False for them, so their rows are scored one at a time, unpadded), and the warning
printed once per batch (each ``catch_warnings`` exit resets the once-only registry): 4,334 times, 1 MB, in one
grid job's log (round 27).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings

# the messages of the deprecations peft 0.21 triggers inside transformers (regular expressions, matched at the start)
_PEFT_LEGACY = (r"`is_gradient_checkpointing` is deprecated", r"`past_key_values` is deprecated")
_IGNORED_POSITIONS = r"Position ids are not supported for parameter efficient tuning"  # peft: prompt learning


@functools.cache
def cache_name() -> str:
    """The keyword of the KV cache in a model's forward and the attribute of its output: ``"cache"`` from
    transformers 5.24, ``"past_key_values"`` before (read from the installed transformers' output dataclass)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def cache_kwargs(cache) -> dict:
    """``{name: cache}`` for a model's forward, under the installed transformers' name for it."""
    return {cache_name(): cache}


def output_cache(output):
    """The KV cache a forward returned (``output.cache``; ``output.past_key_values`` before transformers 5.24)."""
    return getattr(output, cache_name())


def is_prompt_learning(model) -> bool:
    """A peft prompt-learning model (prompt/prefix tuning, p-tuning): peft builds its inputs and caches itself."""
    return any(getattr(c, "is_prompt_learning", False) for c in (getattr(model, "peft_config", None) or {}).values())


def peft_legacy_calls(active: bool = True):
    """Ignore the deprecation warnings of transformers' old names that peft itself uses (see the module docstring);
    a no-op context when ``active`` is false."""
    if not active:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    for message in _PEFT_LEGACY:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    warnings.filterwarnings("ignore", message=_IGNORED_POSITIONS, category=UserWarning)
    return stack
