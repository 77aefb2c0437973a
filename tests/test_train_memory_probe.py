"""benchmarks/train_memory_probe.py: attention settings switch and restore; a probe trains and reports its peak."""

from __future__ import annotations

import pytest
import torch

from benchmarks.train_memory_probe import attention_setting, probe
from harness.data import few_shot_examples


@pytest.fixture(scope="module")
def tiny(smollm):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm.tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def test_attention_settings_switch_and_restore(tiny):
    cudnn = torch.backends.cuda.cudnn_sdp_enabled()
    with attention_setting(tiny, "eager"):
        assert tiny.config._attn_implementation == "eager"
    with attention_setting(tiny, "sdpa-no-cudnn"):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert tiny.config._attn_implementation == "sdpa" and torch.backends.cuda.cudnn_sdp_enabled() == cudnn
    with pytest.raises(SystemExit, match="unknown attention setting"):
        with attention_setting(tiny, "flash3"):
            pass


def test_probe_trains_and_records_peak_and_step_time(tiny, smollm, cb, data_dir):
    examples = few_shot_examples(cb, 0, data_dir, n=32)[:4]
    cpu = torch.device("cpu")
    rows = [probe(tiny, smollm.tokenizer, cb, examples, "ia3", s, 2, 0, cpu, p)
            for s, p in (("math", "right"), ("eager", "right"), ("math", "right-causal"))]
    for row in rows:
        assert row["error"] is None and row["peak_gb"] > 0 and row["median_step_s"] > 0
    for row in rows[1:]:  # the same step with another kernel or without the mask
        assert row["loss_last"] == pytest.approx(rows[0]["loss_last"], rel=1e-4)
    assert tiny.config._attn_implementation == "sdpa"
