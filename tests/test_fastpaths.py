"""The scorer's fast paths keep every number: batched tokenization, token-budget micro-batches, and the
shared-prefix attention (one stored prefix, log-sum-exp merge) against plain attention and the naive path.
"""

from __future__ import annotations

import json

import pytest
import torch

from harness import attention
from harness.data import few_shot_examples, load_split
from harness.scoring import encode_batch, encode_pair, plan_batches, score_prompts, split_point
from harness.tasks import load_task


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from harness.random_models import tokenizer_folder

    return AutoTokenizer.from_pretrained(str(tokenizer_folder("smollm2-135m")), local_files_only=True)


def test_batched_tokenization_equals_encode_pair(tokenizer):
    items = [("Question: yes or no? Answer: ", ["yes", "no"]), ("A\n\nB\n\nC:", [" True", " False", "x y"]),
             ("trailing  \n", ["a", " b"]), ("", ["only"])]
    for (context, choices), (ctx, conts) in zip(items, encode_batch(tokenizer, items)):
        pairs = [encode_pair(tokenizer, context, c) for c in choices]
        assert ctx == pairs[0][0] and conts == [c for _, c in pairs]


@pytest.mark.parametrize("task_name", ["rte", "cb", "copa", "wic", "wsc"])
def test_demonstrations_head_encoded_once_equals_full_encoding(tokenizer, data_dir, task_name, monkeypatch):
    import harness.tokenization as tokenization

    cuts = []  # the cut of every tokenization pass: the fast path encodes the head once and cuts there
    real = tokenization._encode_items
    monkeypatch.setattr(tokenization, "_encode_items", lambda tok, items, cut, head: cuts.append(cut) or
                        real(tok, items, cut, head))
    task = load_task(task_name)
    for template in task.templates:
        demos = few_shot_examples(task, 1, data_dir, 8)
        prefix = task.demonstrations(template, demos)
        prompts = [task.render(template, ex) for ex in load_split(task, task.eval_split, data_dir)[:12]]
        assert split_point(tokenizer, prefix) > 0  # the fast split applies to SmolLM2's tokenizer
        items = [(prefix + p.context, p.choices) for p in prompts]
        cuts.clear()
        for (context, choices), (ctx, conts) in zip(items, encode_batch(tokenizer, items, shared=prefix)):
            pairs = [encode_pair(tokenizer, context, c) for c in choices]
            assert ctx == pairs[0][0] and conts == [c for _, c in pairs]
        assert cuts == [split_point(tokenizer, prefix)]  # the fast path ran, and was not undone by the fallback


def test_split_point_refuses_special_tokens_and_texts_without_a_safe_cut(tokenizer):
    assert split_point(tokenizer, "no newline at all") == 0
    assert split_point(tokenizer, "a\n") == 0  # nothing after the newline inside the text
    assert split_point(tokenizer, "x<|im_start|>\nAnswer: yes\n\nQ") == 0
    assert split_point(tokenizer, "Answer: yes\n\nPremise") == len("Answer: yes\n")  # "\n" + "\nPremise"
    assert split_point(tokenizer, "Answer: yes\nPremise") == len("Answer: yes\n")


def test_plan_batches_sorts_and_respects_the_budget():
    lengths = [5, 50, 7, 48, 6, 5]
    assert plan_batches(lengths, 2, None) == [[1, 3], [2, 4], [0, 5]]
    # budget 100 tokens: 2 rows of width 50, then short rows while each fills >= 80% of its batch's width
    assert plan_batches(lengths, 1, 100) == [[1, 3], [2, 4], [0, 5]]
    assert plan_batches(lengths, 1, 100, min_fill=0.5) == [[1, 3], [2, 4, 0, 5]]
    assert plan_batches(lengths, 3, 10) == [[1, 3, 2], [4, 0, 5]]


