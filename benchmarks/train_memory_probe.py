"""Where a training step's GPU memory goes: peak memory and step time of one method per attention backend.

Round 7 of the results (docs/benchmarks.md (d)): one Gemma 3 270M training process ((IA)3 on cb, batch 8, bfloat16)
held 18.7 GB at its peak on an H200, against 5.0 GB for SmolLM2-135M, while the same step's tensors peak at 2.5 GB
(bfloat16) on the CPU; the cuDNN attention errors of both Gemma rounds point at the attention backend. This
benchmark trains the harness's own step (:func:`harness.training.train`, the paper preset's settings, right padding
as on CUDA) for ``--steps`` steps once per attention setting and records ``torch.cuda.max_memory_allocated`` and the
median step time:

- ``sdpa``: PyTorch's default choice of SDPA kernel (cuDNN, flash, memory-efficient or math);
- ``sdpa-no-cudnn``: SDPA with cuDNN attention disabled (``torch.backends.cuda.enable_cudnn_sdp(False)``);
- ``efficient``, ``math``: SDPA restricted to one kernel (``torch.nn.attention.sdpa_kernel``);
- ``eager``: the model's own attention (``set_attn_implementation("eager")``).

Each setting runs with ``--paddings`` (default ``right``, as on CUDA, and ``right-causal``: right padding without
an attention mask, which SDPA can serve with its unmasked kernels; exact, since the padding follows every real
token). A setting that fails (out of memory, a kernel that refuses the shapes) is recorded with its error. On the CPU only
``sdpa``, ``math`` and ``eager`` apply, and the peak is the process's RSS (not per setting: use one setting a run).

    python -m benchmarks.train_memory_probe --model gemma3-270m --device cuda --steps 20 \\
        --out $OUT/train_memory_probe.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time

import torch

from benchmarks.common import environment, print_table, write_json
from harness import costs
from harness.data import few_shot_examples, resolve_data_dir
from harness.methods import apply_method, training_settings
from harness.models import load_model
from harness.tasks import load_task
from harness.training import train

SETTINGS = ("sdpa", "sdpa-no-cudnn", "efficient", "math", "eager")


@contextlib.contextmanager
def attention_setting(model, name: str):
    """Run the block under one attention setting (see the module docstring); restores the model and flags."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name not in SETTINGS:
        raise SystemExit(f"unknown attention setting {name!r}; choose from {', '.join(SETTINGS)}")
    before = model.config._attn_implementation
    cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        if name == "eager":
            model.set_attn_implementation("eager")
            yield
        elif name == "sdpa-no-cudnn":
            torch.backends.cuda.enable_cudnn_sdp(False)
            yield
        elif name in ("efficient", "math"):
            backend = SDPBackend.EFFICIENT_ATTENTION if name == "efficient" else SDPBackend.MATH
            with sdpa_kernel([backend]):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        if model.config._attn_implementation != before:
            model.set_attn_implementation(before)


def probe(base, tokenizer, task, examples, method: str, setting: str, steps: int, seed: int,
          device: torch.device, padding: str = "right") -> dict:
    """Train a fresh copy of ``base`` under one setting; its peak memory, step times and last loss."""
    settings = training_settings(method, "paper", {"steps": steps, "warmup_ratio": 0.0})
    torch.manual_seed(seed)
    model = apply_method(copy.deepcopy(base), method, settings)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    costs.reset_peak_memory(device)
    row = {"method": method, "attention": setting, "padding": padding, "steps": steps}
    start = time.perf_counter()
    try:
        with attention_setting(model, setting):
            stats = train(model, tokenizer, examples, task, settings, seed, method=method, padding=padding)
        times = sorted(stats.step_seconds[1:]) or stats.step_seconds
        row |= {"peak_gb": costs.peak_memory_bytes(device) / 1e9, "median_step_s": times[len(times) // 2],
                "first_step_s": stats.step_seconds[0], "loss_last": stats.losses[-1],
                "micro_batch": stats.micro_batch, "error": None}
    except Exception as exc:  # a setting that cannot run is a result, not the end of the probe
        row |= {"peak_gb": costs.peak_memory_bytes(device) / 1e9, "error": f"{type(exc).__name__}: {exc}"[:300]}
    row["seconds"] = time.perf_counter() - start
    del model
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--methods", default="ia3")
    p.add_argument("--task", default="cb")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention", default=",".join(SETTINGS), help="comma-separated: " + ", ".join(SETTINGS))
    p.add_argument("--paddings", default="right,right-causal")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="benchmarks/results/train_memory_probe.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    lm = load_model(args.model, args.device, args.dtype)
    task = load_task(args.task)
    examples = few_shot_examples(task, args.seed, resolve_data_dir(args.data_dir))  # default: the embedded data
    rows = []
    for method in args.methods.split(","):
        for padding in args.paddings.split(","):
            for setting in args.attention.split(","):
                rows.append(probe(lm.model, lm.tokenizer, task, examples, method, setting, args.steps, args.seed,
                                  device, padding))
                print(f"# {rows[-1]}", flush=True)
    write_json(args.out, {"env": environment(device), "args": vars(args), "results": rows})
    print_table(rows, ["method", "attention", "padding", "steps", "peak_gb", "median_step_s", "first_step_s", "loss_last",
                       "micro_batch", "error"])


if __name__ == "__main__":
    main()
