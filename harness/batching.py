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
