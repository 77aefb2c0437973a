"""Tests of harness.training: the T-Few losses against hand-computed values, choice scoring against the
evaluation scorer, determinism, divergence and out-of-memory handling.

The real embedded SmolLM2-135M is loaded once for the module; tiny randomly initialised models (built in
milliseconds) cover the mechanics.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.conftest import (SHORT_CB, assert_every_tensor_moved, assert_scores_moved, choice_scores,
                            trainable_snapshot)
from harness.errors import HarnessError
from harness.methods import apply_method, training_settings
from harness.tasks import Prompt, load_task
from harness.compiling import compile_mode, repeated_blocks
from harness.training import (TrainingDiverged, choice_logprobs, length_normalized_loss, lm_loss,
                              train, unlikelihood_loss)

L = math.log

# Two examples, up to three choices of up to two tokens (0.0 = padding).
#   example 0 (label 0): choice 0 p = (0.5, 0.25); choice 1 p = (0.5,); no choice 2
#   example 1 (label 2): choice 0 p = (0.1,); choice 1 p = (0.9, 0.8); choice 2 p = (0.2, 0.5)
LOGPROBS = torch.tensor([
    [[L(0.5), L(0.25)], [L(0.5), 0.0], [0.0, 0.0]],
    [[L(0.1), 0.0], [L(0.9), L(0.8)], [L(0.2), L(0.5)]],
])
MASK = torch.tensor([
    [[True, True], [True, False], [False, False]],
    [[True, False], [True, True], [True, True]],
])
LABELS = torch.tensor([0, 2])


def test_lm_loss_is_mean_nll_over_all_correct_tokens():
    # T-Few: cross-entropy over the flattened correct-choice tokens of the batch (4 tokens here)
    expected = -(L(0.5) + L(0.25) + L(0.2) + L(0.5)) / 4
    assert lm_loss(LOGPROBS, MASK, LABELS).item() == pytest.approx(expected, rel=1e-6)


def test_unlikelihood_loss_averages_over_all_wrong_tokens():
    # wrong-choice tokens: ex0 c1 (0.5); ex1 c0 (0.1); ex1 c1 (0.9, 0.8) -> 4 tokens, T-Few's +0.01 offset
    terms = [-L(1 - p + 0.01) for p in (0.5, 0.1, 0.9, 0.8)]
    assert unlikelihood_loss(LOGPROBS, MASK, LABELS).item() == pytest.approx(sum(terms) / 4, rel=1e-6)


def test_length_normalized_loss_softmaxes_mean_logprobs_over_present_choices():
    s0 = [(L(0.5) + L(0.25)) / 2, L(0.5)]  # example 0 has two choices only
    s1 = [L(0.1), (L(0.9) + L(0.8)) / 2, (L(0.2) + L(0.5)) / 2]
    ce0 = -s0[0] + L(sum(math.exp(s) for s in s0))
    ce1 = -s1[2] + L(sum(math.exp(s) for s in s1))
    assert length_normalized_loss(LOGPROBS, MASK, LABELS).item() == pytest.approx((ce0 + ce1) / 2, rel=1e-6)


def test_losses_are_differentiable_and_ignore_padding():
    lp = LOGPROBS.clone().requires_grad_(True)
    total = lm_loss(lp, MASK, LABELS) + unlikelihood_loss(lp, MASK, LABELS) + length_normalized_loss(lp, MASK, LABELS)
    total.backward()
    assert torch.isfinite(lp.grad).all()
    assert (lp.grad[~MASK] == 0).all()


# ------------------------------------------------------------------------------------------ real model

# smollm (the real model, loaded once per session), cb and SHORT_CB come from tests/conftest.py


def test_choice_logprobs_match_the_evaluation_scorer(smollm, cb):
    from harness.scoring import score_prompts

    template = cb.template("gpt3_style")
    prompts = [cb.render(template, ex) for ex in SHORT_CB]
    with torch.no_grad():
        out = choice_logprobs(smollm.model, smollm.tokenizer, prompts)
    scored = score_prompts(smollm.model, smollm.tokenizer, prompts, use_cache=False)
    sums = (out.token_logprobs * out.token_mask).sum(-1)  # [B, C]
    for b, ex in enumerate(scored.examples):
        assert out.token_mask[b].sum(-1).tolist() == ex.n_tokens
        assert sums[b].tolist() == pytest.approx(ex.logprobs, abs=1e-3)
    assert out.work.logit_positions == sum(sum(ex.n_tokens) for ex in scored.examples)
    assert out.rows == 6


def test_right_padding_and_indexed_logits_change_no_logprob(tiny, smollm, cb):
    prompts = [cb.render(cb.templates[0], ex) for ex in SHORT_CB]
    plain = choice_logprobs(tiny, smollm.tokenizer, prompts)
    for right_pad in (False, True):
        for logit_index in (False, right_pad):
            padded = choice_logprobs(tiny, smollm.tokenizer, prompts, right_pad=right_pad, logit_index=logit_index)
            assert torch.equal(padded.token_mask, plain.token_mask) and padded.work == plain.work
            torch.testing.assert_close(padded.token_logprobs, plain.token_logprobs, rtol=1e-5, atol=1e-5)


def test_a_width_multiple_pads_to_few_shapes_and_changes_no_logprob(tiny, smollm, cb):
    # --compile graphs rounds the training rows' width up (a CUDA graph per distinct shape): more padding, same values
    prompts = [cb.render(cb.templates[0], ex) for ex in SHORT_CB]
    widths = []
    handle = tiny.get_input_embeddings().register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    try:
        for right_pad, logit_index in ((False, False), (True, False), (True, True)):
            plain = choice_logprobs(tiny, smollm.tokenizer, prompts, right_pad=right_pad, logit_index=logit_index)
            padded = choice_logprobs(tiny, smollm.tokenizer, prompts, right_pad=right_pad, logit_index=logit_index,
                                     width_multiple=64)
            assert torch.equal(padded.token_mask, plain.token_mask) and padded.work == plain.work
            torch.testing.assert_close(padded.token_logprobs, plain.token_logprobs, rtol=1e-5, atol=1e-5)
            assert widths[-1] % 64 == 0 and widths[-2] % 64 != 0 and widths[-1] > widths[-2]
        plain_width = widths[-2]
        capped = choice_logprobs(tiny, smollm.tokenizer, prompts, max_length=plain_width + 3, width_multiple=64)
        assert widths[-1] == plain_width + 3  # never wider than max_length
        torch.testing.assert_close(capped.token_logprobs, plain.token_logprobs, rtol=1e-5, atol=1e-5)
    finally:
        handle.remove()


def test_indexed_logits_give_the_same_gradients_and_only_scored_positions_reach_the_head(tiny, smollm, cb):
    # right padding's logit_index: the head sees [R, T, d] (each row's own positions), not [R, W, d] or the union
    prompts = [cb.render(cb.templates[0], ex) for ex in SHORT_CB]
    grads, shapes = [], []
    head = tiny.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    try:
        for right_pad, logit_index in ((False, False), (True, True)):
            tiny.zero_grad()
            out = choice_logprobs(tiny, smollm.tokenizer, prompts, right_pad=right_pad, logit_index=logit_index)
            (out.token_logprobs * out.token_mask).sum().backward()
            grads.append(head.weight.grad.clone())
    finally:
        handle.remove()
        tiny.zero_grad()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    rows, longest = out.rows, int(out.token_mask.sum(-1).max())
    assert shapes[1] == (rows, longest, head.weight.shape[0])
    assert not head._forward_pre_hooks  # the gather is removed after the forward


def test_right_causal_padding_drops_the_mask_and_changes_no_logprob_or_loss(tiny, smollm, cb):
    # right padding follows every real token, so causal attention alone keeps it out (no mask: SDPA's plain kernels)
    prompts = [cb.render(cb.templates[0], ex) for ex in SHORT_CB]
    masked = choice_logprobs(tiny, smollm.tokenizer, prompts, right_pad=True, logit_index=True)
    seen = []
    handle = tiny.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("attention_mask")),
                                            with_kwargs=True)
    try:
        causal = choice_logprobs(tiny, smollm.tokenizer, prompts, right_pad=True, logit_index=True, causal_only=True)
    finally:
        handle.remove()
    assert seen == [None]
    torch.testing.assert_close(causal.token_logprobs, masked.token_logprobs, rtol=1e-5, atol=1e-5)
    with pytest.raises(HarnessError, match="causal_only needs right padding"):
        choice_logprobs(tiny, smollm.tokenizer, prompts, causal_only=True)
    settings = training_settings("lora", "quick", {"steps": 2, "batch_size": 2, "n_train": 2, "lr": 1e-2,
                                                   "warmup_ratio": 0.0})
    losses = []
    for padding in ("right", "right-causal"):
        torch.manual_seed(0)
        model = apply_method(copy.deepcopy(tiny), "lora", settings)
        losses.append(train(model, smollm.tokenizer, SHORT_CB, cb, settings, seed=0, method="lora",
                            padding=padding).losses)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    prompt = training_settings("prompt_tuning", "quick", {"steps": 1, "batch_size": 2, "n_train": 2})
    with pytest.raises(HarnessError, match="adds virtual tokens"):
        train(apply_method(copy.deepcopy(tiny), "prompt_tuning", prompt), smollm.tokenizer, SHORT_CB, cb, prompt,
              seed=0, method="prompt_tuning", padding="right-causal")


def test_right_padding_gives_the_same_logprobs(smollm, cb):
    template = cb.template("gpt3_style")
    prompts = [cb.render(template, ex) for ex in SHORT_CB]
    with torch.no_grad():
        left = choice_logprobs(smollm.model, smollm.tokenizer, prompts)
        right = choice_logprobs(smollm.model, smollm.tokenizer, prompts, right_pad=True)
    assert torch.allclose(left.token_logprobs, right.token_logprobs, atol=1e-4)


@pytest.mark.slow
def test_training_is_deterministic_on_cpu(smollm, cb):
    # 3 steps; T-Few's warmup (6% of 3 steps) gives the first step learning rate 0, the other two 1e-2 x 0.68, 0.34
    settings = training_settings("tfew", "quick", {"steps": 3, "batch_size": 1, "n_train": 2, "lr": 1e-2})
    prompts = [cb.render(cb.template("gpt3_style"), ex) for ex in SHORT_CB]
    base = choice_scores(smollm.model, smollm.tokenizer, prompts)
    runs, models = [], []
    for _ in range(2):
        torch.manual_seed(0)
        model = apply_method(copy.deepcopy(smollm.model), "tfew", settings)
        before = trainable_snapshot(model)
        runs.append(train(model, smollm.tokenizer, SHORT_CB, cb, settings, seed=3, method="tfew"))
        assert_every_tensor_moved(model, before)
        models.append(model)
    assert runs[0].losses == runs[1].losses
    assert runs[0].components == runs[1].components
    assert runs[0].work == runs[1].work
    assert set(runs[0].components) == {"lm", "ul", "ln"}
    weights = [dict(m.named_parameters()) for m in models]
    assert all(torch.equal(p, weights[1][name]) for name, p in weights[0].items())  # the same trained weights
    assert_scores_moved(choice_scores(models[0], smollm.tokenizer, prompts), base)


# ------------------------------------------------------------------------------------------ tiny model

def test_nan_loss_raises_training_diverged(tiny, smollm, cb):
    settings = training_settings("lora", "quick", {"steps": 2, "batch_size": 2, "n_train": 2})
    model = apply_method(copy.deepcopy(tiny), "lora", settings)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="step 0"):
        train(model, smollm.tokenizer, SHORT_CB, cb, settings, seed=0, method="lora")
    assert issubclass(TrainingDiverged, HarnessError)


def test_out_of_memory_halves_micro_batch_and_keeps_effective_batch(tiny, smollm, cb, monkeypatch):
    import harness.training as training

    settings = training_settings("ia3", "quick", {"steps": 2, "batch_size": 2, "n_train": 2, "lr": 0.1,
                                                 "warmup_ratio": 0.0})
    prompts = [cb.render(cb.templates[0], ex) for ex in SHORT_CB]
    base = choice_scores(tiny, smollm.tokenizer, prompts)
    model = apply_method(copy.deepcopy(tiny), "ia3", settings)
    before = trainable_snapshot(model)
    real, calls = training.choice_logprobs, []

    def flaky(model_, tokenizer, prompts, **kw):
        calls.append(len(prompts))
        if len(prompts) > 1:
            raise torch.OutOfMemoryError("simulated")
        return real(model_, tokenizer, prompts, **kw)

    monkeypatch.setattr(training, "choice_logprobs", flaky)
    stats = train(model, smollm.tokenizer, SHORT_CB, cb, settings, seed=0, method="ia3")
    assert (stats.micro_batch, stats.grad_accum) == (1, 2)
    assert stats.steps == 2 and calls[0] == 2 and set(calls[1:]) == {1}
    monkeypatch.undo()
    assert_every_tensor_moved(model, before)
    assert_scores_moved(choice_scores(model, smollm.tokenizer, prompts), base)


def test_training_tokenizes_each_context_and_choice_once(tiny, smollm, cb, monkeypatch):
    """The training memo (each (context, choice) pair encoded once per run, not once per step) really runs:
    3 steps over the same 2 examples and one template give 3 x 2 x 3 choice rows but 6 encode_pair calls."""
    import harness.training as training

    settings = training_settings("ia3", "quick", {"steps": 3, "batch_size": 2, "n_train": 2, "lr": 1e-2,
                                                 "warmup_ratio": 0.0, "train_template": "gpt3_style"})
    model = apply_method(copy.deepcopy(tiny), "ia3", settings)
    real, calls = training.encode_pair, []

    def counting(tokenizer, context, choice):
        calls.append((context, choice))
        return real(tokenizer, context, choice)

    monkeypatch.setattr(training, "encode_pair", counting)
    stats = train(model, smollm.tokenizer, SHORT_CB, cb, settings, seed=0, method="ia3")
    assert stats.rows == 3 * 2 * 3
    assert len(calls) == len(set(calls)) == 2 * 3, calls


def test_train_template_and_unlabelled_examples(tiny, smollm, cb):
    settings = training_settings("ia3", "quick", {"steps": 1, "batch_size": 2, "n_train": 2,
                                                 "train_template": "no_such_template"})
    model = apply_method(copy.deepcopy(tiny), "ia3", settings)
    with pytest.raises(HarnessError, match="template"):
        train(model, smollm.tokenizer, SHORT_CB, cb, settings, seed=0)
    with pytest.raises(HarnessError, match="no label"):
        choice_logprobs(model, smollm.tokenizer, [Prompt("a", (" b", " c"), -1, "x")])


# ------------------------------------------------------------------------------------------ torch.compile

def test_compile_is_asked_for():
    assert compile_mode("auto") is None and compile_mode(None) is None and compile_mode("off") is None
    assert compile_mode(False) is None and compile_mode(True) == "blocks"
    assert compile_mode("on") == "blocks" and compile_mode("model") == "model" and compile_mode("graphs") == "graphs"
    with pytest.raises(HarnessError, match="--compile must be one of"):
        compile_mode("fast")


def test_graphs_compile_blocks_for_cuda_graphs_and_mark_each_step(tiny, monkeypatch):
    """``--compile graphs``: the blocks compiled with ``mode="reduce-overhead"``, and a cudagraph-tree step boundary
    before each training step only under it."""
    import harness.compiling as compiling

    asked, marks = [], []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: asked.append(kw))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    model, blocks = compiling.for_training(tiny.model, compile_mode("graphs"))
    assert model is tiny.model and len(blocks) == len(asked) == 2
    assert all(kw == {"dynamic": True, "mode": "reduce-overhead"} for kw in asked)
    for mode in (None, "blocks", "model", "graphs"):
        compiling.step_begin(mode)
    assert marks == [1]


def test_training_under_graphs_pads_every_step_to_the_width_multiple(tiny, smollm, cb, monkeypatch):
    """Under ``--compile graphs`` every training forward is as wide as a multiple of GRAPH_WIDTH_MULTIPLE (few CUDA
    graphs to record); eagerly the widest row sets the width. The compile itself is stubbed out (its own test)."""
    import harness.training as training
    from harness.compiling import GRAPH_WIDTH_MULTIPLE

    monkeypatch.setattr(training, "for_training", lambda model, mode: (model, []))
    settings = training_settings("ia3", "quick", {"steps": 3, "batch_size": 2, "n_train": 2, "lr": 1e-2,
                                                 "warmup_ratio": 0.0})
    widths = {}
    for how in ("off", "graphs"):
        model = apply_method(copy.deepcopy(tiny), "ia3", settings)
        seen = widths[how] = []
        model.get_input_embeddings().register_forward_hook(lambda m, args, out, seen=seen: seen.append(args[0].shape[1]))
        stats = train(model, smollm.tokenizer, SHORT_CB, cb, settings, seed=0, method="ia3", compile=how)
        assert stats.compiled == (how == "graphs") and len(seen) == 3
    assert all(w % GRAPH_WIDTH_MULTIPLE == 0 for w in widths["graphs"]), widths
    assert any(w % GRAPH_WIDTH_MULTIPLE for w in widths["off"]), widths


def test_repeated_blocks_are_the_decoder_layers(tiny):
    blocks = repeated_blocks(tiny)
    assert blocks == list(tiny.model.layers) and len(blocks) == 2
    assert repeated_blocks(torch.nn.Linear(2, 2)) == []


def test_a_compile_failure_on_the_first_step_falls_back_to_eager(tiny, smollm, cb, monkeypatch, caplog):
    import harness.compiling as compiling

    settings = training_settings("lora", "quick", {"steps": 2, "batch_size": 2, "n_train": 2, "lr": 1e-2,
                                                  "warmup_ratio": 0.0})

    def broken(*args, **kwargs):
        raise RuntimeError("BackendCompilerFailed: simulated\nsecond line")

    def compile_broken(model):  # what a compiler failure looks like: the first call of a compiled block raises
        blocks = repeated_blocks(model)
        for block in blocks:
            block._compiled_call_impl = broken
        return blocks

    monkeypatch.setattr(compiling, "compile_blocks", compile_broken)
    runs = []
    prompts = [cb.render(cb.templates[0], ex) for ex in SHORT_CB]
    for choice in ("on", "off"):
        torch.manual_seed(0)
        model = apply_method(copy.deepcopy(tiny), "lora", settings)
        before = trainable_snapshot(model)
        runs.append(train(model, smollm.tokenizer, SHORT_CB, cb, settings, seed=0, method="lora", compile=choice))
        assert_every_tensor_moved(model, before)
        assert_scores_moved(choice_scores(model, smollm.tokenizer, prompts),
                            choice_scores(tiny, smollm.tokenizer, prompts))
    assert not runs[0].compiled and runs[0].losses == runs[1].losses
    assert "torch.compile failed (RuntimeError: BackendCompilerFailed: simulated); training eagerly" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("how", ["on", "model"])
def test_compiled_training_matches_eager(tiny, smollm, cb, how):
    """The real torch.compile paths (inductor on the CPU here), compiled blocks and the whole model, on a tiny model
    with prompts of several lengths so the dynamic-shape graph is exercised: losses equal eager's to float
    tolerance, and the model is eager again afterwards."""
    settings = training_settings("lora", "quick", {"steps": 3, "batch_size": 2, "n_train": 4, "lr": 1e-2})
    from torch._dynamo.utils import counters

    runs, graphs = [], []
    for choice in (how, "off"):
        torch.manual_seed(0)
        model = apply_method(copy.deepcopy(tiny), "lora", settings)
        before = trainable_snapshot(model)
        counters.clear()
        runs.append(train(model, smollm.tokenizer, SHORT_CB, cb, settings, seed=0, method="lora", compile=choice))
        graphs.append(counters["stats"]["unique_graphs"])
        assert_every_tensor_moved(model, before)  # 3 steps, the first at learning rate 0 (warmup)
    assert runs[0].compiled and not runs[1].compiled
    assert graphs[0] >= 1 and graphs[1] == 0  # dynamo really captured graphs, and only when asked to
    assert runs[0].work == runs[1].work
    assert all(block._compiled_call_impl is None for block in repeated_blocks(model))  # eager again afterwards
    assert runs[0].losses == pytest.approx(runs[1].losses, rel=1e-4, abs=1e-5)


def test_right_padding_trains_like_left_padding(tiny, smollm, cb):
    # no warmup: every step has a nonzero learning rate, so steps 2 and 3 score an updated model
    settings = training_settings("lora", "quick", {"steps": 3, "batch_size": 2, "n_train": 2, "lr": 1e-2,
                                                  "warmup_ratio": 0.0})
    prompts = [cb.render(cb.templates[0], ex) for ex in SHORT_CB]
    runs, scores = {}, {}
    for padding in ("left", "right"):
        torch.manual_seed(0)
        model = apply_method(copy.deepcopy(tiny), "lora", settings)
        before = trainable_snapshot(model)
        runs[padding] = train(model, smollm.tokenizer, SHORT_CB, cb, settings, seed=0, method="lora", padding=padding)
        assert_every_tensor_moved(model, before)
        scores[padding] = choice_scores(model, smollm.tokenizer, prompts)
    assert_scores_moved(scores["left"], choice_scores(tiny, smollm.tokenizer, prompts))
    torch.testing.assert_close(scores["left"], scores["right"], rtol=1e-4, atol=1e-4)
    assert runs["left"].losses == pytest.approx(runs["right"].losses, rel=1e-5)
    prompt = training_settings("prompt_tuning", "quick", {"steps": 1, "batch_size": 2, "n_train": 2})
    with pytest.raises(HarnessError, match="right-padded"):
        train(apply_method(copy.deepcopy(tiny), "prompt_tuning", prompt), smollm.tokenizer, SHORT_CB, cb,
              prompt, seed=0, method="prompt_tuning", padding="left")


def test_the_warmups_first_step_has_learning_rate_zero(tiny, smollm, cb, caplog):
    """T-Few's schedule: with warmup, step 0 runs at learning rate 0, so one step trains nothing (and says so);
    without warmup the same single step moves every trainable tensor."""
    from harness.training import make_optimizer, make_schedule

    settings = training_settings("ia3", "quick", {"steps": 20, "lr": 1e-2})
    optimizer = make_optimizer([torch.nn.Parameter(torch.ones(3))], settings)
    schedule = make_schedule(optimizer, settings)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    # warmup 20 x 0.06 = 1.2 steps: 0, then 1/1.2 of the peak, then linear decay to 19/18.8 x ... x 1/18.8
    assert lrs[0] == 0 and lrs[1] == pytest.approx(1e-2 / 1.2) and lrs[2] == pytest.approx(1e-2 * 18 / 18.8)
    assert lrs[-1] == pytest.approx(1e-2 / 18.8)
    for warmup, moves in ((0.06, False), (0.0, True)):
        settings = training_settings("ia3", "quick", {"steps": 1, "batch_size": 2, "n_train": 2, "lr": 1e-2,
                                                     "warmup_ratio": warmup})
        model = apply_method(copy.deepcopy(tiny), "ia3", settings)
        before = trainable_snapshot(model)
        caplog.clear()
        train(model, smollm.tokenizer, SHORT_CB, cb, settings, seed=0, method="ia3")
        if moves:
            assert_every_tensor_moved(model, before)
            assert "not trained" not in caplog.text
        else:
            assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
            assert "no training step has a learning rate above 0" in caplog.text