def test_prefix_part_of_valid_positions_is_bit_identical():
    """Right-padded rows: only real positions attend to the prefix (SharedPrefix.valid), with the very same numbers
    as when every position does; padding gets out 0 and lse -inf, and the whole attention keeps the real rows."""
    gen = torch.Generator().manual_seed(0)
    B, Hkv, G, L, P, D = 4, 3, 3, 21, 37, 64
    q = torch.randn(B, Hkv, G, L, D, generator=gen)
    pk, pv = torch.randn(1, Hkv, P, D, generator=gen), torch.randn(1, Hkv, P, D, generator=gen)
    valid = torch.arange(L)[None] < torch.tensor([21, 17, 9, 1])[:, None]  # [B, L]
    out, lse = attention.prefix_part(q, pk, pv, 0.125)
    vout, vlse = attention.prefix_part_valid(q, pk, pv, 0.125, valid)
    sel = valid[:, None, None, :].expand(B, Hkv, G, L)
    assert torch.equal(vout[sel], out[sel]) and torch.equal(vlse[sel], lse[sel])
    assert (vout[~sel] == 0).all() and torch.isneginf(vlse[~sel]).all()
    k, v = torch.randn(B, Hkv, L, D, generator=gen), torch.randn(B, Hkv, L, D, generator=gen)
    query = q.reshape(B, Hkv * G, L, D)
    full, _ = attention.attention_forward(_Layer(), query, k, v, None, shared_prefix=attention.SharedPrefix([pk], [pv]))
    part, _ = attention.attention_forward(_Layer(), query, k, v, None,
                                          shared_prefix=attention.SharedPrefix([pk], [pv], valid=valid))
    assert torch.equal(part[valid], full[valid])  # [B, L, H, D] at the real positions


class _Layer:
    layer_idx, training = 0, False


def _reference(q, pk, pv, k, v, allowed):
    B, H, L, D = q.shape
    G = H // k.shape[1]
    keys = torch.cat([pk.expand(B, -1, -1, -1), k], 2).double().repeat_interleave(G, 1)
    vals = torch.cat([pv.expand(B, -1, -1, -1), v], 2).double().repeat_interleave(G, 1)
    s = q.double() @ keys.transpose(-1, -2) / D ** 0.5
    full = torch.cat([torch.ones(B, L, pk.shape[2], dtype=torch.bool), allowed], -1)
    return torch.softmax(s.masked_fill(~full[:, None], float("-inf")), -1) @ vals


@pytest.mark.parametrize("mask_kind", ["bool", "causal", "float"])
def test_shared_prefix_attention_equals_attention_over_the_concatenation(mask_kind):
    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, L, P, D = 3, 6, 2, 7, 11, 16
    q, k, v = (torch.randn(B, n, L, D, generator=gen) for n in (H, Hkv, Hkv))
    pk, pv = torch.randn(1, Hkv, P, D, generator=gen), torch.randn(1, Hkv, P, D, generator=gen)
    pos = torch.arange(L)
    real = pos[None] >= torch.tensor([0, 3, 6])[:, None] if mask_kind != "causal" else torch.ones(B, L, dtype=bool)
    allowed = (pos[:, None] >= pos[None]) & real[:, None, :]  # [B, L, L]
    mask = {"bool": allowed[:, None], "causal": None,
            "float": torch.zeros(B, 1, L, L).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)}
    out, _ = attention.attention_forward(_Layer(), q, k, v, mask[mask_kind],
                                         shared_prefix=attention.SharedPrefix([pk], [pv]))
    ref = _reference(q, pk, pv, k, v, allowed)
    seen = real[:, None, :, None]  # padded query positions are never read
    assert torch.allclose((out.transpose(1, 2) * seen).double(), ref * seen, atol=1e-5)


