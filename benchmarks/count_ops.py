"""Count the aten ops dispatched per training step of one method as ``harness run`` trains it, on the CPU, with the
phase counter of :mod:`benchmarks.packed_profile` (forward, loss, backward, clip, optimizer, other) plus the
method's ``on_step`` hook (AdaLoRA's rank allocation) as a phase of its own.

Each dispatched op is at least one kernel launch on a GPU (views count too, though they launch nothing), so the
count per step is the cost of a launch-bound step, as the small models' trainings of the results grid are. It runs
``harness run`` on copa (2 examples, seed 0, ``connective``, SmolLM2-135M, float32) for ``--warmup + --steps``
steps and counts the ``--steps`` after the warmup, the training only (the Fisher pass before it and the
evaluation after it are not counted). ``--cuda-path`` (default) makes the CPU run build the optimizers a CUDA
run builds (fused AdamW: 2 ops a step; the multi-tensor :class:`harness.optim.Adafactor`), so the optimizer's count
is the GPU's; ``--cpu-path`` counts the CPU's (transformers' per-tensor Adafactor, the AdamW loop). Padding and
the rest are the CPU run's.

    python -m benchmarks.count_ops adalora                         # harness.methods.adalora_allocator
    python -m benchmarks.count_ops adalora --allocator per-tensor  # its non-CPU path (a mean per tensor)
    python -m benchmarks.count_ops adalora --allocator peft        # peft's own update_and_allocate
    python -m benchmarks.count_ops compacter --method-args scale_parameter=false

Prints, after the run's own table, one line of JSON: ops per step by phase and in total, and the most frequent ops
per phase. About a minute a method.
"""

from __future__ import annotations

import argparse
import json
import tempfile


def _hook(info, allocator: str):
    """The method's ``on_step`` hook, AdaLoRA's swapped for ``--allocator``."""
    hook = info.on_step
    if hook is None or allocator == "harness":
        return hook
    if allocator == "peft":
        return lambda model, step: model.base_model.update_and_allocate(step)
    from harness.methods.adalora_allocator import fast_allocator

    def per_tensor(model, step):
        fast_allocator(model.base_model, grouped=False)  # built once, before the hook's first use
        hook(model, step)
    return per_tensor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method")
    parser.add_argument("--method-args", default="")
    parser.add_argument("--warmup", type=int, default=1,
                        help="optimizer steps (and on_step hooks) before counting (at least 1)")
    parser.add_argument("--steps", type=int, default=3, help="counted steps")
    parser.add_argument("--cuda-path", action=argparse.BooleanOptionalAction, default=True,
                        help="the optimizers a CUDA run builds (default) or the CPU's (--no-cuda-path)")
    parser.add_argument("--allocator", choices=("harness", "per-tensor", "peft"), default="harness",
                        help="adalora's hook: the harness's allocator (grouped means on the CPU), the harness's "
                             "with a mean per tensor (its CUDA path), or peft's update_and_allocate")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (counting starts after an optimizer step)")

    import harness.peft_runner
    from benchmarks.packed_profile import _patched, _phase, count_steps
    from harness.cli import main as cli
    from harness.methods import get_method

    info = get_method(args.method)
    hook, on_step_ops = _hook(info, args.allocator), {}

    def run(counter):
        def train(*a, **k):
            try:
                return trainer(*a, **k)
            finally:
                counter.active = False  # the evaluation after training is not counted
                on_step_ops["total"] = counter.ops["on_step"]

        trainer = harness.peft_runner.train
        calls = [0]

        def counted(model, step):  # the hooks after the counted steps' optimizer steps, as phase "on_step"
            calls[0] += 1
            if calls[0] > args.warmup:
                return _phase(counter, hook, "on_step", "other")(model, step)
            active, counter.active = counter.active, False  # a warmup step's hook (AdaLoRA's first: set-up)
            try:
                return hook(model, step)
            finally:
                counter.active = active
        with tempfile.TemporaryDirectory() as tmp, _patched(harness.peft_runner, "train", train):
            argv = ["run", "--methods", args.method, "--tasks", "copa", "--seeds", "0", "--templates", "connective",
                    "--limit", "2", "--steps", str(args.warmup + args.steps), "--store", f"{tmp}/ops.sqlite",
                    "--device", "cpu", "--quiet"] + (["--method-args", args.method_args] if args.method_args else [])
            old = info.on_step
            object.__setattr__(info, "on_step", counted if hook else None)  # MethodInfo is a frozen dataclass
            try:
                cli(argv, standalone_mode=False)
            finally:
                object.__setattr__(info, "on_step", old)

    summary = count_steps(run, args.warmup, args.steps, cuda_path=args.cuda_path)
    per = summary["ops_per_step"]
    per["on_step"] = on_step_ops.get("total", 0) / args.steps
    per["total"] += per["on_step"]
    print(json.dumps({"method": args.method, "method_args": args.method_args, "cuda_path": args.cuda_path,
                      "allocator": args.allocator if info.on_step is not None else None, "ops_per_step": per,
                      "top_ops": summary["top_ops"]}))


if __name__ == "__main__":
    main()
