"""One Adafactor step: harness.optim.Adafactor (multi-tensor) against transformers' Adafactor (T-Few's reference).

The parameters are those the harness trains: (IA)^3's vectors of SmolLM2-135M (90 1-D tensors, 57,600 values) and
LoRA's q/v matrices (r = 8, 120 2-D tensors), with seeded random gradients; both ``scale_parameter`` values. Each
optimizer takes ``--warmup`` steps, then the median of ``--steps`` timed steps is reported (a device synchronize
before each clock read on CUDA), with the worst relative difference of the parameters after the last step.

    python -m benchmarks.optimizer_step --device cpu --out benchmarks/results/optimizer_step_cpu.json

On CUDA the step is launch-bound (a few kernels per parameter for transformers' class); the CPU figure shows the
same effect as Python and dispatch overhead per parameter. Recorded results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.common import environment
from harness.optim import Adafactor

SMOLLM2 = {"layers": 30, "d_model": 576, "kv_dim": 192, "ffn": 1536}


def shapes(kind: str) -> list[tuple[int, ...]]:
    """Trainable tensor shapes of ``kind`` on SmolLM2-135M."""
    layers, d, kv, ffn = SMOLLM2["layers"], SMOLLM2["d_model"], SMOLLM2["kv_dim"], SMOLLM2["ffn"]
    if kind == "ia3":  # k, v outputs and the down-projection input per layer
        return [(kv,), (kv,), (ffn,)] * layers
    if kind == "lora":  # A (r x in), B (out x r) for q and v
        return [(8, d), (d, 8), (8, d), (kv, 8)] * layers
    raise ValueError(kind)


def time_steps(make, kind: str, device: torch.device, warmup: int, steps: int) -> tuple[float, list[torch.Tensor]]:
    """Median seconds of one ``step()`` and the parameters after all steps."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes(kind)]
    grads = [[torch.randn(s, generator=gen).to(device) for s in shapes(kind)] for _ in range(4)]
    optimizer = make(params)
    times = []
    for i in range(warmup + steps):
        for p, g in zip(params, grads[i % len(grads)]):
            p.grad = g
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), [p.detach().cpu() for p in params]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from transformers.optimization import Adafactor as Reference

    device = torch.device(args.device)
    rows = []
    for kind in ("ia3", "lora"):
        for scale in (True, False):
            ref_s, ref_p = time_steps(lambda ps: Reference(ps, lr=3e-3, scale_parameter=scale, relative_step=False,
                                                           warmup_init=False), kind, device, args.warmup, args.steps)
            own_s, own_p = time_steps(lambda ps: Adafactor(ps, lr=3e-3, scale_parameter=scale), kind, device,
                                      args.warmup, args.steps)
            diff = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item() for a, b in zip(own_p, ref_p))
            rows.append({"params": kind, "n_tensors": len(shapes(kind)), "scale_parameter": scale,
                         "transformers_ms": ref_s * 1e3, "harness_ms": own_s * 1e3, "speedup": ref_s / own_s,
                         "max_rel_param_diff": diff})
    print("| params | tensors | scale_parameter | transformers ms/step | harness ms/step | speed-up | max rel. diff |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['params']} | {r['n_tensors']} | {r['scale_parameter']} | {r['transformers_ms']:.3f} | "
              f"{r['harness_ms']:.3f} | {r['speedup']:.1f}x | {r['max_rel_param_diff']:.1e} |")
    if args.out:
        record = {"command": "python -m benchmarks.optimizer_step " + " ".join(
                      f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
                  "environment": environment(device), "warmup": args.warmup, "steps": args.steps, "rows": rows}
        with open(args.out, "w") as handle:
            json.dump(record, handle, indent=1)


if __name__ == "__main__":
    main()
