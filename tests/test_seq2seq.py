"""Encoder-decoder backbones (issue 17: T5 / T0 / Flan-T5): model kind, rank classification with the encoder run
once per query (== the naive path), PEFT training steps, FLOPs, and a CLI run, on a tiny random T5."""

from __future__ import annotations

import json
import math

import pytest
import torch

from harness.costs import ModelDims
from harness.models import is_seq2seq, load_model
from harness.scoring import score_prompts
from harness.templates import Prompt

TINY_T5 = {"model_type": "t5", "is_encoder_decoder": True, "d_model": 64, "d_kv": 16, "num_heads": 4, "d_ff": 128,
           "num_layers": 2, "num_decoder_layers": 2, "vocab_size": 32128, "feed_forward_proj": "gated-gelu",
           "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
           "relative_attention_num_buckets": 32, "dropout_rate": 0.0}


@pytest.fixture(scope="module")
def tiny_t5_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5") / "config.json"
    path.write_text(json.dumps(TINY_T5))
    return path


@pytest.fixture(scope="module")
def tiny_t5(tiny_t5_config):
    return load_model(f"random:{tiny_t5_config}", "cpu", "float32")


PROMPTS = [
    Prompt("Premise: the cat sat.\nQuestion: did it sit? Answer:", (" yes", " no", " maybe not"), 0, "a"),
    Prompt("Premise: a long day at the office went by slowly.\nQuestion: was it quick?", (" true", " false"), 1, "b"),
    Prompt("Q: two plus two?", (" four", " five and more", " three"), 0, "c"),
]


def test_model_kind_is_detected(tiny_t5, tmp_path):
    assert is_seq2seq(tiny_t5.model) and type(tiny_t5.model).__name__ == "T5ForConditionalGeneration"
    tiny_t5.model.save_pretrained(tmp_path)
    tiny_t5.tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), "cpu", "float32")  # a local folder: the kind comes from its config
    assert is_seq2seq(lm.model) and type(lm.model).__name__ == "T5ForConditionalGeneration"
    assert len(tiny_t5.tokenizer) == 32128  # the cut SmolLM2 BPE fallback, T5's vocabulary size


@pytest.mark.parametrize("prefix", ["", "Premise: demo.\nQuestion: ok? Answer: yes\n\n"])
def test_shared_encoder_equals_naive(tiny_t5, prefix):
    lm = tiny_t5
    shared = score_prompts(lm.model, lm.tokenizer, PROMPTS, prefix, use_cache=True, batch_size=2)
    naive = score_prompts(lm.model, lm.tokenizer, PROMPTS, prefix, use_cache=False, batch_size=3)
    diff = max(abs(a - b) for x, y in zip(shared.examples, naive.examples) for a, b in zip(x.logprobs, y.logprobs))
    print(f"max |shared - naive| = {diff:.3g}")
    assert diff < 1e-4
    assert shared.work.tokens < naive.work.tokens  # the prompt is encoded once per query, not per choice
    # a choice's score is the sum of its tokens' log-probs under teacher forcing: check one by hand
    row = shared.rows[0]
    ids = torch.tensor([row.context])
    c = row.continuations[1]
    dec = torch.tensor([[0] + c[:-1]])
    with torch.no_grad():
        lp = torch.log_softmax(lm.model(input_ids=ids, decoder_input_ids=dec).logits[0], -1)
    by_hand = sum(lp[t, tok].item() for t, tok in enumerate(c))
    assert abs(by_hand - shared.examples[0].logprobs[1]) < 1e-4
    assert shared.examples[0].n_tokens[1] == len(c)