def test_cpu_fused_prefix_and_causal_parts_equal_the_explicit_ones():
    """On the CPU the prefix part (and the unmasked own part) run torch's fused CPU attention kernel; it must give
    the explicit computation's output and log-sum-exp."""
    gen = torch.Generator().manual_seed(1)
    Hkv, N, P, D = 3, 37, 300, 16
    q, pk, pv = (torch.randn(1, Hkv, n, D, generator=gen) for n in (N, P, P))
    out, lse = attention._cpu_flash(q, pk, pv, 0.25, causal=False)
    assert out is not None, "the fused CPU attention kernel is unavailable"
    ref_out, ref_lse = attention._explicit_prefix(q[0], pk[0], pv[0], 0.25)
    assert torch.allclose(out[0], ref_out, atol=1e-5) and torch.allclose(lse[0].float(), ref_lse, atol=1e-5)
    B, G, L = 2, 2, 9
    q5 = torch.randn(B, Hkv, G, L, D, generator=gen)
    k, v = torch.randn(B, Hkv, L, D, generator=gen), torch.randn(B, Hkv, L, D, generator=gen)
    fused = attention.own_part(q5, k, v, None, 0.25)
    explicit = attention._own_rows(q5, k, v, None, 0.25)
    assert all(torch.allclose(a.float(), b.float(), atol=1e-5) for a, b in zip(fused, explicit))


def test_context_manager_restores_the_attention_implementation(tmp_path):
    from harness.random_models import build_random_model

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 56, "intermediate_size": 64,
                                "num_hidden_layers": 2, "num_attention_heads": 14, "num_key_value_heads": 2,
                                "vocab_size": 49152, "tie_word_embeddings": True}))
    model, _ = build_random_model(str(path))
    assert attention.supports(model)
    with attention.shared_prefix_attention(model):
        assert model.config._attn_implementation == attention.ATTN_NAME
    assert model.config._attn_implementation == "sdpa"


def _prompts(data_dir, task_name, k, n=6):
    task = load_task(task_name)
    template = task.templates[0]
    prompts = [task.render(template, ex) for ex in load_split(task, task.eval_split, data_dir)[:n]]
    return prompts, task.demonstrations(template, few_shot_examples(task, 0, data_dir, k))


def _max_diff(a, b) -> float:
    return max(abs(x - y) for ea, eb in zip(a.examples, b.examples) for x, y in zip(ea.logprobs, eb.logprobs))


@pytest.mark.slow
@pytest.mark.parametrize("task_name,k", [("cb", 4), ("copa", 8)])
def test_shared_prefix_and_budget_equal_naive_on_real_model(smollm, data_dir, task_name, k):
    prompts, prefix = _prompts(data_dir, task_name, k)
    naive = score_prompts(smollm.model, smollm.tokenizer, prompts, prefix, use_cache=False, batch_size=4)
    shared = score_prompts(smollm.model, smollm.tokenizer, prompts, prefix, batch_size=4, shared_prefix=True)
    assert shared.prefix_tokens > 100
    assert _max_diff(shared, naive) < 1e-4
    # micro-batches by a token budget (several sizes in one call) change nothing either
    budget = score_prompts(smollm.model, smollm.tokenizer, prompts, prefix, batch_size=1, shared_prefix=True,
                           budget=3 * max(len(r.context) - shared.prefix_tokens + 3 for r in shared.rows))
    assert _max_diff(budget, naive) < 1e-4
    assert smollm.model.config._attn_implementation == "sdpa"


@pytest.mark.slow
def test_shared_prefix_equals_naive_on_qwen2_architecture(data_dir, tmp_path):
    """Grouped-query heads (14 / 2) and q/k/v biases, as Qwen2.5; random weights, float32."""
    from harness.random_models import build_random_model

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 112, "intermediate_size": 224,
                                "num_hidden_layers": 3, "num_attention_heads": 14, "num_key_value_heads": 2,
                                "vocab_size": 49152, "tie_word_embeddings": True}))
    model, tok = build_random_model(str(path))
    prompts, prefix = _prompts(data_dir, "rte", 4)
    naive = score_prompts(model, tok, prompts, prefix, use_cache=False, batch_size=3)
    shared = score_prompts(model, tok, prompts, prefix, batch_size=3, shared_prefix=True)
    copied = score_prompts(model, tok, prompts, prefix, batch_size=3, shared_prefix=False)
    assert _max_diff(shared, naive) < 1e-4 and _max_diff(copied, naive) < 1e-4
