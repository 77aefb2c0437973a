"""The peft-backed built-in methods of issue 13 (dora, adalora, vera, lokr, oft, qlora): trainable-parameter
counts on the real SmolLM2-135M against each module's documented formula, a short real training whose adapter
reloads to the same scores, and qlora's refusal where bitsandbytes cannot quantize before any model loads."""

from __future__ import annotations

import copy
import json

import pytest

from harness.errors import HarnessError
from harness.methods import apply_method, get_method, method_overhead, training_settings
from harness.spec import RunSpec
from tests.conftest import SHORT_CB

LAYERS = 30
Q, K, V, O = (576, 576), (576, 192), (576, 192), (576, 576)  # (d_in, d_out) of SmolLM2-135M
GATE = UP = (576, 1536)
DOWN = (1536, 576)
ALL = (Q, K, V, O, GATE, UP, DOWN)


def _lokr(d_in, d_out, r=8):
    from peft.tuners.lokr.layer import factorization

    u1, u2 = factorization(d_out, -1)
    v1, v2 = factorization(d_in, -1)
    w2 = r * (u2 + v2) if r < max(u2, v2) / 2 else u2 * v2
    return u1 * v1 + w2


EXPECTED = {  # each module docstring's formula
    "dora": LAYERS * sum(8 * (i + o) + o for i, o in (Q, V)),
    "adalora": LAYERS * sum(12 * (i + o + 1) for i, o in ALL),
    "vera": LAYERS * sum(256 + o for _, o in (Q, V)),
    "lokr": LAYERS * sum(_lokr(i, o) for i, o in (Q, V)),
    "oft": LAYERS * sum((i // 32) * 32 * 31 // 2 for i, _ in (Q, V)),
}
DOCUMENTED = {"dora": 483_840, "adalora": 3_665_880, "vera": 38_400, "lokr": 47_040, "oft": 535_680}


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_trainable_parameters_match_the_documented_formula(smollm, method):
    settings = training_settings(method, "quick", {"steps": 3})
    model = apply_method(copy.deepcopy(smollm.model), method, settings)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == EXPECTED[method] == DOCUMENTED[method]
    assert method_overhead(model, method, settings).per_token > 0
    info = get_method(method)
    assert info.family == "reparametrization" and info.merges and info.artifact == "peft"


def test_registry_imports_no_torch_or_peft():
    import subprocess
    import sys

    code = ("import sys, harness.methods as m; m.get_method('qlora'); "
            "assert 'torch' not in sys.modules and 'peft' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_qlora_refused_on_cpu_without_bitsandbytes_cpu_kernels_before_any_model_loads(monkeypatch):
    import harness.models
    from harness.api import plan

    monkeypatch.setattr(harness.models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(harness.models, "bitsandbytes_cpu_4bit", lambda: False)  # an older bitsandbytes
    with pytest.raises(HarnessError, match="cannot quantize to 4-bit NF4 on the CPU.*--device cuda"):
        plan(["cb"], ["qlora"], seeds=[0], preset="quick", device="cpu", limit=2)
    info = get_method("qlora")
    assert info.quantize == "nf4" and not info.merges
    assert training_settings("qlora", "paper", {})["r"] == 64
    from harness.models import check_quantize

    with pytest.raises(HarnessError, match="needs a CUDA device or the CPU.*--device cuda"):
        check_quantize("nf4", "mps", "qlora")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(HarnessError, match="pip install 'bitsandbytes>=0.50'"):
        check_quantize("nf4", "cuda", "qlora")


def test_qlora_planned_on_cpu_where_bitsandbytes_has_cpu_kernels():
    """bitsandbytes 0.50.2 (the qlora extra) quantizes NF4 on the CPU: plan accepts qlora there; it trains in
    tests/test_every_method.py."""
    pytest.importorskip("bitsandbytes")
    from harness.api import plan
    from harness.models import bitsandbytes_cpu_4bit

    if not bitsandbytes_cpu_4bit():
        pytest.skip("the installed bitsandbytes has no CPU 4-bit kernels")
    runs = plan(["cb"], ["qlora"], seeds=[0], preset="quick", device="cpu", limit=2)
    assert runs and all(r.method == "qlora" for r in runs)


def test_qlora_on_a_random_model_is_refused_at_plan_time(monkeypatch, tmp_path):
    """A random: model has no weights to quantize: one line naming the fix from the CLI, exit 2, nothing loaded and
    nothing stored (it used to fail at load time, leaving a failed run in the store)."""
    from click.testing import CliRunner

    import harness.models
    from harness.cli import main

    monkeypatch.setattr(harness.models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    store = tmp_path / "s.sqlite"
    result = CliRunner().invoke(main, ["run", "--methods", "qlora", "--tasks", "cb", "--model", "random:t5-small",
                                       "--limit", "2", "--preset", "quick", "--store", str(store)])
    assert result.exit_code == 2
    assert "qlora quantizes a model's real weights" in result.output and "use lora" in result.output
    assert not store.exists()


def test_adalora_rejects_a_schedule_longer_than_the_run():
    with pytest.raises(HarnessError, match="must exceed tinit"):
        training_settings("adalora", "quick", {"method_args": "tinit=2,tfinal=2,total_step=3"})
    with pytest.raises(HarnessError, match="target_r"):
        training_settings("adalora", "quick", {"method_args": "target_r=16"})


# Training, reloading and checkpoint bytes of every method (these included) are tested once, in
# tests/test_every_method.py (3 steps each, the whole registry in ~3 min on the quiet CPU).


def test_a_4bit_base_counts_the_parameters_it_stands_for(smollm):
    """bitsandbytes packs two 4-bit weights per byte: the FLOPs formulas and total_params use the matrix shapes, so a
    qlora run's FLOPs per example equal lora's base FLOPs, not half of them."""
    pytest.importorskip("bitsandbytes")
    from harness.costs import ModelDims
    from harness.models import bitsandbytes_cpu_4bit, load_model
    from harness.peft_runner import count_params

    if not bitsandbytes_cpu_4bit():
        pytest.skip("the installed bitsandbytes has no CPU 4-bit kernels")
    quantized = load_model("smollm2-135m", device="cpu", dtype="float32", quantize="nf4").model
    assert any(type(p).__name__ == "Params4bit" for p in quantized.parameters())
    assert ModelDims.from_model(quantized) == ModelDims.from_model(smollm.model)
    assert count_params(quantized)[1] == count_params(smollm.model)[1]
    from harness.methods.qlora import QloraArgs, overhead, trainable_params

    cfg = QloraArgs()  # the adapter's inference overhead and size from the 4-bit layers' shapes, as from the float ones
    assert overhead(quantized, cfg).per_token == overhead(smollm.model, cfg).per_token == 2 * 19_537_920
    assert trainable_params(quantized, cfg) == trainable_params(smollm.model, cfg) == 19_537_920