@pytest.mark.parametrize("method", ["lora", "ia3", "tfew", "prompt_tuning"])
def test_peft_training_step_on_t5(tiny_t5_config, cb, method):
    from harness.methods import apply_method, training_settings
    from harness.random_models import build_random_model
    from harness.training import train
    from tests.conftest import SHORT_CB, assert_every_tensor_moved, trainable_snapshot

    model, tok = build_random_model(str(tiny_t5_config), torch.float32, device="cpu")
    settings = training_settings(method, "quick", {"steps": 3, "batch_size": 2, "n_train": 2, "warmup_ratio": 0.0,
                                                   "train_template": "gpt3_style"})
    model = apply_method(model, method, settings)
    assert type(model).__name__ == "PeftModelForSeq2SeqLM"
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if method == "ia3" or method == "tfew":  # T-Few: k, v and the feed-forward (wo's input = wi_1's output)
        assert {n.split(".")[-3] for n in names} == {"k", "v", "wo"}
        ff = [p for n, p in model.named_parameters() if p.requires_grad and ".wo." in n]
        assert all(p.shape == (1, 128) for p in ff)  # wo's input (d_ff) scaled, not its output
    if method == "lora":
        assert {n.split(".")[-4] for n in names} == {"q", "v"}
    before = trainable_snapshot(model)
    stats = train(model, tok, SHORT_CB, cb, settings, seed=0, method=method)
    assert stats.steps == 3 and all(torch.isfinite(torch.tensor(stats.losses)))
    assert stats.losses[-1] != stats.losses[0]
    assert_every_tensor_moved(model, before)
    if method == "tfew":
        assert set(stats.components) == {"lm", "ul", "ln"}


@pytest.mark.parametrize("model_type", ["mt5", "umt5"])
def test_other_t5_family_members_score_and_take_the_methods(tmp_path, model_type):
    """mT5 and UMT5 (T5's module names; UMT5 with a relative-position bias per layer) load as encoder-decoders and
    T-Few's (IA)3, LoRA and a bottleneck adapter find their modules there, their per-token work split by stack."""
    import copy

    from harness.methods import apply_method, method_overhead, training_settings

    config = tmp_path / f"{model_type}.json"
    config.write_text(json.dumps({**TINY_T5, "model_type": model_type}))
    lm = load_model(f"random:{config}", "cpu", "float32")
    assert is_seq2seq(lm.model) and type(lm.model).__name__.lower().startswith(model_type)
    for method in ("tfew", "lora", "adapter"):
        settings = training_settings(method, "quick", {})
        model = apply_method(copy.deepcopy(lm.model), method, settings).eval()
        ov = method_overhead(model, method, settings)
        assert ov.split and 0 < ov.enc_per_token < ov.per_token
        out = score_prompts(model, lm.tokenizer, PROMPTS[:2], batch_size=2)
        assert all(math.isfinite(v) for e in out.examples for v in e.logprobs)


