"""Training settings that vary within a report cell, so that an ablation is never pooled with the default runs.

A trained run's settings are its config's ``train`` dict (``{"lr": 0.003, "scale_parameter": true, "steps": 1000,
...}``; empty or absent for in-context runs). Runs of one (model, method, preset) whose ``train`` dicts differ
(``--method-args scale_parameter=false``, ``--steps 150``, ``--lr ...`` beside default runs) are told apart by the
keys whose values differ: :func:`train_variants` gives each run the text ``scale_parameter=false`` (keys sorted,
joined by spaces) and a rank that orders those variants within the cell. A key that all runs of a cell hold at one
value other than the method's current default (a cell run only as an ablation) is named the same way, so a reader
never takes it for the default. Runs with equal ``train`` dicts at the defaults get none, so their labels stay
``lora``, ``icl k=4``, ``lora preset=quick``. Differences that the preset explains (the
``quick`` preset's steps and batch size) are not repeated: variation is judged within one preset.

A key missing from some runs' dicts is a setting added after they were stored (``LATER_ARGS`` of the method's
config, left out at its default so old run ids stay): it takes the method's current default for the run's preset
(:func:`harness.methods.training_settings` plus ``LATER_ARGS``) where the registry resolves it, else the most
common value among the runs that have the key (the first in run order on a tie). So a missing key splits a cell
only when some run has another value explicitly.
"""

from __future__ import annotations

import functools
import json
from collections import Counter

import pandas as pd

@functools.lru_cache(maxsize=None)
def method_defaults(method: str, preset: str) -> dict | None:
    """The current training settings of ``method`` under ``preset``, ``LATER_ARGS`` included; None when the
    registry does not know the method or preset (a method since removed, one of another branch)."""
    from harness.methods import get_method, training_settings

    try:
        return {**get_method(str(method)).config_cls.LATER_ARGS, **training_settings(str(method), str(preset))}
    except Exception:  # noqa: BLE001 - unknown names, in-context methods, peft types this peft lacks
        return None


def _canon(value):
    """A hashable, type-aware key: lists as tuples, and ``True`` never equal to ``1``."""
    if isinstance(value, (list, tuple)):
        return ("list", tuple(_canon(v) for v in value))
    if isinstance(value, dict):
        return ("dict", json.dumps(value, sort_keys=True, default=str))
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("num", value)
    return (type(value).__name__, value)


def fmt_setting(value) -> str:
    """``true``/``false``, ``none``, compact numbers (``0.0003``, ``1e-05``, ``16``), lists as ``lm|ul``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    if isinstance(value, (list, tuple)):
        return "|".join(fmt_setting(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _sort_setting(value) -> tuple:
    if value is None:
        return (2, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    return (1, fmt_setting(value))


def train_of(config) -> dict:
    """A run's ``train`` dict (empty for in-context runs and configs without one)."""
    train = (config or {}).get("train") if isinstance(config, dict) else None
    return train if isinstance(train, dict) else {}


def _fills(trains: list[dict], keys: list[str], defaults: dict | None) -> dict:
    """The value a run lacking each key is taken to have (module docstring)."""
    fills = {}
    for key in keys:
        if defaults is not None and key in defaults:
            fills[key] = defaults[key]
        else:
            present = [t[key] for t in trains if key in t]
            counts = Counter(_canon(v) for v in present)
            top = counts.most_common(1)[0][0]  # ties: the first seen, in run order
            fills[key] = next(v for v in present if _canon(v) == top)
    return fills


def _off_default(key: str, full: list[dict], defaults: dict | None) -> bool:
    """Every run of the cell has ``key`` at one value other than the method's current default (an ablation run
    alone, e.g. ``--method-args scale_parameter=false`` for the whole cell): named in the label too. A default of
    None is one the run resolves (AdaLoRA's ``total_step``: the run's steps), so it is never off."""
    if defaults is None or key not in defaults or defaults[key] is None:
        return False
    return all(_canon(f[key]) != _canon(defaults[key]) for f in full)


def train_variants(runs: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Per run of ``runs`` (a frame with ``model``, ``method``, ``preset`` and ``config``, in run order): the
    text of its training settings that vary within its (model, method, preset), e.g. ``scale_parameter=false``
    (None where none vary), and an int that orders those variants within the cell (0 where none vary)."""
    text = pd.Series([None] * len(runs), index=runs.index, dtype=object)
    rank = pd.Series(0, index=runs.index, dtype="int64")
    if runs.empty:
        return text, rank
    trains = runs["config"].map(train_of)
    for (_, method, preset), sub in runs.groupby(["model", "method", "preset"], sort=False, dropna=False):
        idx = list(sub.index)
        cell = [trains[i] for i in idx]
        keys = sorted({k for t in cell for k in t})
        if not keys:
            continue  # in-context runs: no training settings
        defaults = None if pd.isna(preset) else method_defaults(method, preset)
        fills = _fills(cell, keys, defaults)
        full = [{k: t.get(k, fills[k]) for k in keys} for t in cell]
        varying = [k for k in keys if len({_canon(f[k]) for f in full}) > 1 or _off_default(k, full, defaults)]
        if not varying:
            continue
        sort_keys = [tuple(_sort_setting(f[k]) for k in varying) for f in full]
        order = {key: n for n, key in enumerate(sorted(set(sort_keys)))}
        for i, f, key in zip(idx, full, sort_keys):
            text[i] = " ".join(f"{k}={fmt_setting(f[k])}" for k in varying)
            rank[i] = order[key]
    return text, rank


def select_train(runs: pd.DataFrame, wanted: dict) -> pd.DataFrame:
    """The runs whose training settings include ``wanted`` (``harness compare --train-a``); a key a run's dict
    lacks is at the method's default for its preset (:func:`method_defaults`), and unknown there matches nothing."""
    if not wanted or runs.empty:
        return runs

    def matches(config, method, preset) -> bool:
        train = train_of(config)
        defaults = (None if pd.isna(preset) else method_defaults(method, preset)) or {}
        return all(k in train or k in defaults for k in wanted) and all(
            _canon(train.get(k, defaults.get(k))) == _canon(v) for k, v in wanted.items())

    keep = [matches(c, m, p) for c, m, p in zip(runs["config"], runs["method"], runs["preset"])]
    return runs[pd.Series(keep, index=runs.index, dtype=bool)]
