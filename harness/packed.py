"""Packed training: the adapters of N training groups trained in one model at once (``harness run --pack N``).

A small model's training step is bound by the host issuing kernels, not by the GPU (issue 16): ten processes side
by side (``--workers 10``) keep an H200 about 6% busy. Packing puts the micro-batches of N groups (different seeds
or tasks, one method) into one forward and one backward, each row scaled by its own group's adapter, so one step's
kernels serve N trainings.

Exactness: every group keeps what its own :func:`harness.training.train` would have:

- its own trainable tensors: slice g of one stacked ``[N, *shape]`` leaf per tensor of the peft model (the same
  names, shapes and order), initialised as its separate run initialises them (``torch.manual_seed(seed)`` then
  ``apply_method``: :func:`group_initial_tensors`);
- its own optimizer state and update: one optimizer over the stacked leaves that updates every slice as the
  group's own optimizer would (:mod:`harness.packed_optim`: AdamW is elementwise; Adafactor's factored moments,
  update clipping and parameter scaling are taken per slice), one schedule (every group steps together), its own
  gradient clipping (:func:`harness.packed_optim.clip_per_group`) and divergence check; a group that diverges
  stops (its runs fail, its slices are no longer updated) and the others go on;
- its own sampler and template choices (``random.Random(seed)``, the same draws in the same order);
- its own losses: L_LM, L_UL and L_LN are computed on its rows only (token means per group and micro-batch;
  every group's at once, :mod:`harness.packed_losses`).

Rows of different groups only share the forward's padding (to the widest row of the pack; attention masks and
explicit position ids make that exact within float32 rounding) and the gradient's summation order. So on CPU
float32 a packed group's losses and scores equal its separately trained twin's within about 1e-6
(``tests/test_packed_training.py``).

How rows get their adapter: :mod:`harness.packed_adapters`. Only decoder-only models are packed.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import random
import time

import torch

from harness import costs
from harness.compiling import (compile_failure, compile_mode, for_training, step_begin, strict_first_step,
                               uncompile_blocks, width_multiple)
from harness.costs import ModelDims, Work
from harness.errors import HarnessError
from harness.master_weights import MasterWeights
from harness.methods.base import Overhead, train_overhead_flops
from harness.scoring import encode_pair
from harness.packed_adapters import PackedAdapters, group_initial_tensors  # noqa: F401 (re-exported)
from harness.packed_losses import group_losses
from harness.packed_optim import clip_per_group, make_sliced_optimizer
from harness.training import (PADDING_CHOICES, TrainingDiverged, TrainStats, _Sampler,
                              choice_logprobs, make_schedule, training_templates)

log = logging.getLogger(__name__)

PACKABLE = ("ia3", "tfew", "lora", "ln_tuning", "prompt_tuning")  # methods whose groups can share one packed training


def pack_refusal(method: str, settings: dict) -> str | None:
    """Why groups of ``method`` with ``settings`` cannot be packed, or None when they can."""
    if method not in PACKABLE:
        return f"{method} has no packed trainer (packable: {', '.join(PACKABLE)})"
    if method == "lora" and settings.get("dropout", 0.0):
        return "lora with dropout draws per-run random masks: packing would change them"
    return None


@dataclasses.dataclass
class PackMember:
    """One group of a pack: its task, training rows and seed (every member shares the method and settings)."""

    task: object
    train_examples: list[dict]
    seed: int


# --------------------------------------------------------------------------------------------- training

def _group_work(prompts, encode, max_length, overhead: Overhead, windows) -> tuple[Work, int]:
    """The work :func:`choice_logprobs` counts for ``prompts`` alone (tokens without padding), and its rows."""
    work, rows = Work(), 0
    for p in prompts:
        for context, choice in p.pairs():
            ctx, cont = encode(context, choice)
            if max_length is not None and len(ctx) + len(cont) > max_length:
                ctx = ctx[-max(max_length - len(cont), 1):]
            work.add_tokens(overhead.virtual_tokens + len(ctx) + len(cont), overhead.prefix_keys, windows)
            work.logit_positions += len(cont)
            rows += 1
    return work, rows


def train_packed(model, tokenizer, packed: PackedAdapters, members: list[PackMember], settings: dict, *,
                 method: str, padding: str = "auto", progress: bool = False,
                 compile: str | bool | None = "auto") -> list[TrainStats | Exception]:
    """Train every member's adapter (``packed.params[g]``) for ``settings["steps"]`` steps in one model.

    ``compile`` as :func:`harness.training.train`'s (:func:`harness.compiling.compile_mode`): the per-row hooks
    trace into the compiled blocks (no graph break); a compiler failure on the first step goes on eagerly.

    Returns per member its :class:`TrainStats` (``seconds``: its share, the pack's wall time / N; ``step_seconds``
    likewise) or the exception that stopped it (:class:`TrainingDiverged`). ``model``'s own adapter is left as it
    was; copy a group's tensors in with :meth:`PackedAdapters.load_group`."""
    from tqdm.auto import tqdm

    from harness.methods import get_method, method_overhead
    from harness.models import is_seq2seq

    if len(members) != packed.n:
        raise HarnessError(f"packed training: {len(members)} members for {packed.n} adapters")
    if is_seq2seq(model):
        raise HarnessError("packed training supports decoder-only models")
    if padding not in PADDING_CHOICES:
        raise HarnessError(f"padding must be one of {', '.join(PADDING_CHOICES)}, got {padding!r}")
    if any(not m.train_examples for m in members):
        raise HarnessError("no training examples")
    device = next(model.parameters()).device
    right_pad = padding == "right" or (padding == "auto" and device.type == "cuda")
    needs_right = not get_method(method).position_ids
    right_pad = right_pad or needs_right
    logit_index = right_pad and not needs_right
    overhead = method_overhead(model, method, settings)
    dims = ModelDims.from_model(model)
    encode = functools.cache(lambda context, choice: encode_pair(tokenizer, context, choice))
    samplers, rngs, templates = [], [], []
    for m in members:
        rng = random.Random(m.seed)
        rngs.append(rng)
        samplers.append(_Sampler(len(m.train_examples), rng))
        templates.append(training_templates(m.task, settings))
    # one optimizer and schedule for all groups, each slice of a stacked tensor updated as its group's alone
    masters = MasterWeights(packed.stacked)
    optimizer = make_sliced_optimizer(masters.params, settings, fused=device.type == "cuda")
    schedule = make_schedule(optimizer, settings)
    if not any(schedule.lr_lambdas[0](s) > 0 for s in range(settings["steps"])):
        log.warning("no training step has a learning rate above 0: the adapters are not trained")
    n = len(members)
    micro, accum = settings["batch_size"], settings["grad_accum"]
    effective = micro * accum
    stats = [TrainStats([], {name: [] for name in settings["losses"]}, 0, 0.0, Work(), 0, 0, 0, micro, accum)
             for _ in members]
    outcome: list[TrainStats | Exception] = list(stats)
    mode = compile_mode(compile)
    forward_model, compiled = for_training(model, mode)
    for s in stats:
        s.compiled = mode is not None
    active = list(range(n))
    clip = settings.get("max_grad_norm")
    start = time.perf_counter()
    was_training = model.training
    model.train()
    try:
        with packed.attached():
            for step in tqdm(range(settings["steps"]), disable=not progress, desc=f"train x{n}", leave=False):
                if not active:
                    break
                step_start = time.perf_counter()
                batches = {g: [members[g].task.render(rngs[g].choice(templates[g]), members[g].train_examples[i])
                               for i in samplers[g].take(effective)] for g in active}
                while True:
                    optimizer.zero_grad(set_to_none=True)
                    masters.zero_grad()
                    step_begin(mode if stats[0].compiled else None)
                    try:
                        with strict_first_step(stats[0].compiled, step):
                            values = _forward_backward(forward_model, tokenizer, packed, batches, micro, settings,
                                                       dims, overhead, right_pad, logit_index, encode,
                                                       width_multiple(mode if stats[0].compiled else None))
                        break
                    except torch.OutOfMemoryError:
                        if micro == 1:
                            raise
                        micro = (micro + 1) // 2
                        accum = math.ceil(effective / micro)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        log.warning("out of memory at packed step %d: micro-batch %d x %d accumulation steps "
                                    "(token means now per smaller micro-batch)", step, micro, accum)
                    except Exception as exc:  # noqa: BLE001 - a compiler failure on the first step: go on eagerly
                        if not stats[0].compiled or step > 0:
                            raise
                        log.warning("torch.compile failed (%s); training the pack eagerly", compile_failure(exc))
                        uncompile_blocks(compiled)
                        compiled, forward_model = [], model
                        for s in stats:
                            s.compiled = False
                masters.pull_grads()
                norms = clip_per_group(masters.params, clip)  # [N] or None
                host = _read(values, norms)  # one device read per step
                stepped = []
                for g in list(active):
                    (loss, *parts), norm = host[g]
                    bad = (TrainingDiverged(step, loss) if not math.isfinite(loss) else
                           TrainingDiverged(step, norm, "the gradient norm") if not math.isfinite(norm) else None)
                    if bad is not None:
                        log.warning("packed group %d (seed %d) diverged: %s", g, members[g].seed, bad)
                        outcome[g] = bad
                        active.remove(g)
                        continue
                    stepped.append(g)
                    s = stats[g]
                    s.losses.append(loss)
                    for name, value in zip(settings["losses"], parts):
                        s.components[name].append(value)
                    work, rows = _group_work(batches[g], encode, settings["max_length"], overhead, dims.windows)
                    s.work.add(work)
                    s.rows += rows
                    s.forwards += math.ceil(effective / micro)
                    s.step_tokens.append(work.tokens)
                if len(stepped) < n:  # groups stopped (now or before) take no update: their gradients are zeroed
                    with torch.no_grad():
                        dead = torch.tensor([g for g in range(n) if g not in stepped], device=device)
                        for p in masters.params:
                            if p.grad is not None:
                                p.grad[dead] = 0
                if stepped:
                    optimizer.step()
                    masters.push()
                    schedule.step()
                step_seconds = (time.perf_counter() - step_start) / n
                for g in active:
                    stats[g].step_seconds.append(step_seconds)
    finally:
        uncompile_blocks(compiled)
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)
        masters.zero_grad()
    seconds = time.perf_counter() - start
    peak = costs.peak_memory_bytes(device)
    for s in stats:
        s.steps = len(s.losses)
        s.seconds = seconds / n
        s.overhead_flops = train_overhead_flops(overhead, s.work.tokens, s.rows, s.forwards, s.work.logit_positions,
                                                work=s.work)
        s.peak_memory_bytes = peak
        s.micro_batch, s.grad_accum = micro, accum
    return outcome


