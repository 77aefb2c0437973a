"""The CUDA token budget is divided among the processes that share the GPU ($HARNESS_GPU_SHARE, set by --workers).

Round 6 of the real-weights grid ran nine Gemma 3 processes side by side on one H200, each sizing its evaluation
batches to a quarter of the memory free when it looked; the GPU ran out (docs/benchmarks.md (d)). No GPU is
needed here: free memory is faked.
"""

from __future__ import annotations

import pytest
import torch

from harness.costs import ModelDims
from harness.errors import HarnessError
from harness.batching import GPU_SHARE_ENV, gpu_share, token_budget


class _Config:
    hidden_size = 64
    intermediate_size = 128


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = _Config()
        self.weight = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))


@pytest.fixture
def fake_cuda(monkeypatch):
    free = 400 * 1024 ** 2  # 400 MiB free: inside the clamp [2048, 65536] for this tiny model, alone and shared
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 8 * free))
    return torch.device("cuda")


def _dims() -> ModelDims:
    return ModelDims(n_layers=2, d_model=64, n_heads=4, head_dim=16, vocab=256, body_params=0, windows=(None, None),
                     total_params=0)


def test_budget_divided_by_processes_sharing_the_gpu(fake_cuda, monkeypatch):
    model = _Model()
    monkeypatch.delenv(GPU_SHARE_ENV, raising=False)
    alone = token_budget(model, _dims(), fake_cuda)
    monkeypatch.setenv(GPU_SHARE_ENV, "4")
    shared = token_budget(model, _dims(), fake_cuda)
    assert gpu_share() == 4
    assert 2048 < shared < alone <= 65536
    assert shared == pytest.approx(alone / 4, rel=1e-3)


def test_budget_none_on_cpu(monkeypatch):
    monkeypatch.setenv(GPU_SHARE_ENV, "4")
    assert token_budget(_Model(), _dims(), torch.device("cpu")) is None


@pytest.mark.parametrize("text", ["0", "-2", "two", "1.5"])
def test_bad_share_is_a_clear_error(monkeypatch, text):
    monkeypatch.setenv(GPU_SHARE_ENV, text)
    with pytest.raises(HarnessError, match=GPU_SHARE_ENV):
        gpu_share()


def test_workers_set_the_share_in_each_worker(monkeypatch):
    from harness import parallel

    monkeypatch.delenv(GPU_SHARE_ENV, raising=False)
    parallel._init_worker(5, None)
    try:
        assert gpu_share() == 5
    finally:
        monkeypatch.delenv(GPU_SHARE_ENV, raising=False)
