"""``benchmarks/graphs_variants.py``: the GPU probe's ways of compiling under CUDA graphs replace the training
loops' ``for_training`` for the ``graphs`` mode only, and leave every other mode to the product."""

from __future__ import annotations

import pytest
import torch

from benchmarks import graphs_variants
from harness import compiling, packed, training


@pytest.fixture
def restored(monkeypatch):
    """The patched names and dynamo/inductor settings are put back after each test."""
    monkeypatch.setattr(training, "for_training", training.for_training)
    monkeypatch.setattr(packed, "for_training", packed.for_training)
    import torch._inductor.config

    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit), \
            torch._inductor.config.patch({"triton.cudagraph_trees": torch._inductor.config.triton.cudagraph_trees}):
        yield


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    return LlamaForCausalLM(config)


def test_unknown_and_product_variants(restored):
    with pytest.raises(ValueError, match="unknown graphs variant 'nope'"):
        graphs_variants.install("nope")
    graphs_variants.install("blocks-dynamic")
    assert training.for_training is compiling.for_training and packed.for_training is compiling.for_training


@pytest.mark.parametrize("variant", ["blocks-static", "blocks-no-trees", "model-static"])
def test_a_variant_replaces_only_the_graphs_mode(restored, variant):
    graphs_variants.install(variant)
    assert training.for_training is packed.for_training is not compiling.for_training
    assert torch._dynamo.config.recompile_limit == graphs_variants.RECOMPILE_LIMIT
    assert torch._inductor.config.triton.cudagraph_trees == (variant != "blocks-no-trees")
    model = _tiny()
    forward, blocks = training.for_training(model, "graphs")
    if variant == "model-static":
        assert forward is not model and blocks == []
    else:
        assert forward is model and blocks == compiling.repeated_blocks(model)
        assert all(b._compiled_call_impl is not None for b in blocks)
        compiling.uncompile_blocks(blocks)
    other = _tiny()  # any other mode is the product's
    assert training.for_training(other, None) == (other, [])
    forward, blocks = training.for_training(other, "blocks")
    assert forward is other and len(blocks) == 2
    compiling.uncompile_blocks(blocks)
