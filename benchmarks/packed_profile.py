"""Where a packed training step's work goes (``benchmarks/packed_training.py --count-ops`` and ``--profile``).

Two measurements of one training step, separate (:func:`harness.training.train`) against packed
(:func:`harness.packed.train_packed`), both after ``warmup`` untimed steps:

- :func:`count_steps`: device-independent counts. A ``TorchDispatchMode`` counts every aten op dispatched, split
  into phases (``forward``: :func:`harness.losses.choice_logprobs`; ``loss``: from its return to ``backward()``;
  ``backward``; ``clip``: ``clip_grad_norm_`` or :func:`harness.packed_optim.clip_per_group`; ``optimizer``:
  ``optimizer.step()``; ``other``: zeroing gradients, master weights, the per-step device read, the schedule), and
  keeps the largest tensors any op produced. A hook on the model call records each forward's rows R, width W
  (R x W padded tokens) and real tokens (the attention mask's ones), and the logits' shape and size (R x T x V:
  with V = 262,144 the largest tensors of a Gemma 3 step). On CUDA it also counts the stream synchronizations
  per phase (``torch.cuda.set_sync_debug_mode("warn")``: every ``.item()``, ``.tolist()`` and host-to-device copy
  from pageable memory); a packed step should have as many as a separate one (one read of the losses, and the
  copies before each forward). On a GPU every aten op
  is at least one kernel launch (more for some), so the op count per step is the launch-bound step's cost.
- :func:`profile_steps`: ``torch.profiler`` (CPU activities, and CUDA ones on a GPU) over the timed steps: ops
  and kernels per step, device busy time against wall time per step, the top 10 ops (kernels on a GPU) by self time.

``cuda_path=True`` makes a CPU run take the code paths a CUDA run takes (right padding with the logit index, the
fused AdamW and the multi-tensor :class:`harness.optim.Adafactor` for separate runs), so that CPU op counts are
those of the GPU step.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import time
import warnings
from collections import Counter, defaultdict

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

import harness.losses
import harness.packed
import harness.training

PHASES = ("forward", "loss", "backward", "clip", "optimizer", "other")


class PhaseCounter(TorchDispatchMode):
    """Counts aten ops per phase (while ``active``) and keeps the ``keep`` largest op outputs."""

    def __init__(self, keep: int = 8):
        super().__init__()
        self.phase, self.active, self.keep = "other", False, keep
        self.ops: Counter = Counter()  # phase -> ops
        self.names: dict[str, Counter] = defaultdict(Counter)  # phase -> op name -> count
        self.largest: list[tuple[int, str, str, tuple]] = []  # heap of (numel, op, phase, shape)
        self.seconds: Counter = Counter()  # phase -> host seconds (rough: the phase's wall time)
        self.syncs: Counter = Counter()  # phase -> CUDA synchronizations (torch.cuda.set_sync_debug_mode, CUDA only)
        self.forwards: list[dict] = []
        self._since = time.perf_counter()

    def set(self, phase: str) -> None:
        now = time.perf_counter()
        if self.active:
            self.seconds[self.phase] += now - self._since
        self.phase, self._since = phase, now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.active:
            self.ops[self.phase] += 1
            self.names[self.phase][func.__name__] += 1
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    item = (t.numel(), func.__name__, self.phase, tuple(t.shape))
                    if len(self.largest) < self.keep:
                        heapq.heappush(self.largest, item)
                    elif item > self.largest[0]:
                        heapq.heapreplace(self.largest, item)
        return out


@contextlib.contextmanager
def _patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _phase(counter: PhaseCounter, fn, during: str, after: str):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        counter.set(during)
        try:
            return fn(*args, **kwargs)
        finally:
            counter.set(after)
    return wrapped


@contextlib.contextmanager
def phases(counter: PhaseCounter, warmup: int, cuda_path: bool):
    """Phase markers around the training loops' calls; counting starts after ``warmup`` optimizer steps."""
    done = [0]

    def pre(opt, args, kwargs):
        counter.set("optimizer")

    def post(opt, args, kwargs):
        counter.set("other")
        done[0] += 1
        if done[0] == warmup:
            counter.active, counter._since = True, time.perf_counter()
            if cuda_syncs:
                torch.cuda.set_sync_debug_mode("warn")

    def on_warning(message, *args, **kwargs):  # sync debug mode's warnings, counted per phase
        if counter.active and "synchroniz" in str(message):
            counter.syncs[counter.phase] += 1

    def record(fn):
        @functools.wraps(fn)
        def forward(model, **kwargs):
            ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
            out = fn(model, **kwargs)
            if counter.active:
                counter.forwards.append({"rows": ids.shape[0], "width": ids.shape[1], "padded_tokens": ids.numel(),
                                         "real_tokens": mask.sum() if mask is not None else ids.numel(),
                                         "logits": list(out.logits.shape), "logit_elements": out.logits.numel()})
            return out
        return forward

    clip = torch.nn.utils.clip_grad_norm_
    make_opt = harness.training.make_optimizer
    cuda_syncs = torch.cuda.is_available() and torch.cuda.is_initialized()
    with contextlib.ExitStack() as stack:
        if cuda_syncs:
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("always")
            stack.enter_context(_patched(warnings, "showwarning", on_warning))
            stack.callback(torch.cuda.set_sync_debug_mode, "default")
        hooks = [register_optimizer_step_pre_hook(pre),
                 register_optimizer_step_post_hook(post)]
        for h in hooks:
            stack.callback(h.remove)
        for module in (harness.training, harness.packed):
            stack.enter_context(_patched(module, "choice_logprobs",
                                         _phase(counter, module.choice_logprobs, "forward", "loss")))
        stack.enter_context(_patched(harness.losses, "training_forward", record(harness.losses.training_forward)))
        stack.enter_context(_patched(torch.Tensor, "backward", _phase(counter, torch.Tensor.backward, "backward",
                                                                      "other")))
        stack.enter_context(_patched(torch.nn.utils, "clip_grad_norm_", _phase(counter, clip, "clip", "other")))
        stack.enter_context(_patched(harness.packed, "clip_per_group",
                                     _phase(counter, harness.packed.clip_per_group, "clip", "other")))
        if cuda_path:  # the optimizers a CUDA run makes
            stack.enter_context(_patched(harness.training, "make_optimizer",
                                         lambda params, settings, fused=False: make_opt(params, settings, fused=True)))
        stack.enter_context(counter)
        yield


