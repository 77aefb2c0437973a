"""Micro-batches of the scorer: how many rows go into one forward.

On the CPU a micro-batch holds ``batch_size`` rows. On CUDA it holds as many rows as a token budget allows
(:func:`token_budget`: a fraction of the free GPU memory, divided among the processes sharing the GPU,
``$HARNESS_GPU_SHARE``, over the activation bytes of one token), never fewer than ``batch_size``;
:func:`plan_batches` sorts rows by length and cuts them. Split out of :mod:`harness.scoring`, which re-exports
these names.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from harness.costs import ModelDims
from harness.errors import HarnessError

GPU_SHARE_ENV = "HARNESS_GPU_SHARE"  # processes sharing one GPU (set by `--workers N` in its workers)


def gpu_share() -> int:
    """How many processes share this GPU: ``$HARNESS_GPU_SHARE`` (a positive integer), else 1."""
    text = os.environ.get(GPU_SHARE_ENV, "").strip()
    if not text:
        return 1
    if not text.isdigit() or int(text) < 1:
        raise HarnessError(f"{GPU_SHARE_ENV} must be a positive integer (processes sharing one GPU), got {text!r}")
    return int(text)


def token_budget(model, dims: ModelDims, device: torch.device, fraction: float = 0.25) -> int | None:
    """Padded tokens per micro-batch on CUDA: ``fraction`` of the free memory, divided among the processes that
    share the GPU (:func:`gpu_share`), over the activation bytes of one token in one layer (hidden states,
    attention projections, MLP), clamped to [2048, 65536]; None on the CPU. Without the division every process of
    ``--workers N`` (or of jobs side by side) sized its batches to a quarter of the memory free when it looked:
    nine Gemma 3 processes on one H200 ran it out (docs/benchmarks.md (d), round 6)."""
    if device.type != "cuda":
        return None
    fraction /= gpu_share()
    cfg = getattr(model.config, "text_config", model.config)
    inter = getattr(cfg, "intermediate_size", None) or 4 * dims.d_model
    elem = next(model.parameters()).element_size()
    per_token = elem * (8 * dims.d_model + 4 * inter) + 4 * 2 * dims.d_model  # + float32 norms/residual
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(65536, max(2048, fraction * free // per_token)))


def plan_batches(lengths: Sequence[int], batch_size: int, budget: int | None,
                 min_fill: float = 0.8) -> list[list[int]]:
    """Indices sorted by length (longest first) cut into micro-batches: ``batch_size`` rows each without a budget;
    with one, as many rows as keep rows x longest row within ``budget`` tokens (at least ``batch_size``), and a
    new batch once a row would be padded by more than ``1 - min_fill`` of the batch's width."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        cur = batches[-1] if batches else None
        if cur is not None:
            width = lengths[cur[0]]  # longest first: the first row sets the width
            fits = len(cur) < batch_size or (budget is not None and (len(cur) + 1) * width <= budget
                                             and lengths[i] >= min_fill * width)
            if fits:
                cur.append(i)
                continue
        batches.append([i])
    return batches


def plan_window_batches(query_lens: Sequence[int], choice_lens: Sequence[int], n_prefix: int, window: int,
                        batch_size: int, budget: int | None) -> list[list[int]]:
    """Micro-batches of the cached scorer for a model with sliding-window layers, exact like one query at a time.

    ``query_lens[i]``: query i's own tokens after the ``n_prefix`` cached ones; ``choice_lens[i]``: its longest
    choice. Those layers count their window in cache slots (key slot > query slot - window), and a batch of
    left-padded queries leaves padding slots between the prefix and a shorter query, and between a query and its
    right-padded choices: past the first window, a token would see fewer real tokens than in its own sequence.
    Inside the first window it sees every earlier slot, padding or not. So a batch is kept where every slot it uses
    lies there (prefix + longest query + longest choice <= window); a query that alone reaches past it is scored
    alone (no padding slots). Without a prefix there is no gap at all (the left padding comes before the query's
    first token, the choices' after their last): every batch is exact. At k = 0 with Gemma 3's 512-slot window
    that batches nearly every query; with 32 demonstrations in the prefix, none.
    """
    widths = [q + c for q, c in zip(query_lens, choice_lens)]
    if n_prefix == 0:
        return plan_batches(widths, batch_size, budget)
    inside = [i for i, w in enumerate(widths) if n_prefix + w <= window]
    alone = sorted(set(range(len(widths))) - set(inside), key=lambda i: -widths[i])
    batches = [[i] for i in alone]
    for idx in plan_batches([widths[i] for i in inside], batch_size, budget):
        idx = [inside[j] for j in idx]
        if n_prefix + max(query_lens[i] for i in idx) + max(choice_lens[i] for i in idx) <= window:
            batches.append(idx)
        else:  # the longest query and the longest choice of two different rows: split
            batches.extend([i] for i in idx)
    return batches
