"""Shared fixtures: the real data folder beside the checkout and the real embedded model, loaded once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    folder = Path(os.environ.get("HARNESS_DATA_DIR") or DATA_DIR)
    if not (folder / "cb" / "validation.jsonl").exists():
        pytest.skip(f"real SuperGLUE data not found at {folder}; set HARNESS_DATA_DIR")
    return folder


@pytest.fixture(scope="session")
def smollm():
    """SmolLM2-135M in float32 on the CPU (converted from its GGUF once, then ~2 s per load)."""
    from harness.models import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def cb():
    from harness.tasks import load_task

    return load_task("cb")


SHORT_CB = [  # the two shortest rows of cb/train.jsonl: cheap real training examples
    {"premise": "``Clever''. Klug means ``clever''. Would you say that Abie was clever?",
     "hypothesis": "Abie was clever", "idx": 76, "label": 2},
    {"premise": "B: Oh, well that's good. A: but she really doesn't. Nobody thought she would adjust,",
     "hypothesis": "she would adjust", "idx": 154, "label": 1},
]
