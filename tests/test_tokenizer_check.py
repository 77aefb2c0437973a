"""harness.tokenizer_check: a tokenizer that splits text per character (transformers 5.17's Gemma 3 GGUF
conversion) is refused when the model loads; real subword tokenizers pass."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from harness.errors import HarnessError
from harness.tokenizer_check import PROBE, check_tokenizer, tokens_per_char


class CharTokenizer:
    """What the broken conversion does: one token per character."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


def test_the_embedded_tokenizer_passes(smollm):
    assert tokens_per_char(smollm.tokenizer) < 0.3
    check_tokenizer(smollm.tokenizer, "smollm2-135m")


def test_a_per_character_tokenizer_is_refused_with_the_fix():
    assert tokens_per_char(CharTokenizer()) == 1.0
    with pytest.raises(HarnessError, match="1.00 tokens per character.*transformers.*converted copy"):
        check_tokenizer(CharTokenizer(), "gemma3-270m")
    assert len(PROBE) > 60


def test_a_byte_level_model_by_design_passes_when_allowed(monkeypatch):
    monkeypatch.setenv("HARNESS_ALLOW_CHAR_TOKENIZER", "1")
    check_tokenizer(CharTokenizer(), "google/byt5-small")


def test_load_model_refuses_it(monkeypatch):
    import transformers

    from harness.models import load_model

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: CharTokenizer())
    loads = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a))
    with pytest.raises(HarnessError, match="model 'smollm2-135m': its tokenizer splits"):
        load_model("smollm2-135m", "cpu", "float32")
    assert loads == []  # refused before the weights load


def test_the_fingerprint_tells_tokenizations_apart(smollm):
    from harness.tokenizer_check import tokenizer_fingerprint

    class CharTokenizerWithVocab(CharTokenizer):
        def __len__(self):
            return len(smollm.tokenizer)  # same vocabulary size: only the tokenization differs

    real = tokenizer_fingerprint(smollm.tokenizer)
    assert len(real) == 16 and real == tokenizer_fingerprint(smollm.tokenizer)
    assert tokenizer_fingerprint(CharTokenizerWithVocab()) != real


def test_every_run_records_its_tokenizers_fingerprint(tmp_path, data_dir, smollm):
    """ICL and trained runs store env["tokenizer"]: results_sanity lists the fingerprints per model, so two runs of
    one model tokenized differently (the same run id: round 7) are visible."""
    from harness import api
    from harness.store import Store
    from harness.tokenizer_check import tokenizer_fingerprint

    specs = api.plan(["cb"], ["zeroshot", "ia3"], seeds=[0], templates=["gpt3_style"], preset="quick", limit=1,
                     train_overrides={"steps": 1}, data_dir=data_dir, device="cpu", dtype="float32")
    results = api.run(specs, store=tmp_path / "s.sqlite", data_dir=data_dir, progress=False,
                      loader=lambda spec: dataclasses.replace(smollm, model=copy.deepcopy(smollm.model)))
    assert [r.status for r in results] == ["finished"] * len(specs) and len(specs) == 2
    expected = tokenizer_fingerprint(smollm.tokenizer)
    assert {r["method"]: r["env"]["tokenizer"] for r in Store(tmp_path / "s.sqlite").runs()} == \
        {"zeroshot": expected, "ia3": expected}
