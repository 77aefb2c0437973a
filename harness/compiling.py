"""``--compile``: how the PEFT training forwards run (eager, compiled transformer blocks, or the whole model).

Measured on the H100 (docs/benchmarks.md, second round): compiling each block makes the T-Few loop's steps 1.6-1.9x
faster after a compile of up to 100 s; compiling the whole model doubles the throughput of a 1B model's step but
takes minutes with dynamic shapes. The default is eager. ``graphs`` (experimental; on an H100 its first compiled
backward crashed the process, so GPU training refuses it: :func:`refuse_graphs_on_gpu`) compiles the blocks with
``mode="reduce-overhead"``: CUDA graphs replay each block's kernels in one launch, the lever for a small model's
launch-bound step (issue 16); a graph is recorded per distinct input shape, so the training rows are padded to a
multiple of :data:`GRAPH_WIDTH_MULTIPLE` tokens (:func:`width_multiple`), and each training step starts a new
cudagraph-tree iteration (:func:`step_begin`). On the CPU it compiles as ``on``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

import torch

from harness.errors import HarnessError

COMPILE_CHOICES = ("auto", "on", "model", "graphs", "off")
GRAPH_WIDTH_MULTIPLE = 64  # under graphs, training rows are padded to a multiple of this many tokens


def compile_mode(choice: str | bool | None) -> str | None:
    """How the training forwards run: None (eager), ``"blocks"`` (:func:`compile_blocks`, ``on``), ``"model"``
    (the whole model under ``torch.compile``: longer to compile, fewer kernels per step) or ``"graphs"`` (the
    blocks under CUDA graphs: the module docstring).

    ``auto`` (or None) is eager, on every device (the default: see the module docstring); ``True`` is
    ``blocks``. The eager float32 path on the CPU is bit-for-bit reproducible.
    """
    if isinstance(choice, bool):
        return "blocks" if choice else None
    choice = choice or "auto"
    if choice not in COMPILE_CHOICES:
        raise HarnessError(f"--compile must be one of {', '.join(COMPILE_CHOICES)}, got {choice!r}")
    return {"auto": None, "on": "blocks", "model": "model", "graphs": "graphs", "off": None}[choice]


GRAPHS_ENV = "HARNESS_EXPERIMENTAL_GRAPHS"  # "1": let --compile graphs train on a GPU (it crashed there: below)


def refuse_graphs_on_gpu(choice: str | bool | None, training_devices: Iterable[str]) -> None:
    """Refuse ``--compile graphs`` for training on a GPU, before any model loads: on an H100 (torch 2.11, CUDA 13)
    the first compiled backward crashed the process (a segmentation fault in the graph's backward, LoRA on a
    random-weight SmolLM2, packed and not: docs/benchmarks.md, issue 16), and a crash cannot be caught to fall back
    to eager. ``HARNESS_EXPERIMENTAL_GRAPHS=1`` lets it run (to test another torch); on the CPU it compiles as on."""
    if compile_mode(choice) != "graphs" or os.environ.get(GRAPHS_ENV) == "1":
        return
    if any(d.startswith("cuda") for d in training_devices):
        raise HarnessError("--compile graphs crashes GPU training (a segfault in the CUDA-graph backward, torch "
                           f"2.11); use --compile on, or set {GRAPHS_ENV}=1 to try it anyway")


def repeated_blocks(model) -> list[torch.nn.Module]:
    """The model's transformer blocks: the ``ModuleList`` of one class holding the most parameters ([] if none)."""
    best, best_size = [], 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = list(module), size
    return best


def compile_blocks(model, mode: str | None = None) -> list[torch.nn.Module]:
    """Regional compilation: ``torch.compile`` each transformer block in place (dynamic sequence lengths).

    Every block runs the same code, so dynamo traces and inductor compiles one block (forward and backward) and
    all layers reuse it: tens of seconds instead of minutes for the whole model with dynamic shapes, and later
    trainings of the same architecture and method reuse it too. The fusions that matter (norms, rotary
    embeddings, activations, the adapter's own ops) are inside the blocks. ``mode`` is ``torch.compile``'s
    (``"reduce-overhead"``: CUDA graphs). Undo with :func:`uncompile_blocks`.
    """
    blocks = repeated_blocks(model)
    if not blocks:
        raise HarnessError(f"{type(model).__name__}: no repeated transformer blocks to compile; use --compile off")
    for block in blocks:
        block.compile(dynamic=True, mode=mode)
    return blocks


def uncompile_blocks(blocks: list[torch.nn.Module]) -> None:
    """Back to eager (evaluation and saving never see the compiled blocks)."""
    for block in blocks:
        block._compiled_call_impl = None  # what nn.Module.compile() set


def for_training(model, mode: str | None) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """(what the training forwards call, the blocks compiled in place) for a :func:`compile_mode` ``mode``.

    ``model`` mode returns a ``torch.compile`` wrapper and leaves ``model`` itself eager; ``blocks`` mode compiles
    the blocks in place, to be undone with :func:`uncompile_blocks` when training ends.
    """
    if mode == "model":
        return torch.compile(model, dynamic=True), []
    if mode == "blocks":
        return model, compile_blocks(model)
    if mode == "graphs":
        return model, compile_blocks(model, mode="reduce-overhead")
    return model, []


def width_multiple(mode: str | None) -> int:
    """What the training batches' padded width is rounded up to under ``mode``: under ``graphs``
    :data:`GRAPH_WIDTH_MULTIPLE` (a CUDA graph is recorded per distinct input shape, and a batch's widest row varies
    from step to step: rounding bounds the graphs to a few, at the cost of some padding), else 1 (no rounding)."""
    return GRAPH_WIDTH_MULTIPLE if mode == "graphs" else 1


def strict_first_step(compiled: bool, step: int):
    """Around the first training step's forwards and backward while compiled: hitting dynamo's recompile limit
    raises instead of running that frame eagerly, so the training's compiler-failure fallback takes it (eager,
    ``compiled`` false, a warning) rather than a run that says compiled while most of its blocks ran eagerly (what
    per-layer guards did to packs: one graph per block, and past 8 the rest eager). Later steps keep dynamo's
    default (a late new shape falls back for that frame only)."""
    if not compiled or step > 0:
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)


def compile_failure(exc: BaseException) -> str:
    """One line on why compiling the first step failed, for the fallback's warning."""
    from torch._dynamo.exc import FailOnRecompileLimitHit

    if isinstance(exc, FailOnRecompileLimitHit):  # raised under strict_first_step
        first = "the blocks cannot share a graph (a graph per layer passed dynamo's recompile limit)"
    elif str(exc).strip():
        first = str(exc).strip().splitlines()[0]
    else:  # a bare ``assert`` deep in the compiler (session 37's H100: "AssertionError: "): say where it was raised
        first = f"raised at {_raise_site(exc)}"
    return f"{type(exc).__name__}: {first}"


def _raise_site(exc: BaseException) -> str:
    """``module.py:line in function`` of the innermost frame of ``exc``'s traceback, or "an unknown place"."""
    import os
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "an unknown place"
    last = frames[-1]
    parts = os.path.normpath(last.filename).split(os.sep)
    return f"{'/'.join(parts[-2:])}:{last.lineno} in {last.name}"


def step_begin(mode: str | None) -> None:
    """Before a training step's first forward: under ``graphs``, tell the cudagraph trees that a new iteration
    begins (the last step's graph outputs may be overwritten); nothing otherwise."""
    if mode == "graphs":
        torch.compiler.cudagraph_mark_step_begin()
