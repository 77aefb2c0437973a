"""Describe the environment a run was measured in: package versions, device, git commit."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from harness.identity import SCORING_VERSION

PACKAGES = ("harness", "torch", "transformers", "peft", "tokenizers", "accelerate")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def checkout_root() -> Path | None:
    """The harness checkout this code runs from: the package folder's parent, when that folder is the top of a
    git checkout of harness itself (a ``.git`` entry and harness's own ``pyproject.toml``); else None."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not (root / ".git").exists() or not pyproject.is_file():
        return None
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        return None
    return root if re.search(r'^name\s*=\s*"harness"', text, re.MULTILINE) else None


def git_commit() -> str | None:
    """The commit of the harness checkout this code runs from (``-dirty`` with uncommitted changes to tracked
    files). None when the package is not the top of a harness checkout: an installed copy, or a copy inside some
    other repository, must not record that repository's commit; :func:`describe` records the version then."""
    root = checkout_root()
    if root is None:
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def describe(device: torch.device) -> dict:
    """A JSON-ready description stored with every run."""
    info = {
        "packages": {p: _version(p) for p in PACKAGES},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "harness_version": _version("harness"),
        "scoring_version": SCORING_VERSION,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def float_platform() -> dict:
    """What float32 CPU results depend on beyond the code and inputs: the CPU model, the kernels torch dispatches
    to (``get_cpu_capability``: AVX2, AVX512, ...), the torch build and its thread count. Two machines that differ
    here may differ in the last bits of a GEMM (operand order and blocking), and training amplifies such bits: the
    quick preset's LoRA/(IA)3 log-probs moved by up to 9.7e-4 between the CI baseline's machine and an AMD EPYC with
    AVX512 (session 22). ``harness check`` compares trained cells within a wider tolerance when the baseline's
    platform is not this one (harness/report/check.py)."""
    return {"cpu": _cpu_model(), "isa": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