def test_flops_formula_matches_the_flop_counter(tiny_t5):
    """costs.forward_flops on the recorded work == torch's FlopCounterMode within 15% (no padding: one query per
    batch, choices of one token each; encoder x prompt tokens + decoder x choice tokens + cross-attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    from harness.costs import forward_flops

    lm = tiny_t5
    prompts = [Prompt("Premise: the cat sat on the mat all day long.\nQuestion: did it sit? Answer:",
                      (" yes", " no"), 0, "a")]
    dims = ModelDims.from_model(lm.model)
    assert 0 < dims.enc_params < dims.body_params and dims.cross_kv_params == 2 * 2 * 64 * 64
    for use_cache in (True, False):
        counter = FlopCounterMode(display=False)
        with counter:
            out = score_prompts(lm.model, lm.tokenizer, prompts, use_cache=use_cache, batch_size=1)
        assert all(len(c) == 1 for c in out.rows[0].continuations)
        ours, measured = forward_flops(dims, out.work), counter.get_total_flops()
        print(f"use_cache={use_cache}: formula {ours:.4g}, FlopCounterMode {measured:.4g}")
        assert abs(ours - measured) / measured < 0.15


@pytest.mark.parametrize("method", ["lora", "lokr", "adapter"])
def test_peft_overhead_flops_follow_the_stacks(tiny_t5, method):
    """A method's per-token overhead on an encoder-decoder is charged where it runs (harness.methods.base.Overhead:
    encoder tokens, decoder tokens, cross-attention K/V per encoder state and decoder row): the formula equals what
    FlopCounterMode counts on top of the base model's scoring (matmul-only overheads: LoRA on q, v, including the
    decoder's cross-attention v; LoKr's second matmul; bottleneck adapters in both stacks; one-token choices, so
    no decoder padding, which the counter would count). Charging every token
    the whole per-token overhead (the figure before the split) is more than 1.3x the count."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    from harness.methods import apply_method, method_overhead, training_settings
    from harness.peft_runner import eval_overhead_flops

    settings = training_settings(method, "quick", {})
    model = apply_method(copy.deepcopy(tiny_t5.model), method, settings).eval()

    prompts = [Prompt("Premise: the cat sat on the mat all day long.\nQuestion: did it sit? Answer:", (" yes", " no"),
                      0, "a")]  # one-token choices: no decoder padding (the counter counts padded positions)

    def counted(m):
        counter = FlopCounterMode(display=False)
        with counter:
            out = score_prompts(m, tiny_t5.tokenizer, prompts, use_cache=True, batch_size=1)
        return counter.get_total_flops(), out.work

    base, work = counted(tiny_t5.model)
    with_method, work_m = counted(model)
    assert work_m == work
    dims = ModelDims.from_model(tiny_t5.model)
    ov = method_overhead(model, method, settings)
    assert ov.split and 0 < ov.enc_per_token < ov.per_token
    assert (ov.cross_per_token > 0) == (method != "adapter")  # LoRA's, LoKr's v: EncDecAttention.v too
    formula = eval_overhead_flops(dims, ov, work, 1)
    assert formula == with_method - base
    assert ov.per_token * work.tokens > 1.3 * formula


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "ptuning"])
def test_prompt_learning_flops_within_15_percent_of_the_flop_counter(tiny_t5, method):
    """The virtual tokens and prefix keys of prompt learning are counted as on a causal model (docs/metrics.md: an
    approximation on encoder-decoders); with the prompt re-encoded per choice the whole figure stays within 15% of
    FlopCounterMode (T5's attention is plain matmuls, all counted)."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    from harness.costs import forward_flops
    from harness.methods import apply_method, method_overhead, training_settings
    from harness.peft_runner import eval_overhead_flops

    settings = training_settings(method, "quick", {})
    model = apply_method(copy.deepcopy(tiny_t5.model), method, settings).eval()
    prompts = [Prompt("Premise: the cat sat on the mat all day long while the rain fell on the town.\nQuestion: did "
                      "it sit there? Answer:", (" yes", " no"), 0, "a")]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        out = score_prompts(model, tiny_t5.tokenizer, prompts, use_cache=True, batch_size=1, budget=None)
    dims = ModelDims.from_model(tiny_t5.model)
    ov = method_overhead(model, method, settings)
    formula = forward_flops(dims, out.work) + eval_overhead_flops(dims, ov, out.work, 1, 1)
    if method == "prefix_tuning":  # peft recomputes the prefix MLP for every row (2 choices), in eval mode too
        formula += 2 * ov.train_per_row  # (tests/test_method_flops.py does the same on a causal model)
    assert abs(formula - counter.get_total_flops()) / counter.get_total_flops() < 0.15


def test_prompt_learning_work_counts_the_encoder_per_choice(tiny_t5):
    """peft's prompt tuning on an encoder-decoder runs the whole model once per choice (its virtual tokens enter
    through peft's forward), so the recorded work has the prompt encoded per choice, as computed."""
    import copy

    from harness.methods import apply_method, training_settings

    model = apply_method(copy.deepcopy(tiny_t5.model), "prompt_tuning", training_settings("prompt_tuning", "quick",
                                                                                          {})).eval()
    out = score_prompts(model, tiny_t5.tokenizer, PROMPTS, use_cache=True, batch_size=2)
    assert out.work.enc_tokens == sum(len(r.context) * len(r.continuations) for r in out.rows)
    shared = score_prompts(tiny_t5.model, tiny_t5.tokenizer, PROMPTS, use_cache=True, batch_size=2)
    assert shared.work.enc_tokens == sum(len(r.context) for r in shared.rows)


