"""Few-shot training of a PEFT method, T-Few style (Liu et al. 2022, arXiv 2205.05638, sec. 3.2-3.3).

Every step samples a batch of training examples (shuffled epochs, seeded), renders each with a random template
(or ``settings["train_template"]``), scores every answer choice with :func:`choice_logprobs` (the same tokens as
evaluation, via :func:`harness.scoring.encode_pair`) and minimises the sum of the chosen losses (both in
:mod:`harness.losses`, re-exported here):

- ``lm`` L_LM: cross-entropy of the correct choice's tokens, averaged over all of them in the batch;
- ``ul`` L_UL: unlikelihood of the wrong choices' tokens, ``-log(1 - p + 0.01)``, averaged over all of them;
- ``ln`` L_LN: softmax cross-entropy over the choices' length-normalized (mean per-token) log-probabilities.

These match r-three/t-few ``src/models/EncoderDecoder.py`` (``lm_loss``, ``unlikely_loss``, ``mc_loss`` with
``length_norm=1``), with one cleanup: T-Few's L_UL also adds ``-log(1.01)`` for padding positions of the
wrong choices (and counts them in the mean); we leave padding out entirely.

With gradient accumulation the micro-batch losses are weighted by their share of the examples, so L_LN is
exact and the token means of L_LM/L_UL are per micro-batch. Runs are seeded (python ``random.Random(seed)`` for
sampling and templates, ``torch.manual_seed(seed)``), so CPU float32 reruns give identical losses.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import random
import time

import torch
from tqdm.auto import tqdm

from harness import costs
from harness.master_weights import MasterWeights
from harness.compiling import (compile_failure, compile_mode, for_training, step_begin, strict_first_step,
                               uncompile_blocks, width_multiple)
from harness.costs import ModelDims, Work
from harness.errors import HarnessError
from harness.losses import (LOSS_FUNCTIONS, ChoiceLogprobs, choice_logprobs,  # noqa: F401  (re-exported)
                            length_normalized_loss, lm_loss, training_forward, unlikelihood_loss)
from harness.methods.base import Overhead, train_overhead_flops
from harness.scoring import encode_pair
from harness.train_state import TrainState, restore

log = logging.getLogger(__name__)


class TrainingDiverged(HarnessError):
    """The loss (or gradient norm) became NaN or infinite."""

    def __init__(self, step: int, loss: float, what: str = "loss"):
        super().__init__(f"training diverged at step {step}: {what} is {loss}; try a lower --lr")
        self.step, self.loss = step, loss


# --------------------------------------------------------------------------------------------- training

@dataclasses.dataclass
class TrainStats:
    losses: list[float]  # total loss per optimizer step
    components: dict[str, list[float]]  # per loss name, per step
    steps: int
    seconds: float
    work: Work  # all training forwards (every processed token of every choice row, no padding)
    rows: int  # forward rows processed
    overhead_flops: int  # method FLOPs outside the base model (unmerged LoRA, prompt encoders), fwd + bwd
    peak_memory_bytes: int
    micro_batch: int  # final micro-batch (halved on CUDA out-of-memory)
    grad_accum: int  # final accumulation steps; micro_batch * grad_accum = the effective batch
    compiled: bool = False  # the training forwards ran under torch.compile
    step_seconds: list[float] = dataclasses.field(default_factory=list)  # wall time of each step (first: compile)
    step_tokens: list[int] = dataclasses.field(default_factory=list)  # tokens processed by each step
    forwards: int = 0  # forward calls (micro-batches) of the counted steps


def make_optimizer(params: list, settings: dict, *, fused: bool = False) -> torch.optim.Optimizer:
    """The optimizer of ``settings``.

    Adafactor is T-Few's (r-three/t-few ``src/utils/get_optimizer.py``): ``transformers.optimization.Adafactor``
    with ``lr``, ``weight_decay``, ``scale_parameter`` from the settings and ``relative_step=False,
    warmup_init=False`` (the settings' values, which :class:`harness.methods.base.TrainConfig` only lets be False).
    ``fused`` (CUDA): AdamW's fused kernel and the multi-tensor Adafactor of :mod:`harness.optim`, a handful of
    kernels per step instead of dozens per parameter, the same update as transformers' for both ``scale_parameter``
    values (``tests/test_optim.py``). ``torch.optim.Adafactor`` is a different optimizer (always a relative step
    and parameter scaling; see :mod:`harness.optim`) and is not used."""
    if settings["optimizer"] == "adafactor":
        options = {name: settings.get(name) for name in ("scale_parameter", "relative_step", "warmup_init")}
        if not all(isinstance(v, bool) for v in options.values()) or options["relative_step"] or options["warmup_init"]:
            raise HarnessError(f"adafactor needs scale_parameter true/false and relative_step, warmup_init false in "
                               f"the training settings (resolve them with harness.methods.training_settings), got "
                               f"{options}")
        if fused:
            from harness.optim import Adafactor

            return Adafactor(params, lr=settings["lr"], weight_decay=settings["weight_decay"],
                             scale_parameter=options["scale_parameter"])
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=settings["lr"], weight_decay=settings["weight_decay"], **options)
    if settings["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=settings["lr"], weight_decay=settings["weight_decay"],
                                 **({"fused": True} if fused else {}))
    raise HarnessError(f"unknown optimizer {settings['optimizer']!r}; use adafactor or adamw")


def optimizer_view(model, params: list) -> MasterWeights:
    """What the optimizer steps for the trainable ``params`` of ``model``: their :class:`MasterWeights` (float32
    copies of 16-bit ones), unless modules of ``model`` are of a class with an ``optimizer_view(model, params)``
    static method, which then makes an object of the same interface (FishMask's ``update=dense``: the masked
    tensors whole, with masked gradients, :class:`harness.methods.fishmask.DenseMasks`)."""
    kinds = {type(m) for m in model.modules() if callable(getattr(type(m), "optimizer_view", None))}
    if len(kinds) > 1:
        raise HarnessError(f"modules of several classes define optimizer_view: {sorted(k.__name__ for k in kinds)}")
    return kinds.pop().optimizer_view(model, params) if kinds else MasterWeights(params)


def training_templates(task, settings: dict) -> list:
    """The templates a training draws its rows' prompts from: ``settings["train_template"]`` alone when set, else
    every template of ``task`` (T-Few: a random template per example)."""
    if settings.get("train_template"):
        return [task.template(settings["train_template"])]
    return list(task.templates)


def make_schedule(optimizer, settings: dict):
    """T-Few's ``linear_decay_with_warmup`` (warmup = steps x warmup_ratio, not rounded, as T-Few) or constant.

    As in T-Few (r-three/t-few ``src/utils/get_scheduler.py``, stepped after every optimizer step by PyTorch
    Lightning), step ``s`` (from 0) runs at ``lr x s / warmup`` during the warmup, then ``lr x (steps - s) / (steps
    - warmup)``: with any warmup the first step has learning rate 0 (Adafactor and AdamW still update their
    second moments), so ``steps=1`` trains nothing (:func:`train` warns) and LoRA's A matrices first move at the
    third step (B is zero until the second). Use ``warmup_ratio=0`` for every step to count."""
    from transformers.optimization import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    warmup = settings["steps"] * settings["warmup_ratio"]
    if settings["schedule"] == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, settings["steps"])
    return get_constant_schedule_with_warmup(optimizer, warmup)


class _Sampler:
    """Shuffled epochs over the examples (T-Few's shuffled DataLoader), seeded."""

    def __init__(self, n: int, rng: random.Random):
        self.n, self.rng, self.queue = n, rng, []

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if not self.queue:
                self.queue = list(range(self.n))
                self.rng.shuffle(self.queue)
            out.append(self.queue.pop(0))
        return out


def _forward_backward(model, tokenizer, prompts, micro: int, settings: dict, dims, overhead, right_pad, encode,
                      logit_index: bool = False, causal_only: bool = False, width: int = 1):
    """Accumulate gradients of the summed losses over micro-batches.

    Returns (values, weights, work, rows): ``values`` [n_micro, 1 + n_losses] (total, then each loss) stays on the
    device, so a step reads the device once (:func:`_step_values`)."""
    values, weights, work, rows = [], [], Work(), 0
    for i in range(0, len(prompts), micro):
        chunk = prompts[i:i + micro]
        out = choice_logprobs(model, tokenizer, chunk, max_length=settings["max_length"], right_pad=right_pad,
                              dims=dims, overhead=overhead, encode=encode, logit_index=logit_index,
                              causal_only=causal_only, width_multiple=width)
        weight = len(chunk) / len(prompts)
        parts = [LOSS_FUNCTIONS[name](out.token_logprobs, out.token_mask, out.labels) for name in settings["losses"]]
        loss = parts[0]
        for value in parts[1:]:
            loss = loss + value
        (loss * weight).backward()
        values.append(torch.stack([loss.detach()] + [v.detach() for v in parts]).float())
        weights.append(weight)
        work.add(out.work)
        rows += out.rows
    return torch.stack(values), weights, work, rows


def _step_values(values: torch.Tensor, weights: list[float], norm: torch.Tensor | None) -> tuple[list[float], float]:
    """One device read per step: the micro-batch-weighted (total, per loss) values, and the gradient norm."""
    flat = values.flatten()
    if norm is not None:
        flat = torch.cat([flat, norm.detach().float().reshape(1)])
    host = flat.tolist()
    n = values.shape[1]
    summed = [sum(host[m * n + j] * w for m, w in enumerate(weights)) for j in range(n)]
    return summed, (host[-1] if norm is not None else 0.0)


def training_step(backward, optimizer, masters: MasterWeights, settings: dict, step: int = 0):
    """One optimizer step, as :func:`train` runs it (and ``benchmarks/train_throughput.py``'s synthetic kinds).

    Zeroes the gradients, calls ``backward()`` (the forwards and backwards of the batch's micro-batches, through
    :func:`training_forward`; it returns ``(values, weights, ...)`` as :func:`_forward_backward` does), copies the
    gradients to the float32 masters, clips them at ``settings["max_grad_norm"]`` (if set), reads the losses and
    the norm from the device once, raises :class:`TrainingDiverged` on a non-finite value, then steps the optimizer
    and copies the masters back. Returns (``backward()``'s result, total loss, per-loss values).
    """
    optimizer.zero_grad(set_to_none=True)
    masters.zero_grad()
    out = backward()
    values, weights = out[0], out[1]
    masters.pull_grads()
    clip = settings.get("max_grad_norm")
    norm = torch.nn.utils.clip_grad_norm_(masters.params, clip) if clip else None
    (loss, *parts), norm_value = _step_values(values, weights, norm)
    if not math.isfinite(loss):
        raise TrainingDiverged(step, loss)
    if not math.isfinite(norm_value):
        raise TrainingDiverged(step, norm_value, "the gradient norm")
    optimizer.step()
    masters.push()
    return out, loss, parts


PADDING_CHOICES = ("auto", "left", "right")  # auto: right on CUDA (see train), left elsewhere
# train() also takes "right-causal": right padding without an attention mask (exact: the padding follows every real
# token), so that SDPA can use its unmasked kernels; measured by benchmarks/train_memory_probe.py, not a default
TRAIN_PADDING_CHOICES = PADDING_CHOICES + ("right-causal",)


def train(model, tokenizer, train_examples: list[dict], task, settings: dict, seed: int, progress: bool = False,
          *, method: str | None = None, compile: str | bool | None = "auto", padding: str = "auto",
          state: TrainState | None = None) -> TrainStats:
    """Train ``model``'s trainable parameters in place on ``train_examples`` (see the module docstring).

    ``method`` (a registry name) tells how to pad (peft prompt learning drops position ids) and what the method
    adds to each forward; without it rows are left-padded and no overhead is counted. ``compile``
    (:func:`compile_mode`): eager by default, or compiled blocks or model; if compiling fails on the first step
    the loop warns and goes on eagerly, and evaluation never uses a compiled model. On CUDA the optimizer is
    the fused one (:func:`make_optimizer`) and rows are right-padded (``padding``: ``auto``, ``left``, ``right`` or
    ``right-causal``, right padding without an attention mask), since SDPA gives NaN gradients for the fully masked
    query rows of left padding. ``state`` (:mod:`harness.train_state`): where the training keeps its state between
    steps; a training whose state file exists continues at the step it reached (the caller removes the file).
    """
    from harness.methods import get_method, method_overhead

    if not train_examples:
        raise HarnessError("no training examples")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise HarnessError("the model has no trainable parameters; apply a method first")
    needs_right = method is not None and not get_method(method).position_ids
    on_step = get_method(method).on_step if method is not None else None
    step_state = get_method(method).step_state if method is not None else None  # (get, set) of on_step's state
    if padding not in TRAIN_PADDING_CHOICES:
        raise HarnessError(f"padding must be one of {', '.join(TRAIN_PADDING_CHOICES)}, got {padding!r}")
    if padding == "right-causal" and needs_right:
        raise HarnessError(f"method {method!r} adds virtual tokens: right-causal padding needs a method without them")
    if padding == "left" and needs_right:
        raise HarnessError(f"method {method!r} drops position ids: its rows must be right-padded")
    device = next(model.parameters()).device
    # on CUDA, SDPA's backward gives NaN for left padding's fully masked query rows (benchmarks/nan_probe.py)
    right_pad = needs_right or padding in ("right", "right-causal") or (padding == "auto" and device.type == "cuda")
    logit_index = right_pad and not needs_right
    causal_only = padding == "right-causal"
    overhead = method_overhead(model, method, settings) if method else Overhead()
    dims = ModelDims.from_model(model)
    mode = compile_mode(compile)
    if mode in ("blocks", "graphs") and method is not None and not get_method(method).shares_block_graph:
        log.warning("%s: its blocks cannot share a compiled graph (each reads its own layer's state); training "
                    "eagerly", method)
        mode = None
    forward_model, compiled = for_training(model, mode)
    templates = training_templates(task, settings)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    sampler = _Sampler(len(train_examples), rng)
    masters = optimizer_view(model, params)  # float32 copies of bfloat16/float16 trainable parameters
    optimizer = make_optimizer(masters.params, settings, fused=device.type == "cuda")
    schedule = make_schedule(optimizer, settings)
    if not any(schedule.lr_lambdas[0](s) > 0 for s in range(settings["steps"])):
        log.warning("no training step has a learning rate above 0 (%d step(s), warmup_ratio %g: the warmup's first "
                    "step has learning rate 0): the model is not trained; use more steps or warmup_ratio=0",
                    settings["steps"], settings["warmup_ratio"])
    encode = functools.cache(lambda context, choice: encode_pair(tokenizer, context, choice))  # few distinct prompts

    micro, accum = settings["batch_size"], settings["grad_accum"]
    effective = micro * accum
    stats = TrainStats([], {name: [] for name in settings["losses"]}, 0, 0.0, Work(), 0, 0, 0, micro, accum,
                       compiled=mode is not None)
    first_step, before = 0, 0.0  # a resumed training: its first step and the seconds of the earlier part
    key = {"settings": settings, "seed": seed, "examples": len(train_examples), "method": method,
           "params": [list(p.shape) for p in params]}
    saved = state.load(key) if state is not None else None
    if saved is not None:
        restore(saved, params=params, masters=masters, optimizer=optimizer, schedule=schedule, rng=rng)
        if step_state is not None:
            step_state[1](model, saved.get("method_state"))
        sampler.queue, stats, micro, accum = saved["queue"], saved["stats"], saved["micro"], saved["accum"]
        first_step, before, stats.compiled = saved["next_step"], stats.seconds, mode is not None
        log.info("resuming the training at step %d of %d (%s)", first_step, settings["steps"], state.path)

    def save_state(step: int) -> None:  # after ``step`` (0-based, done)
        state.save(key, step, params=params, masters=masters, optimizer=optimizer, schedule=schedule, rng=rng,
                   queue=sampler.queue, stats=stats, micro=micro, accum=accum,
                   method_state=step_state[0](model) if step_state is not None else None)

    start = time.perf_counter()
    was_training = model.training
    model.train()
    bar = tqdm(range(first_step, settings["steps"]), disable=not progress, desc="train", leave=False)
    try:
        for step in bar:
            step_start = time.perf_counter()
            batch = [task.render(rng.choice(templates), train_examples[i]) for i in sampler.take(effective)]
            step_begin(mode if stats.compiled else None)

            def backward():
                nonlocal micro, accum, compiled, forward_model
                while True:
                    try:
                        with strict_first_step(stats.compiled, step):
                            return _forward_backward(forward_model, tokenizer, batch, micro, settings, dims,
                                                     overhead, right_pad, encode, logit_index, causal_only,
                                                     width_multiple(mode if stats.compiled else None))
                    except torch.OutOfMemoryError:
                        if micro == 1:
                            raise
                        optimizer.zero_grad(set_to_none=True)
                        masters.zero_grad()
                        micro = (micro + 1) // 2
                        accum = math.ceil(effective / micro)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        log.warning("out of memory at step %d: micro-batch %d x %d accumulation steps", step, micro,
                                    accum)
                    except Exception as exc:  # noqa: BLE001 - a compiler failure on the first step: go on eagerly
                        if not stats.compiled or step > 0:
                            raise
                        log.warning("torch.compile failed (%s); training eagerly", compile_failure(exc))
                        optimizer.zero_grad(set_to_none=True)
                        masters.zero_grad()
                        uncompile_blocks(compiled)
                        compiled, forward_model, stats.compiled = [], model, False

            (_, weights, work, rows), loss, parts = training_step(backward, optimizer, masters, settings, step)
            if on_step is not None:  # e.g. AdaLoRA's rank allocation, which reads the gradients
                on_step(model, step)
            schedule.step()
            stats.losses.append(loss)
            for name, value in zip(settings["losses"], parts):
                stats.components[name].append(value)
            stats.work.add(work)
            stats.rows += rows
            stats.forwards += math.ceil(len(batch) / micro)
            stats.step_seconds.append(time.perf_counter() - step_start)
            stats.step_tokens.append(work.tokens)
            bar.set_postfix(loss=f"{loss:.4f}")
            if state is not None and step + 1 < settings["steps"] and state.due():
                stats.seconds = before + time.perf_counter() - start
                save_state(step)
    finally:
        uncompile_blocks(compiled)
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)
        masters.zero_grad()
    stats.steps = len(stats.losses)
    stats.seconds = before + time.perf_counter() - start
    stats.overhead_flops = train_overhead_flops(overhead, stats.work.tokens, stats.rows, stats.forwards,
                                                stats.work.logit_positions, work=stats.work)
    # a training restored from its finished state (no step here) keeps that state's peak, the training process's
    stats.peak_memory_bytes = max(stats.peak_memory_bytes, costs.peak_memory_bytes(device))
    stats.micro_batch, stats.grad_accum = micro, accum
    if state is not None and first_step < settings["steps"] and time.perf_counter() - start >= state.interval():
        # a training as long as the wait between two writes also writes its finished state (so the final write costs
        # what a periodic one does): the caller removes it once every run of the group is stored, so a run killed
        # while it is scored continues there with no step redone (the state's stats are the whole training's)
        save_state(settings["steps"] - 1)
    return stats
