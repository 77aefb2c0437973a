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


@pytest.mark.parametrize("variant", ["blocks-static", "blocks-no-trees", "model-static", "blocks-fixed"])
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


@pytest.fixture
def widths_restored(monkeypatch):
    monkeypatch.setattr(training, "width_multiple", training.width_multiple)
    monkeypatch.setattr(packed, "width_multiple", packed.width_multiple)


def test_blocks_fixed_pads_every_step_to_the_longest_row_and_compiles_the_blocks_once(restored, widths_restored,
                                                                                        smollm, data_dir):
    """``blocks-fixed``: every training forward of a pack is exactly :func:`graphs_variants.longest_row` wide (one
    shape, so one CUDA graph per block kind on a GPU), the blocks share at most 2 graphs, and the pack trains as
    the eager pack does (on the CPU ``reduce-overhead`` compiles without CUDA graphs)."""
    import copy

    from torch._dynamo.utils import counters
    from transformers import LlamaConfig, LlamaForCausalLM

    from harness.data import few_shot_examples
    from harness.methods import apply_method, training_settings
    from harness.packed import PackedAdapters, PackMember, group_initial_tensors, train_packed
    from harness.tasks import load_task

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smollm.tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=1024)
    base_model = LlamaForCausalLM(config).eval()
    rte = load_task("rte")
    members = [PackMember(rte, few_shot_examples(rte, seed, data_dir, n=32)[:6], seed) for seed in (0, 1)]
    settings = training_settings("lora", "quick", {"steps": 3, "batch_size": 2, "lr": 3e-2, "warmup_ratio": 0.0})
    longest = graphs_variants.longest_row(smollm.tokenizer, members, settings)
    graphs_variants.install("blocks-fixed")
    graphs_variants.fix_width(longest)
    runs = {}
    for compile_ in ("off", "graphs"):
        counters.clear()
        base = copy.deepcopy(base_model)
        initial = [group_initial_tensors(base, "lora", settings, m.seed) for m in members]
        model = apply_method(base, "lora", settings)
        adapters = PackedAdapters(model, initial)
        widths = []
        hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: widths.append(a[0].shape[1]))
        outcomes = train_packed(model, smollm.tokenizer, adapters, members, settings, method="lora", padding="right",
                                compile=compile_)
        hook.remove()
        runs[compile_] = outcomes
        if compile_ == "graphs":
            assert all(o.compiled for o in outcomes)
            assert widths == [longest] * len(widths), widths  # one shape for every step
            assert 0 < counters["stats"]["unique_graphs"] <= 2, counters["stats"]["unique_graphs"]
        else:
            assert max(widths) <= longest and len(set(widths)) > 1, widths  # eager: each step its own width
    for out, twin in zip(runs["graphs"], runs["off"]):
        assert out.losses == pytest.approx(twin.losses, rel=1e-5, abs=1e-5)
        assert out.losses[0] != out.losses[-1]  # the adapters trained


def test_fix_width_refuses_a_width_below_one(widths_restored):
    with pytest.raises(ValueError, match="width must be >= 1"):
        graphs_variants.fix_width(0)
