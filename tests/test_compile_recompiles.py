"""Issue 14: a compiled training step compiles once; after warm-up no step traces a new graph.

A tiny random llama (4 layers, hidden 64, SmolLM2's tokenizer) with LoRA applied by the harness runs the harness's
own step (:func:`harness.training.training_step` around :func:`harness.training._forward_backward`, the choice
loss path of :func:`harness.training.train`, and the causal-LM path of ``benchmarks/train_throughput.py``'s
synthetic kinds) under the ``--compile`` modes, on batches of different sequence lengths. Dynamo's counters must
not move after the warm-up steps, and compiled blocks must share one graph (not one per layer: with a KV cache in
the forward, each block's graph was guarded on its layer's cache entry, ``cache.layers[i]``, and past 8 layers
the blocks hit dynamo's recompile limit).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from harness.compiling import compile_mode, for_training, uncompile_blocks
from harness.costs import ModelDims
from harness.master_weights import MasterWeights
from harness.methods import apply_method, method_overhead, training_settings
from harness.scoring import encode_pair
from harness.templates import Prompt
from harness.training import _forward_backward, make_optimizer, training_forward, training_step

LAYERS = 4
WORDS = "the cat sat on a mat while it rained and nobody came to see what happened next in town".split()


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from harness.random_models import TOKENIZER_NAME, tokenizer_folder

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder(TOKENIZER_NAME)), local_files_only=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval(), tokenizer


def prompts(step: int) -> list[Prompt]:
    """Two prompts whose lengths change from step to step (the dynamic sequence dimension)."""
    n = 3 + 2 * step
    return [Prompt(" ".join(WORDS[i:i + n + k]), (" yes", " no way"), k % 2, f"{step}-{k}") for i, k in ((0, 0), (1, 1))]


def graphs() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["recompiles"].values())


def run(tiny, how: str, path: str, warmup: int = 2, steps: int = 3) -> tuple[list[tuple[int, int]], list[float]]:
    """Dynamo's (unique graphs, recompiles) after each step, and the losses."""
    model, tokenizer = tiny
    settings = training_settings("lora", "quick", {"steps": warmup + steps, "batch_size": 2, "lr": 1e-2})
    model = apply_method(copy.deepcopy(model), "lora", settings)
    model.train()
    masters = MasterWeights([p for p in model.parameters() if p.requires_grad])
    optimizer = make_optimizer(masters.params, settings)
    forward_model, blocks = for_training(model, compile_mode(how))
    dims, overhead = ModelDims.from_model(model), method_overhead(model, "lora", settings)
    encode = functools.cache(lambda context, choice: encode_pair(tokenizer, context, choice))
    gen = torch.Generator().manual_seed(0)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    seen, losses = [], []
    try:
        for step in range(warmup + steps):
            if path.startswith("choices"):  # train()'s forward and loss ("choices-right": CUDA's right padding,
                right = path == "choices-right"  # the LM head on each row's own positions through a pre-hook)

                def backward():
                    return _forward_backward(forward_model, tokenizer, prompts(step), 2, settings, dims, overhead,
                                             right, encode, logit_index=right)
            else:  # the benchmark's synthetic step: causal-LM loss on random tokens
                x = torch.randint(0, 1000, (2, 6 + 5 * step), generator=gen)

                def backward():
                    loss = training_forward(forward_model, input_ids=x, labels=x).loss
                    loss.backward()
                    return loss.detach().float().reshape(1, 1), [1.0]

            _, loss, _ = training_step(backward, optimizer, masters, settings, step)
            losses.append(loss)
            seen.append(graphs())
    finally:
        uncompile_blocks(blocks)
        torch._dynamo.reset()
    return seen, losses


@pytest.mark.slow
@pytest.mark.parametrize("how, path", [("on", "choices"), ("on", "lm"), ("model", "choices"),
                                       ("model", "choices-right")])
def test_compiled_step_does_not_recompile_after_warmup(tiny, how, path):
    warmup = 2
    seen, losses = run(tiny, how, path, warmup=warmup)
    assert seen[0][0] >= 1, "dynamo captured no graph"
    assert seen[warmup:] == [seen[warmup - 1]] * (len(seen) - warmup), f"new graphs after warm-up: {seen}"
    if how == "on":  # the blocks share their graphs (2 on the CPU here, for any depth), not one per layer
        assert seen[-1][0] < LAYERS, f"compiled blocks traced {seen[-1][0]} graphs for {LAYERS} layers"
    assert all(loss == loss for loss in losses)


