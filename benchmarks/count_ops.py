"""Count the aten ops dispatched per training step and per ``on_step`` hook of one method, on the CPU.

Each dispatched op is (about) one kernel launch on a GPU, so the count is a proxy for launch-bound step time:
it runs ``harness run`` for 4 steps on copa (2 examples, SmolLM2-135M, float32, CPU) with a
``TorchDispatchMode`` counter around ``harness.training.training_step`` (forward, backward, optimizer) and
around the method's ``on_step`` hook (AdaLoRA's rank allocation), then prints one line per call with the count,
the seconds and, for the last step and each hook call, the most frequent ops.

    python -m benchmarks.count_ops adalora                         # harness.methods.adalora_allocator
    python -m benchmarks.count_ops adalora --allocator per-tensor  # its non-CPU path (a mean per tensor)
    python -m benchmarks.count_ops adalora --allocator peft        # peft's own update_and_allocate
    python -m benchmarks.count_ops lora --method-args r=4

Counts are of ops seen at the Python dispatch level: a ``_foreach`` op over many tensors counts once (on CUDA it
is one or a few launches), views count though they launch nothing. Takes about a minute per method.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import time

from torch.utils._python_dispatch import TorchDispatchMode


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0
        self.by = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        self.by[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method")
    parser.add_argument("--method-args", default="")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--store", default=None, help="sqlite store (default: a temporary file)")
    parser.add_argument("--allocator", choices=("harness", "per-tensor", "peft"), default="harness",
                        help="adalora's hook: the harness's allocator (grouped means on the CPU), the harness's "
                             "with a mean per tensor (its CUDA path), or peft's update_and_allocate")
    args = parser.parse_args()

    import tempfile

    import harness.training as training
    from harness.cli import main as cli
    from harness.methods import get_method

    calls = []
    step_fn = training.training_step

    def counted_step(*a, **k):
        with Count() as c:
            start = time.perf_counter()
            out = step_fn(*a, **k)
            seconds = time.perf_counter() - start
        calls.append(("step", c.n, seconds, c.by))
        return out

    training.training_step = counted_step
    info = get_method(args.method)
    if info.on_step is not None:
        hook = info.on_step
        if args.allocator == "peft":
            def hook(model, step):
                model.base_model.update_and_allocate(step)
        elif args.allocator == "per-tensor":
            from harness.methods.adalora_allocator import fast_allocator

            def hook(model, step, hook=hook):
                fast_allocator(model.base_model, grouped=False)  # built once, before the hook's first use
                hook(model, step)

        def counted_hook(model, step, hook=hook):
            with Count() as c:
                start = time.perf_counter()
                hook(model, step)
                seconds = time.perf_counter() - start
            calls.append(("on_step", c.n, seconds, c.by))

        object.__setattr__(info, "on_step", counted_hook) if dataclasses.is_dataclass(info) else \
            setattr(info, "on_step", counted_hook)
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["run", "--methods", args.method, "--tasks", "copa", "--seeds", "0", "--templates", "connective",
                "--limit", "2", "--steps", str(args.steps), "--store", args.store or f"{tmp}/ops.sqlite",
                "--device", "cpu", "--quiet"]
        if args.method_args:
            argv += ["--method-args", args.method_args]
        try:
            cli(argv, standalone_mode=False)
        except SystemExit:
            pass
    last_step = max(i for i, c in enumerate(calls) if c[0] == "step") if calls else -1
    for i, (kind, n, seconds, by) in enumerate(calls):
        top = by.most_common(6) if kind == "on_step" or i == last_step else ""
        print(args.method, args.method_args, kind, n, f"{seconds:.2f}s", top)


if __name__ == "__main__":
    main()
