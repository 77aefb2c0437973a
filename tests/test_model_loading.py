"""harness.models.load_model keeps the model's own PyTorch layers: transformers >= 5.2x would otherwise swap layers
for Hub kernels when the `kernels` package is installed (a run-time download, other numerics where the Hub is
reachable, a failed load where `kernels` is missing: round 8 of docs/benchmarks.md (d))."""

from __future__ import annotations


def test_the_embedded_model_loads_without_hub_kernels(smollm):
    assert getattr(smollm.model, "use_kernels", False) is False


def test_the_gguf_conversion_loads_without_hub_kernels(tmp_path, monkeypatch):
    """The one from_pretrained outside harness.models (the GGUF -> safetensors conversion) passes use_kernels=False
    too; a stand-in loader records its arguments and stops the conversion (no weights are read)."""
    import pytest
    import transformers

    from harness.errors import HarnessError
    from harness.model_files import converted_folder

    seen = {}

    class Stop(Exception):
        pass

    def fake_model(*args, **kwargs):
        seen.update(kwargs)
        raise Stop("recorded")

    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: object())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(HarnessError, match="recorded"):
        converted_folder(gguf)
    assert seen.get("use_kernels") is False
    assert not list((tmp_path / "cache" / "converted").iterdir())  # the failed conversion left nothing behind
