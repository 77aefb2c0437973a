"""Shared fixtures: the real data folder (beside the checkout, else the package's embedded copy) and the real
embedded model, loaded once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.data import HUB, builtin_data_dir

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def real_data_dir() -> Path:
    """The real SuperGLUE data: $HARNESS_DATA_DIR when set (as make and CI set it), else ../shared/data beside the
    checkout, else the byte-identical copy shipped in the package (harness/builtin_data), so a fresh clone runs
    every real-data test."""
    env = os.environ.get("HARNESS_DATA_DIR")
    if env and env != HUB:
        return Path(env)
    return DATA_DIR if (DATA_DIR / "cb" / "validation.jsonl").exists() else builtin_data_dir()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    folder = real_data_dir()
    if not (folder / "cb" / "validation.jsonl").exists():
        pytest.fail(f"real SuperGLUE data not found at {folder} (HARNESS_DATA_DIR names a folder without it)")
    return folder


@pytest.fixture(scope="session")
def smollm():
    """SmolLM2-135M in float32 on the CPU (converted from its GGUF once, then ~2 s per load)."""
    from harness.models import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def tiny(smollm):
    """A 2-layer Llama of width 16 with SmolLM2's vocabulary, seeded: training and packing units (one per module)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm.tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def model_signature(model) -> tuple:
    """Cheap evidence of a model's state: its module count (methods inject modules), whether peft wrapped it, the
    sum of its 1-D parameters (norms, biases) and of every 2-D parameter's first row (full fine-tuning moves those)."""
    import torch

    with torch.no_grad():
        vectors = sum(float(p.double().sum()) for p in model.parameters() if p.dim() == 1)
        rows = sum(float(p[0].double().sum()) for p in model.parameters() if p.dim() == 2)
    return sum(1 for _ in model.modules()), hasattr(model, "peft_config"), vectors, rows


@pytest.fixture(scope="session")
def smollm_signature(smollm) -> tuple:
    """:func:`model_signature` of the session's SmolLM2 as loaded."""
    return model_signature(smollm.model)


@pytest.fixture(autouse=True)
def _shared_model_stays_the_base_model(request):
    """A test that trains through ``api.run(..., loader=lambda spec: smollm)`` changes the session's model in
    place (the runner applies the method to the model it is given), and every later test would score a trained
    model. Fail the test that does it."""
    if "smollm" not in request.fixturenames:
        yield
        return
    model, before = request.getfixturevalue("smollm").model, request.getfixturevalue("smollm_signature")
    yield
    assert model_signature(model) == before, \
        "this test changed the shared smollm fixture's model: give api.run a copy (copy.deepcopy(smollm.model))"


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


# ---------------------------------------------------------------- helpers: did training move the model?

def trainable_snapshot(model) -> dict:
    """A copy of every trainable tensor of ``model`` (after a method is applied, before training)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_every_tensor_moved(model, before: dict) -> None:
    """Every trainable tensor of ``model`` differs from its copy in ``before`` (a training step with a nonzero
    learning rate, at least two for LoRA, whose A gets no gradient while B is still zero)."""
    import torch

    now = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert now.keys() == before.keys()
    still = [name for name, p in now.items() if torch.equal(p.detach(), before[name])]
    assert not still, f"{len(still)} of {len(now)} trainable tensors did not move, e.g. {still[:3]}"


def choice_scores(model, tokenizer, prompts, **kwargs):
    """Summed log-probability of every choice of every prompt, [B, C] (no gradient)."""
    import torch

    from harness.training import choice_logprobs

    with torch.no_grad():
        out = choice_logprobs(model, tokenizer, prompts, **kwargs)
    return (out.token_logprobs * out.token_mask).sum(-1)


def assert_scores_moved(trained, base, min_diff: float = 1e-3) -> None:
    """The trained model's choice log-probabilities differ from the base model's by more than ``min_diff``."""
    diff = (trained - base).abs().max().item()
    assert diff > min_diff, f"trained scores are within {diff:.2g} of the base model's"