def _summary(counter: PhaseCounter, steps: int) -> dict:
    per = {p: counter.ops[p] / steps for p in PHASES}
    fw = counter.forwards
    return {"ops_per_step": {**per, "total": sum(per.values())},
            "host_s_per_step_rough": {p: counter.seconds[p] / steps for p in PHASES},
            "forwards_per_step": len(fw) / steps,
            "rows_per_forward": sum(f["rows"] for f in fw) / max(len(fw), 1),
            "padded_tokens_per_step": sum(f["padded_tokens"] for f in fw) / steps,
            "real_tokens_per_step": sum(int(f["real_tokens"]) for f in fw) / steps,
            "cuda_syncs_per_step": {p: counter.syncs[p] / steps for p in PHASES} if counter.syncs else None,
            "logits_shapes": sorted({tuple(f["logits"]) for f in fw}),  # [R, T, V] (or [R, keep, V])
            "logit_elements_per_step": sum(f["logit_elements"] for f in fw) / steps,
            "largest_tensors": [{"numel": n, "op": op, "phase": ph, "shape": list(shape)}
                                for n, op, ph, shape in sorted(counter.largest, reverse=True)],
            "top_ops": {p: counter.names[p].most_common(8) for p in PHASES if counter.names[p]}}


def count_steps(run, warmup: int, steps: int, cuda_path: bool = True) -> dict:
    """Counts (module docstring) over the ``steps`` steps after ``warmup`` of ``run()`` (one training of
    ``warmup + steps`` steps; several trainings one after another are summed, per step of each)."""
    counter = PhaseCounter()
    with phases(counter, warmup, cuda_path):
        run(counter)
    return _summary(counter, steps)


def profile_steps(run, warmup: int, steps: int, device: torch.device, top: int = 10) -> dict:
    """``torch.profiler`` over the ``steps`` steps after ``warmup`` (module docstring); per step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities)
    done, clock = [0], {}

    def post(opt, args, kwargs):
        done[0] += 1
        if done[0] == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            prof.start()
            clock["start"] = time.perf_counter()

    hook = register_optimizer_step_post_hook(post)
    try:
        run(None)
    finally:
        hook.remove()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - clock["start"]
    prof.stop()
    events = prof.key_averages()
    cpu_ops = [e for e in events if e.device_type == DeviceType.CPU and e.key.startswith("aten::")]
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    if kernels:
        busy_us = sum(e.self_device_time_total for e in kernels)
        ranked = sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]
        top_list = [{"name": e.key[:100], "ms_per_step": e.self_device_time_total / 1e3 / steps,
                     "calls_per_step": e.count / steps} for e in ranked]
    else:  # CPU: the ops' self time is the device's busy time
        busy_us = sum(e.self_cpu_time_total for e in cpu_ops)
        ranked = sorted(cpu_ops, key=lambda e: -e.self_cpu_time_total)[:top]
        top_list = [{"name": e.key[:100], "ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                     "calls_per_step": e.count / steps} for e in ranked]
    wall_ms = wall * 1e3 / steps  # includes the profiler's own overhead
    busy_ms = busy_us / 1e3 / steps
    return {"wall_ms_per_step": wall_ms, "device_busy_ms_per_step": busy_ms,
            "busy_fraction": busy_ms / wall_ms if wall_ms else None,
            "aten_ops_per_step": sum(e.count for e in cpu_ops) / steps,
            "kernels_per_step": sum(e.count for e in kernels) / steps if kernels else None,
            "top": top_list}