def test_training_forward_turns_the_cache_off():
    calls = []

    def model(**kwargs):
        calls.append(kwargs)

    training_forward(model, input_ids=1)
    assert calls == [{"input_ids": 1, "use_cache": False}]


def test_a_compile_that_hits_the_recompile_limit_trains_eagerly_and_says_so(tiny, data_dir, caplog):
    """Per-layer guards (each block's hook closing over its own int, as packs' hooks once did) make every block
    compile its own graph; past dynamo's recompile limit the rest would run eagerly while the run said compiled.
    The first step now raises there, and training's compiler-failure fallback trains eagerly with a warning and
    ``compiled`` false. (The limit lowered to 2 here: 4 layers then pass it as SmolLM2's 30 pass the default 8.)"""
    import logging

    from harness.data import few_shot_examples
    from harness.tasks import load_task
    from harness.training import train

    model, tokenizer = tiny
    task = load_task("cb")
    examples = few_shot_examples(task, 0, data_dir, n=32)[:4]
    settings = training_settings("lora", "quick", {"steps": 2, "batch_size": 2, "lr": 1e-2})
    peft_model = apply_method(copy.deepcopy(model), "lora", settings)
    hooks = []
    for layer, block in enumerate(peft_model.base_model.model.model.layers):
        ones = [layer + 1]  # a closure int, guarded by value: each block's graph is its own

        def scale(module, args, out, ones=ones):
            return out * (ones[0] // ones[0])
        hooks.append(block.mlp.register_forward_hook(scale))
    torch._dynamo.reset()
    try:
        with caplog.at_level(logging.WARNING), torch._dynamo.config.patch(recompile_limit=2):
            stats = train(peft_model, tokenizer, examples, task, settings, 0, method="lora", compile="on",
                          progress=False)
    finally:
        for hook in hooks:
            hook.remove()
        torch._dynamo.reset()
    # (without the planted hooks the same training compiles: test_training's test_compiled_training_matches_eager)
    assert (stats.compiled, stats.steps) == (False, 2)
    assert "torch.compile failed (FailOnRecompileLimitHit: the blocks cannot share a graph" in caplog.text


def test_a_method_whose_blocks_cannot_share_a_graph_trains_eagerly_without_compiling(tiny, data_dir, caplog):
    """The prefix family reads its layer's entry of the prefix cache (a graph per layer under compiled blocks: on
    SmolLM2's 30 layers 8 compiles, then the limit and the fallback): its ``shares_block_graph`` is False and
    ``--compile on`` trains it eagerly at once, with a warning, compiling nothing."""
    import logging

    from torch._dynamo.utils import counters

    from harness.data import few_shot_examples
    from harness.methods import get_method
    from harness.tasks import load_task
    from harness.training import train

    method = "prefix_tuning"
    assert [m for m in ("prefix_tuning", "peft:prefix_tuning", "mam", "unipelt", "intrinsic_said", "lora", "ia3",
                        "peft:prompt_tuning") if not get_method(m).shares_block_graph] == [
        "prefix_tuning", "peft:prefix_tuning", "mam", "unipelt", "intrinsic_said"]
    model, tokenizer = tiny
    task = load_task("cb")
    settings = training_settings(method, "quick", {"steps": 2, "batch_size": 2, "lr": 1e-2})
    peft_model = apply_method(copy.deepcopy(model), method, settings)
    torch._dynamo.reset()
    counters.clear()
    with caplog.at_level(logging.WARNING):
        stats = train(peft_model, tokenizer, few_shot_examples(task, 0, data_dir, n=32)[:4], task, settings, 0,
                      method=method, compile="on", progress=False)
    assert (stats.compiled, stats.steps) == (False, 2)
    assert f"{method}: its blocks cannot share a compiled graph" in caplog.text
    assert counters["frames"]["ok"] == 0, dict(counters["frames"])


def test_a_compile_failure_without_a_message_says_where_it_was_raised():
    """A bare ``assert`` in the compiler (the H100's ``blocks-no-trees`` graphs, session 37, warned "AssertionError: "
    and nothing else): the fallback's warning names the innermost frame instead."""
    from harness.compiling import compile_failure

    def compiler_internals():
        raise AssertionError  # what a bare ``assert`` raises outside pytest's rewritten modules

    try:
        compiler_internals()
    except AssertionError as exc:
        line = compile_failure(exc)
    assert line.startswith("AssertionError: raised at tests/test_compile_recompiles.py:")
    assert line.endswith("in compiler_internals")
    assert compile_failure(RuntimeError("first\nsecond")) == "RuntimeError: first"