def test_uncached_work_counts_the_prompt_per_choice(tiny_t5):
    out = score_prompts(tiny_t5.model, tiny_t5.tokenizer, PROMPTS, use_cache=False, batch_size=3)
    from harness.scoring import uncached_work

    dims = ModelDims.from_model(tiny_t5.model)
    assert uncached_work(out.rows, dims) == out.work


def test_the_lmeval_style_baseline_scores_like_the_naive_path(tiny_t5):
    """benchmarks.lmeval_loop on an encoder-decoder (lm-eval's seq2seq way: a labels= forward per request, the
    prompt re-encoded per choice) gives the harness's log-probs (fp32, 1e-4), so the GPU benchmark's baseline is the
    same function; a wrong label/shift convention would move every choice's score."""
    from benchmarks import lmeval_loop

    ref = score_prompts(tiny_t5.model, tiny_t5.tokenizer, PROMPTS, "Q: one? A: yes\n", use_cache=True, batch_size=2)
    got = lmeval_loop.loglikelihoods(tiny_t5.model, tiny_t5.tokenizer, PROMPTS, "Q: one? A: yes\n", batch_size=3)
    diffs = [abs(a - b) for e, row in zip(ref.examples, got) for a, b in zip(e.logprobs, row)]
    assert len(diffs) == 8 and max(diffs) < 1e-4


def test_synthetic_training_flops_match_the_flop_counter(tiny_t5):
    """benchmarks.train_throughput's synthetic encoder-decoder batch (--seq encoder, --dec-seq decoder tokens): its
    counted forward FLOPs == FlopCounterMode of the labels= forward within 15%."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.train_throughput import _work
    from harness.costs import forward_flops

    dims = ModelDims.from_model(tiny_t5.model)
    x, y = torch.randint(2, 1000, (3, 40)), torch.randint(2, 1000, (3, 6))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        tiny_t5.model(input_ids=x, labels=y, use_cache=False)
    ours, measured = forward_flops(dims, _work(dims, 3, 40, 6)), counter.get_total_flops()
    assert abs(ours - measured) / measured < 0.15


@pytest.mark.slow
def test_cli_run_zeroshot_icl_tfew_on_a_random_t5(tmp_path, tiny_t5_config, data_dir):
    from click.testing import CliRunner

    from harness.cli import main
    from harness.store import Store

    store = tmp_path / "s.sqlite"
    args = ["run", "--methods", "zeroshot,icl,tfew", "--tasks", "cb", "--seeds", "0", "--templates", "gpt3_style",
            "--k", "2", "--limit", "3", "--steps", "2", "--preset", "quick", "--model", f"random:{tiny_t5_config}",
            "--device", "cpu", "--store", str(store), "--data-dir", str(data_dir), "--quiet"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    runs = Store(store).runs()
    assert sorted(r["method"] for r in runs) == ["icl", "tfew", "zeroshot"]
    assert all(r["status"] == "finished" and r["is_random"] for r in runs)


@pytest.mark.parametrize("name,params,layers", [
    ("t5-small", 60_506_624, 6),  # google-t5/t5-small: 60.5M
    ("t5-base", 222_903_552, 12),  # google-t5/t5-base: 223M
    ("t0-3b", 2_783_959_040, 24),  # T0_3B: 2.85B published; transformers 5 ties its lm_head (configs/t0-3b.json)
])
def test_named_t5_architectures(name, params, layers):
    from transformers import AutoModelForSeq2SeqLM

    from harness.random_models import load_config

    cfg = load_config(name)
    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) == params
    assert cfg.is_encoder_decoder and cfg.vocab_size == 32128 and cfg.num_layers == layers
