"""The Python API's run loop: what it records once per model rather than once per run."""

from __future__ import annotations

from harness import api, environment
from harness.store import Store


def test_environment_is_described_once_per_model(tmp_path, data_dir, smollm, monkeypatch):
    calls = []
    real = environment.describe
    monkeypatch.setattr(environment, "describe", lambda device: calls.append(device) or real(device))
    specs = api.plan(["cb"], ["zeroshot"], seeds=[0], templates="all", preset="quick", limit=1, data_dir=data_dir,
                     device="cpu", dtype="float32")
    assert len(specs) >= 2
    results = api.run(specs, store=tmp_path / "s.sqlite", data_dir=data_dir, progress=False,
                      loader=lambda spec: smollm)
    assert [r.status for r in results] == ["finished"] * len(specs)
    assert len(calls) == 1  # describe() runs git twice: not once per run
    stored = Store(tmp_path / "s.sqlite").runs()
    assert len(stored) == len(specs) and all(r["env"]["packages"] == stored[0]["env"]["packages"] for r in stored)
