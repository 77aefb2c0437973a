"""FishMask: the mask is the top keep_ratio of the empirical Fisher, only masked entries change, the Fisher's
FLOPs are counted, and the config is validated."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import SHORT_CB
from harness.errors import HarnessError
from harness.methods import apply_method, get_method, training_settings


def test_fishmask_config_is_validated():
    with pytest.raises(HarnessError, match="keep_ratio"):
        training_settings("fishmask", "quick", {"method_args": "keep_ratio=0"})
    with pytest.raises(HarnessError, match="fisher_examples"):
        training_settings("fishmask", "quick", {"method_args": "fisher_examples=0"})
    info = get_method("fishmask")
    assert info.family == "selective" and info.merges and not info.mixed_batches and info.artifact == "tensors"


@pytest.mark.slow
def test_only_the_masked_entries_train_and_the_fisher_work_is_returned(smollm, cb):
    from harness.methods.fishmask import trainable_params
    from harness.methods import method_config
    from harness.training import train

    settings = training_settings("fishmask", "quick", {"steps": 2, "batch_size": 1, "n_train": 2, "lr": 1e-2,
                                                       "warmup_ratio": 0.0, "train_template": "gpt3_style",
                                                       "method_args": "keep_ratio=0.0001"})
    base = smollm.model
    model = apply_method(copy.deepcopy(base), "fishmask", settings)
    assert not any(p.requires_grad for p in model.parameters())
    work = get_method("fishmask").prepare(model, smollm.tokenizer, SHORT_CB, cb, settings, 0)
    assert work.tokens > 0  # the Fisher's forwards, for train_flops
    values = [p for n, p in model.named_parameters() if p.requires_grad]
    assert sum(p.numel() for p in values) == trainable_params(base, method_config("fishmask", settings))
    train(model, smollm.tokenizer, SHORT_CB, cb, settings, seed=0, method="fishmask")
    changed = 0
    base_params = dict(base.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, module in model.named_modules():
            if not hasattr(module, "parametrizations"):
                continue
            for attr, plist in module.parametrizations.items():
                diff = (getattr(module, attr) - base_params[f"{name}.{attr}"]).reshape(-1)
                index = set(plist[0].saved_index.tolist())
                moved = set(torch.nonzero(diff).flatten().tolist())
                assert moved <= index  # nothing outside the mask moves
                changed += len(moved)
    assert 0 < changed


@pytest.mark.parametrize("tied", [True, False])
def test_a_masked_vocabulary_matrix_counts_its_masked_entries_not_the_matrix(tied):
    """costs.trainable_vocab_params once counted a parametrized embedding as a whole trainable matrix (its computed
    weight requires grad): train_flops then subtracted the 28M-entry matrix from a ~270k-parameter mask and added
    its output-projection gradient at every projected position. A tiny llama with tied or untied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from harness import costs
    from harness.methods.fishmask import _attach, _owners

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    dims_before = costs.ModelDims.from_model(model)
    for p in model.parameters():
        p.requires_grad_(False)
    owners = _owners(model)
    _attach(model, model.get_input_embeddings().weight, torch.arange(5), owners)
    if not tied:
        _attach(model, model.get_output_embeddings().weight, torch.arange(7), owners)
    assert model.get_input_embeddings().weight.requires_grad  # the computed weight: what misled the count
    assert costs.trainable_vocab_params(model) == ((0, 5) if tied else (5, 7))
    # the matrices are subtracted once each (not a computed copy as a second, untied matrix); the mask's values
    # stay in N_body, as any method's added parameters
    assert costs.ModelDims.from_model(model).body_params == dims_before.body_params + (5 if tied else 12)
