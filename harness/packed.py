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

How rows get their adapter (:class:`PackedAdapters`): while training, the peft model's own adapter layers are
disabled (they call their base layer alone) and hooks on those base layers apply each row's group's tensors,
gathered per row from the stacked leaves: (IA)3 multiplies the outputs (keys, values) or inputs
(feed-forward) by ``vectors[group[b]]``, as peft's ``IA3Layer.forward`` does; LoRA adds
``scaling * B[group[b]] A[group[b]] x`` as peft's ``lora.Linear.forward`` does (dropout 0, no variant). After
training, :meth:`PackedAdapters.load_group` copies a group's tensors into the peft model, which is then saved and
evaluated exactly as an unpacked run's. Only decoder-only models are packed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import random
import time

import torch

from harness import costs
from harness.costs import ModelDims, Work
from harness.errors import HarnessError
from harness.master_weights import MasterWeights
from harness.methods.base import Overhead, train_overhead_flops
from harness.scoring import encode_pair
from harness.packed_losses import group_losses
from harness.packed_optim import clip_per_group, make_sliced_optimizer
from harness.training import (PADDING_CHOICES, TrainingDiverged, TrainStats, _Sampler,
                              choice_logprobs, make_schedule)

log = logging.getLogger(__name__)

PACKABLE = ("ia3", "tfew", "lora")  # methods whose groups can share one packed training


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


# --------------------------------------------------------------------------------------------- adapters

def _adapter_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, layer) of every peft IA3 or LoRA layer of ``model``, in module order."""
    from peft.tuners.ia3.layer import IA3Layer
    from peft.tuners.lora.layer import LoraLayer

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (IA3Layer, LoraLayer))]
    if not layers:
        raise HarnessError("packed training needs a peft IA3 or LoRA model")
    return layers


def group_initial_tensors(base, method: str, settings: dict, seed: int) -> list[torch.Tensor]:
    """The trainable tensors a separate run of ``seed`` starts from: ``torch.manual_seed(seed)`` then
    ``apply_method`` on ``base`` (as :func:`harness.peft_runner.run_peft_group` does), copied, and the peft
    layers taken off ``base`` again."""
    from harness.methods import apply_method

    torch.manual_seed(seed)
    model = apply_method(base, method, settings)
    tensors = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    model.unload()  # the base model's own modules back in place
    return tensors


class PackedAdapters:
    """N groups' trainable tensors for a peft IA3 or LoRA ``model``, applied per row by hooks (module docstring).

    ``initial[g]``: group g's starting tensors, in the order of ``model``'s trainable parameters."""

    def __init__(self, model, initial: list[list[torch.Tensor]]):
        self.model = model
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        shapes = [p.shape for p in model.parameters() if p.requires_grad]
        for tensors in initial:
            if [t.shape for t in tensors] != shapes:
                raise HarnessError("packed training: a group's tensors do not match the model's trainable ones")
        # one leaf per trainable tensor: [N, *shape], slice g = group g's tensor
        self.stacked = [torch.nn.Parameter(torch.stack([tensors[i].detach() for tensors in initial]).clone())
                        for i in range(len(shapes))]
        index = {name: i for i, name in enumerate(self.names)}
        self.layers = []  # (layer, kind, [param indices])
        for name, layer in _adapter_layers(model):
            if hasattr(layer, "ia3_l"):
                self.layers.append((layer, "ia3", [index[f"{name}.ia3_l.default"]]))
            else:
                if layer.lora_variant or layer.use_dora.get("default"):
                    raise HarnessError("packed training supports plain LoRA only (no DoRA or other variants)")
                self.layers.append((layer, "lora", [index[f"{name}.lora_A.default.weight"],
                                                    index[f"{name}.lora_B.default.weight"]]))
        self._rows: torch.Tensor | None = None  # [R] group of each row, for one forward

    @property
    def n(self) -> int:
        return self.stacked[0].shape[0]

    @property
    def params(self) -> list[list[torch.Tensor]]:
        """Per group, its tensors (views of the stacked leaves), in the order of the model's trainable ones."""
        return [[s[g] for s in self.stacked] for g in range(self.n)]

    def _stack(self, i: int) -> torch.Tensor:
        return self.stacked[i]  # [N, *shape]

    def _rows_of(self, x: torch.Tensor) -> torch.Tensor:
        if self._rows is None or self._rows.shape[0] != x.shape[0]:
            raise RuntimeError("PackedAdapters: a forward outside rows() or with another number of rows")
        return self._rows

    def _hook(self, layer, kind: str, indices: list[int]):
        if kind == "ia3" and layer.is_feedforward:
            def scale_input(module, args):
                x = args[0]  # [R, L, d_in]
                vec = self._stack(indices[0]).flatten(1)[self._rows_of(x)].unsqueeze(1)  # [R, 1, d_in]
                return ((x.to(vec.dtype) * vec).to(x.dtype), *args[1:])
            return layer.base_layer.register_forward_pre_hook(scale_input)
        if kind == "ia3":
            def scale_output(module, args, out):  # out [R, L, d_out]
                vec = self._stack(indices[0]).flatten(1)[self._rows_of(out)].unsqueeze(1)  # [R, 1, d_out]
                return (out * vec).to(out.dtype)
            return layer.base_layer.register_forward_hook(scale_output)
        scaling = layer.scaling["default"]

        def low_rank(module, args, out):  # out [R, L, d_out]
            rows = self._rows_of(out)
            a = self._stack(indices[0])[rows]  # [R, r, d_in]
            b = self._stack(indices[1])[rows]  # [R, d_out, r]
            x = args[0].to(a.dtype)  # [R, L, d_in]
            delta = torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))  # [R, L, d_out]
            return (out + delta * scaling).to(out.dtype)
        return layer.base_layer.register_forward_hook(low_rank)

    @contextlib.contextmanager
    def attached(self):
        """The peft layers disabled and the per-row hooks on their base layers, for the whole training."""
        handles = []
        try:
            for layer, kind, indices in self.layers:
                layer.enable_adapters(False)
                handles.append(self._hook(layer, kind, indices))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for layer, _, _ in self.layers:
                layer.enable_adapters(True)

    @contextlib.contextmanager
    def rows(self, groups: torch.Tensor):
        """One forward whose row r belongs to group ``groups[r]`` ([R] long)."""
        self._rows = groups
        try:
            yield
        finally:
            self._rows = None

    @torch.no_grad()
    def load_group(self, g: int) -> None:
        """Copy group ``g``'s tensors into the peft model's own adapter (to save or evaluate it)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p, stacked in zip(params, self.stacked):
            p.copy_(stacked[g])


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
                 method: str, padding: str = "auto", progress: bool = False) -> list[TrainStats | Exception]:
    """Train every member's adapter (``packed.params[g]``) for ``settings["steps"]`` steps in one model.

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
        templates.append([m.task.template(settings["train_template"])] if settings.get("train_template")
                         else list(m.task.templates))
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
                    try:
                        values = _forward_backward(model, tokenizer, packed, batches, micro, settings, dims,
                                                   overhead, right_pad, logit_index, encode)
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
                      overhead, right_pad: bool, logit_index: bool, encode) -> list:
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
                                  dims=dims, overhead=overhead, encode=encode, logit_index=logit_index)
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
