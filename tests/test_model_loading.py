"""harness.models.load_model keeps the model's own PyTorch layers: transformers >= 5.2x would otherwise swap layers
for Hub kernels when the `kernels` package is installed (a run-time download, other numerics where the Hub is
reachable, a failed load where `kernels` is missing: round 8 of docs/benchmarks.md (d))."""

from __future__ import annotations


def test_the_embedded_model_loads_without_hub_kernels(smollm):
    assert getattr(smollm.model, "use_kernels", False) is False
