"""The three ways ``harness mixed`` serves one method's queries of N tasks, each timed on the same base model.

- :func:`serve_mixed`: one interleaved stream, every task's adapter (or demonstrations) loaded at once, batches
  whose rows belong to different tasks (:func:`harness.mixed.scorer.score_mixed`);
- :func:`serve_task_by_task`: each task's queries together, one adapter loaded at a time (peft's own
  ``PeftModel`` for LoRA and (IA)3, the task's soft prompt or demonstrations alone), then unloaded;
- :func:`serve_merged` (LoRA, (IA)3): each task's adapter merged into the base weights, served task by task,
  the base weights restored from a copy afterwards.

Every mode scores with the same scorer (per task, its prefix cached once) so that the modes differ only in how
rows get their parameters. A mode's ``setup_seconds`` are loading, unloading, merging and encoding the task
prefixes; its ``latencies`` the batches' wall times. The base model is left as it was given (adapters unloaded,
hooks removed, merged weights restored).
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import torch

from harness import costs
from harness.costs import ModelDims, Work
from harness.mixed.scorer import TaskQueries, score_mixed
from harness.mixed.serving import Serving, _peft_from_pretrained, base_weights, load_mixed, soft_prompt
from harness.store import ExampleScore
from harness.templates import Prompt

MERGEABLE = ("LORA", "IA3")  # peft types whose adapter folds into the base weights (the ``merged`` mode)
ADAPTER_PARAM = re.compile(r"\.(lora_[A-Za-z_]+|ia3_l)\.")  # a peft adapter's own tensors among the parameters


@dataclasses.dataclass
class TaskInput:
    """One task of a method's mixed run: its queries, its demonstrations (ICL) or adapter folder (PEFT)."""

    name: str
    prompts: list[Prompt]
    prefix: str = ""
    folder: Path | None = None


@dataclasses.dataclass
class ModeResult:
    mode: str
    examples: list[list[ExampleScore]]  # per task, in its prompts' order
    latencies: list[float]  # wall seconds per batch
    tasks_per_batch: list[int]
    setup_seconds: float
    peak_memory_bytes: int
    state_bytes: int  # per-task tensors held at once (adapters, soft prompts, prefix caches)
    flops: int  # forward FLOPs of every batch and prefix, with the method's per-token overhead


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA's max allocated; on Linux the process's resident high-water mark
    (``/proc/self/clear_refs``, value 5); elsewhere nothing (the peak RSS so far)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_bytes(device: torch.device) -> int:
    """The peak since :func:`reset_peak`: CUDA max allocated, else the resident high-water mark (VmHWM)."""
    if device.type != "cuda":
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    return costs.peak_memory_bytes(device)


def adapter_bytes(model) -> int:
    """Bytes of the adapter tensors peft added to ``model`` (LoRA's A and B, (IA)3's vectors)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ADAPTER_PARAM.search(n + "."))


def _flops(dims: ModelDims, work: Work, per_token: int) -> int:
    return costs.forward_flops(dims, work) + per_token * work.tokens


def _queries(t: TaskInput) -> TaskQueries:
    return TaskQueries(t.name, t.prompts, t.prefix)


def serve_mixed(base, tokenizer, kind: str, tasks: list[TaskInput], batch_size: int, dims: ModelDims,
                per_token: int = 0) -> ModeResult:
    """Every task at once in one stream (``kind``: a peft type of :data:`harness.mixed.serving.MIXABLE`, or
    ``ICL``)."""
    device = next(base.parameters()).device
    reset_peak(device)
    start = time.perf_counter()
    serving = Serving(base, len(tasks)) if kind == "ICL" else load_mixed(base, [t.folder for t in tasks])
    setup = time.perf_counter() - start
    try:
        out = score_mixed(serving, tokenizer, [_queries(t) for t in tasks], batch_size, dims)
        state = serving.state_bytes() + out.cache_bytes
        peak = peak_bytes(device)
    finally:
        start = time.perf_counter()
        _unload(serving)
        setup += time.perf_counter() - start
    return ModeResult("mixed", out.examples, out.latencies, out.tasks_per_batch, setup + out.prefix_seconds, peak,
                      state, _flops(dims, out.work, per_token))


def _unload(serving: Serving) -> None:
    if serving.kind == "ia3":
        serving.remove()
    elif serving.kind == "lora":
        serving.model.unload()


def _one(base, kind: str, task: TaskInput, merge: bool):
    """(serving of one task, how to take it off ``base``)."""
    if kind == "ICL":
        return Serving(base, 1), lambda: None
    if kind == "PROMPT_TUNING":
        p = next(base.parameters())
        return Serving(base, 1, [soft_prompt(task.folder, p.device, p.dtype)]), lambda: None
    model = _peft_from_pretrained(base, task.folder, "default")
    model.eval()
    if not merge:
        return Serving(model, 1), model.unload
    saved = base_weights(model)
    merged = model.merge_and_unload()

    def restore():
        with torch.no_grad():
            for weight, copy in saved:
                weight.copy_(copy)

    return Serving(merged, 1), restore


def _task_by_task(base, tokenizer, kind: str, tasks: list[TaskInput], batch_size: int, dims: ModelDims,
                  per_token: int, merge: bool) -> ModeResult:
    device = next(base.parameters()).device
    reset_peak(device)
    examples, latencies, mixes, work = [], [], [], Work()
    setup, state = 0.0, 0
    for task in tasks:
        start = time.perf_counter()
        serving, unload = _one(base, kind, task, merge)
        setup += time.perf_counter() - start
        try:
            out = score_mixed(serving, tokenizer, [_queries(task)], batch_size, dims)
            held = (0 if merge else adapter_bytes(serving.model)) + serving.state_bytes() + out.cache_bytes
        finally:
            start = time.perf_counter()
            unload()
            setup += time.perf_counter() - start
        examples += out.examples
        latencies += out.latencies
        mixes += out.tasks_per_batch
        work.add(out.work)
        setup += out.prefix_seconds
        state = max(state, held)
    return ModeResult("merged" if merge else "task_by_task", examples, latencies, mixes, setup, peak_bytes(device),
                      state, _flops(dims, work, 0 if merge else per_token))


def serve_task_by_task(base, tokenizer, kind: str, tasks: list[TaskInput], batch_size: int, dims: ModelDims,
                       per_token: int = 0) -> ModeResult:
    """Each task's queries together, one adapter (soft prompt, demonstrations) loaded at a time."""
    return _task_by_task(base, tokenizer, kind, tasks, batch_size, dims, per_token, merge=False)


def serve_merged(base, tokenizer, kind: str, tasks: list[TaskInput], batch_size: int, dims: ModelDims) -> ModeResult:
    """Each task's adapter merged into the base weights (LoRA, (IA)3), task by task; no per-token overhead."""
    if kind not in MERGEABLE:
        raise ValueError(f"{kind} adapters do not merge into the base weights")
    return _task_by_task(base, tokenizer, kind, tasks, batch_size, dims, 0, merge=True)


def max_abs_diff(got: list[list[ExampleScore]], expected: list[dict[str, list[float]]]) -> float:
    """Largest |log-prob difference| between ``got`` (per task) and ``expected`` (per task: example id -> the
    stored log-probs); an example or choice missing from ``expected`` is an infinite difference."""
    worst = 0.0
    for task_examples, stored in zip(got, expected):
        for ex in task_examples:
            ref = stored.get(ex.example_id)
            if ref is None or len(ref) != len(ex.logprobs):
                return float("inf")
            worst = max([worst, *(abs(a - b) for a, b in zip(ex.logprobs, ref))])
    return worst
