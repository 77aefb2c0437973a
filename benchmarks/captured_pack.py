"""Issue 16's probe of a packed training step captured whole by ``torch.cuda.graph``: no compiler at all.

The paper preset's packed step on a small model is bound by the host issuing ~9,000 kernels (docs/benchmarks.md,
"Where a packed step's work goes"); inductor's CUDA graphs (``--compile graphs``) crashed or compiled without end
on the H100 (benchmarks/graphs_variants.py). This variant records the eager forward and backward of one packed
micro-batch into one CUDA graph and replays it every step; the host only renders the step's prompts, copies their
tokens into static buffers and reads the losses back. The optimizer update, per-group clipping and the divergence
checks stay outside the graph, as :func:`harness.packed.train_packed` runs them.

What a replay needs is one shape every step: every row padded to ``width`` tokens (:func:`width_and_positions`,
the longest row the groups can render, as ``blocks-fixed`` pads) and ``positions`` scored positions (the longest
choice), the same groups (a group that diverges changes the rows: that step and the rest run eagerly), one
micro-batch per step (the paper preset's batch 8, no accumulation). The recorded backward writes the stacked
adapters' gradients into the graph's own memory; after each replay they are handed back to the parameters (the
loop drops them with ``zero_grad(set_to_none=True)``).

``install(capture=False)`` runs the same static-buffer path eagerly (any device): the CPU test
(``tests/test_captured_pack.py``) checks it trains as the eager pack does; the capture itself needs CUDA
(``bash benchmarks/run_device.sh setup capturedprobe``).
"""

from __future__ import annotations

import weakref

import torch

from harness import packed as packed_module
from harness.losses import encode_rows, logprobs_of_rows
from harness.packed_losses import group_losses
from harness.scoring import encode_pair
from harness.training import training_templates

WARMUP = 3  # eager replays of the static path before the capture (the CUDA docs warm up on a side stream)


def width_and_positions(tokenizer, members, settings: dict) -> tuple[int, int]:
    """(tokens of the longest row, tokens of the longest choice) any of ``members`` can train on: every training
    example under every template the training may draw, every choice, cut as the training cuts rows."""
    width = positions = 0
    cap = settings.get("max_length")
    for m in members:
        for template in training_templates(m.task, settings):
            for example in m.train_examples:
                for context, choice in m.task.render(template, example).pairs():
                    ctx, cont = encode_pair(tokenizer, context, choice)
                    width = max(width, min(len(ctx) + len(cont), cap) if cap else len(ctx) + len(cont))
                    positions = max(positions, len(cont))
    return width, positions


class CapturedStep:
    """Stands in for :func:`harness.packed._forward_backward`: the step's tensors copied into static buffers, then
    the forward and backward run on them, eagerly for the first :data:`WARMUP` steps of a pack, then recorded once
    into a CUDA graph and replayed (``capture``; eager throughout without it)."""

    def __init__(self, width: int, positions: int, capture: bool):
        self.width, self.positions, self.capture = width, positions, capture
        self.key = None  # (the groups, the shapes) the buffers and graph belong to ...
        self.owner = None  # ... and the pack's adapters (a weak reference)
        self.graph = None
        self.calls = 0
        self.replays = 0  # steps served by the graph (the probe reports it: 0 means it never captured)
        self.eager_steps = 0  # steps outside the static path (other shapes, accumulation)

    def __call__(self, model, tokenizer, packed, batches: dict, micro: int, settings: dict, dims, overhead,
                 right_pad: bool, logit_index: bool, encode, width: int = 1) -> list:
        effective = len(next(iter(batches.values())))
        if micro < effective or not logit_index:  # accumulation or left padding: the product's step
            self.eager_steps += 1
            return _EAGER(model, tokenizer, packed, batches, micro, settings, dims, overhead, right_pad,
                          logit_index, encode, width)
        device = next(model.parameters()).device
        groups = list(batches)
        prompts = [p for g in groups for p in batches[g]]
        rows = encode_rows(tokenizer, prompts, max_length=settings["max_length"], right_pad=right_pad, dims=dims,
                           overhead=overhead, encode=encode, logit_index=logit_index, width=self.width,
                           positions=self.positions)
        row_groups = torch.tensor([g for g in groups for p in batches[g] for _ in p.pairs()], dtype=torch.long)
        slots = torch.tensor([k for k, g in enumerate(groups) for _ in batches[g]], dtype=torch.long)
        weights = [len(batches[g]) / effective for g in groups]
        key = (tuple(groups), tuple(rows.ids.shape), tuple(rows.pos.shape))
        owner = self.owner() if self.owner is not None else None  # (a weak reference: a new pack may reuse an id)
        if key != self.key or owner is not packed:  # a new pack, or its rows changed: new buffers, a new graph
            self.key, self.owner, self.graph, self.calls = key, weakref.ref(packed), None, 0
            self.static = rows.to(device)
            self.row_groups, self.slots = row_groups.to(device), slots.to(device)
            self.weights = torch.tensor(weights, device=device)
        else:
            for name in ("ids", "mask", "pos", "tgt", "valid", "bi", "ci", "labels"):
                getattr(self.static, name).copy_(getattr(rows, name), non_blocking=True)
            self.row_groups.copy_(row_groups, non_blocking=True)
            self.slots.copy_(slots, non_blocking=True)
        self.calls += 1
        leaves = packed.stacked

        def forward_backward():
            with packed.rows(self.row_groups):
                out = logprobs_of_rows(model, self.static, right_pad=right_pad, logit_index=logit_index)
                parts = group_losses(settings["losses"], out.token_logprobs, out.token_mask, out.labels,
                                     self.slots, len(groups))  # [n_losses, G]
                loss = parts[0]
                for value in parts[1:]:
                    loss = loss + value  # [G]
                (loss * self.weights.to(loss.dtype)).sum().backward()
            return torch.cat([loss.detach().unsqueeze(1), parts.detach().T], 1).float()  # [G, 1 + n_losses]

        if not (self.capture and device.type == "cuda"):
            return [(forward_backward(), groups, weights)]
        if self.graph is None and self.calls <= WARMUP:  # warm-up on a side stream, as the CUDA graph docs do
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                values = forward_backward()
            torch.cuda.current_stream().wait_stream(side)
            return [(values, groups, weights)]
        if self.graph is None:
            for p in leaves:
                p.grad = None  # the recorded backward allocates (and each replay rewrites) the gradients
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.values = forward_backward()
            self.grads = [p.grad for p in leaves]
        self.graph.replay()
        self.replays += 1
        for p, grad in zip(leaves, self.grads):
            p.grad = grad
        return [(self.values.clone(), groups, weights)]


_EAGER = packed_module._forward_backward  # the product's step, before install() replaces it


def install(width: int, positions: int, capture: bool = True) -> CapturedStep:
    """Make :func:`harness.packed.train_packed` in this process run its steps through a :class:`CapturedStep`
    (returned, for its counters); ``width`` / ``positions`` from :func:`width_and_positions`."""
    step = CapturedStep(width, positions, capture)
    packed_module._forward_backward = step
    return step


def uninstall() -> None:
    packed_module._forward_backward = _EAGER
