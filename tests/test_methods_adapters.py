"""The bottleneck-adapter methods (adapter, adapter_pfeiffer, compacter) on the real SmolLM2-135M: parameter
counts against the documented formulas, identity at initialisation, a short real training whose saved tensors
reload to the same scores."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from harness.methods import get_method, method_overhead, training_settings, apply_method
from harness.methods.bottleneck import bottleneck_params, phm_params
from harness.spec import RunSpec
from tests.conftest import SHORT_CB

METHODS = ("adapter", "adapter_pfeiffer", "compacter")
L, D = 30, 576  # SmolLM2-135M: layers, hidden size


def expected_params(method: str) -> int:
    if method == "adapter":  # after attention and after the FFN, m = 576 // 16 = 36
        return 2 * L * bottleneck_params(D, 36)
    if method == "adapter_pfeiffer":
        return L * bottleneck_params(D, 36)
    if method == "mam":  # parallel adapter m = 576 // 2 on the FFN + prefix l=30 (keys and values, 3 kv heads x 64)
        return L * bottleneck_params(D, 288) + 30 * L * 2 * 192
    if method == "unipelt":  # gated adapter (m=36, gate d+1) + gated LoRA r=8 on q (576->576), v (576->192) + prefix 10
        return L * (bottleneck_params(D, 36) + D + 1) + L * (8 * (D + D) + 8 * (D + 192) + 2 * (D + 1)) + 10 * L * 384
    m = 20  # 576 // 32 = 18, rounded up to a multiple of n = 4
    return L * (phm_params(D, m, 4) + phm_params(m, D, 4))


def test_registry_imports_no_torch_and_validates():
    code = ("import sys; import harness.methods as M; [M.get_method(n) for n in %r]; "
            "print('torch' in sys.modules)" % (METHODS,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert get_method("adapter").family == "additive" and get_method("compacter").family == "hybrid"
    assert all(get_method(m).artifact == "tensors" and not get_method(m).merges for m in METHODS + ("mam",))
    assert get_method("mam").family == "hybrid" and not get_method("mam").supports_kv_cache
    from harness.errors import HarnessError

    for bad in ({"reduction": 0}, {"nonlinearity": "nope"}, {"size": -1}, {"zero_up": 3}):
        with pytest.raises(HarnessError):
            training_settings("adapter", "quick", {"method_args": bad})
    with pytest.raises(HarnessError):
        training_settings("compacter", "quick", {"method_args": {"n": 0}})


def test_mam_and_unipelt_params_match_formula(smollm):
    settings = training_settings("mam", "quick", {})
    model = apply_method(copy.deepcopy(smollm.model), "mam", settings)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected_params("mam")
    over = method_overhead(model, "mam", settings)
    assert over.per_token == L * 2 * D * 288 * 2 and over.prefix_keys == 30
    settings = training_settings("unipelt", "quick", {})
    model = apply_method(copy.deepcopy(smollm.model), "unipelt", settings)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected_params("unipelt")
    assert method_overhead(model, "unipelt", settings).prefix_keys == 10


def test_params_match_formula_and_zero_up_is_the_identity(smollm):
    import torch

    ids = smollm.tokenizer("Is the sky blue? Answer: yes", return_tensors="pt").input_ids
    with torch.no_grad():
        base = torch.log_softmax(smollm.model(ids).logits, -1)
    for method in METHODS:
        settings = training_settings(method, "quick", {})
        model = apply_method(copy.deepcopy(smollm.model), method, settings)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable == expected_params(method), method
        assert all(".adapter_" in n for n, p in model.named_parameters() if p.requires_grad)
        with torch.no_grad():
            out = torch.log_softmax(model(ids).logits, -1)
        torch.testing.assert_close(out, base, rtol=0, atol=1e-6)
        d, m = D, (20 if method == "compacter" else 36)
        sites = {"adapter": 2 * L}.get(method, L)
        assert method_overhead(model, method, settings).per_token == sites * 2 * d * m * 2
    # a nonzero up-projection (Houlsby's near-identity init, std 1e-2) changes the output: a little on average,
    # though SmolLM2's large hidden activations move some tail log-probs by more than 1
    settings = training_settings("adapter", "quick", {"method_args": {"zero_up": False}})
    model = apply_method(copy.deepcopy(smollm.model), "adapter", settings)
    with torch.no_grad():
        out = torch.log_softmax(model(ids).logits, -1)
    assert 0 < (out - base).abs().mean() < 0.5


# Training, reloading and checkpoint bytes of every method (these included) are tested once, in
# tests/test_every_method.py (3 steps each, the whole registry in ~3 min on the quiet CPU).
