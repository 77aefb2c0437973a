"""Cached scoring of a sliding-window model (Gemma 3's layout, tiny and random) batches queries and stays exact.

Gemma 3's sliding layers count their window in cache slots, so the padding a batch of queries leaves in the cache
would shift it; :func:`harness.batching.plan_window_batches` batches only queries whose slots all lie inside the
first window and scores the others alone. The reference is the naive path one row at a time (no padding at all).
"""

from __future__ import annotations

import pytest
import torch

from harness import scoring
from harness.costs import ModelDims
from harness.data import few_shot_examples, load_split
from harness.scoring import score_prompts
from harness.tasks import load_task

WINDOW = 33  # slots: copa with one demonstration (17 prefix tokens with SmolLM2's tokenizer) needs 27-36: some fit


@pytest.fixture(scope="module")
def tiny_gemma(smollm):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(smollm.tokenizer), hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                              sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
                              max_position_embeddings=1024)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # random weights of a larger scale: attention that is not uniform, so slots matter
        for p in model.parameters():
            p.mul_(8.0) if p.dim() > 1 else None
    return model


@pytest.fixture(scope="module")
def copa_prompts(data_dir):
    task = load_task("copa")
    template = task.templates[0]
    examples = load_split(task, task.eval_split, data_dir)[:16]
    prefixes = {k: task.demonstrations(template, few_shot_examples(task, 0, data_dir, k)) if k else "" for k in (0, 1, 2)}
    return [task.render(template, ex) for ex in examples], prefixes


def _max_diff(a, b) -> float:
    return max(abs(x - y) for ea, eb in zip(a.examples, b.examples) for x, y in zip(ea.logprobs, eb.logprobs))


def test_window_batches_keep_every_slot_inside_the_first_window(tiny_gemma, smollm, copa_prompts):
    prompts, prefixes = copa_prompts
    rows, _ = scoring._tokenize(smollm.tokenizer, prompts, prefixes[1])
    n_prefix = scoring.shared_prefix_len(rows)
    assert n_prefix > 0
    query_lens = [len(r.context) - n_prefix for r in rows]
    choice_lens = [max(len(c) for c in r.continuations) for r in rows]
    batches = scoring.plan_window_batches(query_lens, choice_lens, n_prefix, WINDOW, 4, None)
    assert sorted(i for b in batches for i in b) == list(range(len(rows)))
    assert any(len(b) > 1 for b in batches) and any(len(b) == 1 for b in batches)  # both kinds occur here
    for b in batches:
        if len(b) > 1:
            assert n_prefix + max(len(rows[i].context) - n_prefix for i in b) \
                + max(len(c) for i in b for c in rows[i].continuations) <= WINDOW
    assert any(ModelDims.from_model(tiny_gemma).windows)


@pytest.mark.parametrize("k", [0, 1, 2])  # no prefix: all batched; k=1: some batched, some alone; k=2: all alone
def test_sliding_window_cached_batches_equal_naive(tiny_gemma, smollm, copa_prompts, k):
    prompts, prefixes = copa_prompts
    prefix = prefixes[k]
    naive = score_prompts(tiny_gemma, smollm.tokenizer, prompts, prefix, use_cache=False, batch_size=1)
    cached = score_prompts(tiny_gemma, smollm.tokenizer, prompts, prefix, use_cache=True, batch_size=4)
    assert _max_diff(cached, naive) < 1e-4  # float32 rounding of log-probs near -70
    assert cached.work.tokens < naive.work.tokens  # the cache was used (the context encoded once for its choices)


def test_batches_past_the_window_would_be_wrong(tiny_gemma, smollm, copa_prompts, monkeypatch):
    """The guard is needed: batching every query after a prefix regardless of the window moves the scores."""
    prompts, prefixes = copa_prompts
    naive = score_prompts(tiny_gemma, smollm.tokenizer, prompts, prefixes[1], use_cache=False, batch_size=1)
    monkeypatch.setattr(scoring, "plan_window_batches",
                        lambda query_lens, choice_lens, n_prefix, window, batch_size, budget:
                        scoring.plan_batches([q + c for q, c in zip(query_lens, choice_lens)], batch_size, budget))
    unguarded = score_prompts(tiny_gemma, smollm.tokenizer, prompts, prefixes[1], use_cache=True, batch_size=4)
    assert _max_diff(unguarded, naive) > 1e-3
