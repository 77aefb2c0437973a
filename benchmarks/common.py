"""Shared pieces of the benchmarks: the environment record, timing, tables and JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

# NVIDIA H100 SXM5 dense bfloat16 tensor-core peak (datasheet, without sparsity), the MFU denominator.
H100_BF16_PEAK = 989.4e12


def environment(device: torch.device) -> dict:
    """Date, device, package versions: everything a recorded figure must carry."""
    import tokenizers
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "peft": peft_version,
        "cpu_count": os.cpu_count(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "cuda": torch.version.cuda, "sm_count": props.multi_processor_count}
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def model_id(name: str) -> str:
    """``--model`` string of a benchmark model: ``embedded:NAME`` is the real embedded model NAME (CPU figures),
    anything else the random-initialised architecture ``random:NAME``."""
    return name.split(":", 1)[1] if name.startswith("embedded:") else f"random:{name}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """``with Timer(device) as t: ...`` then ``t.seconds`` (device work finished before the clock is read)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, 0.0

    def __enter__(self):
        sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self._start


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """CUDA max allocated since :func:`peak_reset`; None on the CPU (RSS is a process-wide high-water mark)."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def print_table(rows: list[dict], cols: list[str]) -> str:
    """Print (and return) a Markdown table of ``rows`` restricted to ``cols``."""
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def profile(fn, device: torch.device, reps: int = 3, top: int = 10) -> dict:
    """Run ``fn`` ``reps`` times under the profiler: wall time vs summed GPU kernel time per run (their gap is host
    overhead: Python, launches, tokenization), kernel launches per run and the top kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with Timer(device) as t:
            for _ in range(reps):
                fn()
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in kernels) / 1e3 / reps  # ms per run
    wall = t.seconds * 1e3 / reps
    top_k = sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]
    return {"wall_ms": wall, "kernel_ms": busy, "gpu_busy": busy / wall if wall else None,
            "launches": sum(e.count for e in kernels) / reps,
            "top": [{"kernel": e.key[:100], "ms": e.self_device_time_total / 1e3 / reps, "calls": e.count / reps}
                    for e in top_k]}
