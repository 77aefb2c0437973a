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


def test_compile_graphs_is_refused_for_gpu_training_before_any_model_loads(tmp_path, data_dir, monkeypatch):
    """``--compile graphs`` crashed GPU training (a segfault, which no fallback can catch): a GPU training spec
    under it is refused before the loader runs; CPU training, ICL and ``HARNESS_EXPERIMENTAL_GRAPHS=1`` are not."""
    import dataclasses

    import pytest

    from harness.compiling import GRAPHS_ENV
    from harness.errors import HarnessError

    loaded = []

    def loader(spec):
        loaded.append(spec.method)
        raise RuntimeError("no model in this test")

    monkeypatch.delenv(GRAPHS_ENV, raising=False)
    lora = api.plan(["cb"], ["lora"], seeds=[0], templates="all", preset="quick", limit=1, data_dir=data_dir,
                    device="cpu", dtype="float32")[:1]
    icl = api.plan(["cb"], ["zeroshot"], seeds=[0], templates="all", preset="quick", limit=1, data_dir=data_dir,
                   device="cpu", dtype="float32")[:1]
    on_gpu = [dataclasses.replace(s, device="cuda") for s in lora]
    store = tmp_path / "s.sqlite"
    with pytest.raises(HarnessError, match="--compile graphs crashes GPU training.*use --compile on"):
        api.run(on_gpu, store=store, data_dir=data_dir, progress=False, loader=loader, compile="graphs")
    assert not loaded and not Store(store).runs()

    def goes_on(specs, compile_):  # not refused: the run goes on to load its model (on this CPU-only machine a
        loaded.clear()  # GPU spec stops there at "no GPU")
        try:
            api.run(specs, store=store, data_dir=data_dir, progress=False, loader=loader, compile=compile_)
        except HarnessError as error:
            assert "torch sees no GPU" in str(error)
        except RuntimeError:  # the loader's, raised through (ICL) rather than stored as a failed run (PEFT)
            assert loaded
        else:
            assert loaded

    goes_on(on_gpu, "on")
    goes_on(lora, "graphs")
    goes_on([dataclasses.replace(s, device="cuda") for s in icl], "graphs")
    monkeypatch.setenv(GRAPHS_ENV, "1")
    goes_on(on_gpu, "graphs")