def _forward_backward(model, tokenizer, packed: PackedAdapters, batches: dict, micro: int, settings: dict, dims,
                      overhead, right_pad: bool, logit_index: bool, encode, width: int = 1) -> list:
    """One packed step's forwards and backwards: micro-batch i of every group in one forward; each group's losses
    on its own rows (:func:`harness.packed_losses.group_losses`, all groups in one computation), weighted by its
    micro-batch's share as :func:`harness.training._forward_backward` does.
    Returns per micro-batch (values [G, 1 + n_losses] on the device, its groups, their weights)."""
    values = []
    effective = len(next(iter(batches.values())))
    device = next(model.parameters()).device
    for i in range(0, effective, micro):
        chunks = {g: batch[i:i + micro] for g, batch in batches.items()}
        prompts = [p for chunk in chunks.values() for p in chunk]
        row_groups = [g for g, chunk in chunks.items() for p in chunk for _ in p.pairs()]  # choice_logprobs' rows
        weights = [len(chunk) / effective for chunk in chunks.values()]  # [G]
        # copied to the device before the forward is queued (a later copy would wait for it: losses.choice_logprobs)
        slots = torch.tensor([k for k, chunk in enumerate(chunks.values()) for _ in chunk], dtype=torch.long,
                             device=device)  # [B] slot (0..G-1) of each prompt
        weight_t = torch.tensor(weights, device=device)  # [G]
        with packed.rows(torch.tensor(row_groups, dtype=torch.long, device=device)):
            out = choice_logprobs(model, tokenizer, prompts, max_length=settings["max_length"], right_pad=right_pad,
                                  dims=dims, overhead=overhead, encode=encode, logit_index=logit_index,
                                  width_multiple=width)
            parts = group_losses(settings["losses"], out.token_logprobs, out.token_mask, out.labels, slots,
                                 len(chunks))  # [n_losses, G]
            loss = parts[0]
            for value in parts[1:]:
                loss = loss + value  # [G]
            (loss * weight_t.to(loss.dtype)).sum().backward()
            values.append((torch.cat([loss.detach().unsqueeze(1), parts.detach().T], 1).float(), list(chunks),
                           weights))  # [G, 1 + n_losses]
    return values


def _read(values: list, norms: torch.Tensor | None) -> dict:
    """Per group ((total, per loss) summed over micro-batches by weight, gradient norm or 0.0 without clipping,
    as :func:`harness.training._step_values`), in one device read."""
    flat = [v.flatten() for v, _, _ in values]
    if norms is not None:
        flat.append(norms.detach().float().to(flat[0].device))
    host = torch.cat(flat).tolist()
    out, pos = {}, 0
    for v, groups, weights in values:
        k = v.shape[1]
        for g, w in zip(groups, weights):
            summed = out.setdefault(g, [0.0] * k)
            for j in range(k):
                summed[j] += host[pos + j] * w
            pos += k
    n_norms = len(host) - pos
    return {g: (summed, host[pos + g] if n_norms else 0.0) for g, summed in out.items()}
