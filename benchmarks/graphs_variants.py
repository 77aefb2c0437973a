"""Issue 16's probe of ``--compile graphs`` (CUDA graphs, ``mode="reduce-overhead"``) on a GPU: ways to compile
the training forwards other than the product's, selected by ``benchmarks/packed_training.py --graphs-variant``.

On the H100 (session 36, torch 2.11) the product's way, each transformer block compiled with ``dynamic=True``
under ``reduce-overhead``, died of a segmentation fault in the first compiled backward, packed or not
(docs/benchmarks.md). Known troubles of CUDA graph trees with dynamic shapes (pytorch issue 105169: a segfault
in a dynamic backward) and with chained compiled regions (issue 160281) suggest the variants below; the
training rows are padded to a multiple of 64 tokens under graphs either way, so static shapes record a few
graphs. A variant replaces :func:`harness.compiling.for_training` where the training loops call it, for the
``graphs`` mode only, in this benchmark's process (run each variant in its own process: a crash ends it).

- ``blocks-dynamic``: the product's (nothing replaced);
- ``blocks-static``: the blocks with ``dynamic=False`` (one graph per padded width; the recompile limit raised);
- ``model-static``: the whole model under one ``torch.compile(mode="reduce-overhead", dynamic=False)``: one
  region, no chain of per-block graphs;
- ``blocks-no-trees``: the blocks static, with inductor's older per-graph CUDA graphs instead of the trees
  (``torch._inductor.config.triton.cudagraph_trees = False``);
- ``blocks-fixed``: the blocks static, and every training step padded to one width, the longest row the groups'
  training examples can render (:func:`longest_row`, set with :func:`fix_width`): one shape, so one graph per
  block kind (the first block, whose input needs no grad, and the rest) instead of one per padded width and kind.
  On the H100 (session 37) ``blocks-static`` did not finish 20 steps in 110 s, compiling, presumably, a graph
  per width; a launch-bound step pays little for the padding (the paper preset's rte rows: ~5% of the GPU's
  peak is busy).
"""

from __future__ import annotations

import torch
import torch._inductor.config

from harness import compiling, packed, training
from harness.scoring import encode_pair

VARIANTS = ("blocks-dynamic", "blocks-static", "model-static", "blocks-no-trees", "blocks-fixed")
RECOMPILE_LIMIT = 64  # static shapes: a graph per padded width and per block kind (the first block's input
# needs no grad), more than dynamo's default 8


def _static_blocks(model) -> list[torch.nn.Module]:
    blocks = compiling.repeated_blocks(model)
    for block in blocks:
        block.compile(dynamic=False, mode="reduce-overhead")
    return blocks


def install(variant: str) -> None:
    """Make the training loops' ``graphs`` mode compile as ``variant`` (:data:`VARIANTS`) in this process."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown graphs variant {variant!r}; one of {', '.join(VARIANTS)}")
    if variant == "blocks-dynamic":
        return
    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    if variant == "blocks-no-trees":
        torch._inductor.config.triton.cudagraph_trees = False
    # blocks-fixed: the blocks as blocks-static; the width is fixed by fix_width once the groups are known
    product = compiling.for_training

    def for_training(model, mode):
        if mode != "graphs":
            return product(model, mode)
        if variant == "model-static":
            return torch.compile(model, mode="reduce-overhead", dynamic=False), []
        return model, _static_blocks(model)

    training.for_training = for_training  # the names the loops call (imported from harness.compiling)
    packed.for_training = for_training


def longest_row(tokenizer, members, settings: dict) -> int:
    """Tokens of the longest (context + choice) row any of ``members`` (:class:`harness.packed.PackMember`) can
    train on: every training example under every template the training may draw (``settings["train_template"]``
    or all of the task's), every choice, cut to ``settings["max_length"]`` as the training cuts it."""
    longest = 0
    for m in members:
        for template in training.training_templates(m.task, settings):
            for example in m.train_examples:
                for context, choice in m.task.render(template, example).pairs():
                    ctx, cont = encode_pair(tokenizer, context, choice)
                    longest = max(longest, len(ctx) + len(cont))
    cap = settings.get("max_length")
    return min(longest, cap) if cap else longest


def fix_width(width: int) -> None:
    """Pad every training step under ``graphs`` to exactly ``width`` tokens in this process (``width`` >= the
    longest row: :func:`longest_row`; the loops round a step's widest row up to a multiple of it)."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")

    def width_multiple(mode):
        return width if mode == "graphs" else 1

    training.width_multiple = width_multiple
    packed.width_multiple = width_multiple

