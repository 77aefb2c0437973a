"""Random-initialised models (``--model random:NAME``): names, real dimensions, seeding, tokenizer, the store flag.

The named architectures' parameter counts are checked on the meta device (no memory, no weights); full builds use
a tiny config file so they take well under a second.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from harness.cli import main
from harness.errors import HarnessError
from harness.random_models import RANDOM_NAMES, build_random_model, check_random_name, load_config
from harness.store import Store

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152, "max_position_embeddings": 4096,
        "tie_word_embeddings": True}


@pytest.fixture()
def tiny_config(tmp_path):
    path = tmp_path / "tiny" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(TINY))
    return path


def test_known_names_pass_and_typos_suggest():
    for name in RANDOM_NAMES:
        check_random_name(name)
    with pytest.raises(HarnessError, match="Did you mean 'llama-1b'"):
        check_random_name("lama-1b")
    with pytest.raises(HarnessError, match="no config file"):
        check_random_name("/no/such/config.json")
    with pytest.raises(HarnessError, match="needs an architecture"):
        check_random_name("")


@pytest.mark.parametrize("name,params,vocab,layers", [
    ("smollm2-135m", 134_515_008, 49152, 30),
    ("llama-1b", 1_235_814_400, 128256, 16),  # Llama-3.2-1B: 1.24B parameters, tied embeddings
    ("qwen2.5-0.5b", 494_032_768, 151936, 24),  # Qwen2.5-0.5B: 0.49B parameters, tied embeddings
])
def test_named_architectures_have_the_published_sizes(name, params, vocab, layers):
    from transformers import AutoModelForCausalLM

    cfg = load_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) == params
    assert cfg.vocab_size == vocab and cfg.num_hidden_layers == layers and cfg.tie_word_embeddings


def test_build_is_seeded_uses_sdpa_and_leaves_the_callers_rng_alone(tiny_config):
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a, tok = build_random_model(str(tiny_config), torch.float32)
    assert torch.rand(1) == before  # the caller's random stream is untouched
    b, _ = build_random_model(str(tiny_config), torch.float32)
    c, _ = build_random_model(str(tiny_config), torch.float32, seed=1)
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.config._attn_implementation == "sdpa"
    assert len(tok) == 49152 and tok.pad_token_id is not None  # SmolLM2's real tokenizer


def test_vocab_smaller_than_the_tokenizer_is_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY | {"vocab_size": 1000}))
    with pytest.raises(HarnessError, match="tokenizer has 49152 tokens"):
        build_random_model(str(path))


def test_load_model_marks_random(tiny_config):
    from harness.models import load_model

    lm = load_model(f"random:{tiny_config}", "cpu", "float32")
    assert lm.is_random and lm.dtype == torch.float32
    out = lm.model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert out.shape == (1, 3, 49152)


def test_cli_rejects_unknown_random_name():
    result = CliRunner().invoke(main, ["run", "--methods", "icl", "--tasks", "cb", "--model", "random:qwen-0.5b"])
    assert result.exit_code == 2
    assert "random-model architecture" in result.output


@pytest.mark.slow
def test_random_runs_are_stored_as_random(tmp_path, tiny_config, data_dir):
    store = tmp_path / "s.sqlite"
    args = ["run", "--methods", "icl", "--tasks", "cb", "--seeds", "0", "--templates", "gpt3_style", "--k", "2",
            "--limit", "3", "--model", f"random:{tiny_config}", "--device", "cpu", "--store", str(store),
            "--data-dir", str(data_dir), "--quiet"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    runs = Store(store).runs()
    assert len(runs) == 1 and runs[0]["is_random"] and runs[0]["status"] == "finished"
    assert Store(store).runs(include_random=False) == []
