"""k-curves (issue 15): several k in one command, the largest prefix's KV cache encoded once and cropped for the
smaller k; every run equals the run planned and executed alone (per-example log-probs within 1e-4, fp32, CPU)."""

from __future__ import annotations

import pytest

from harness import api
from harness.errors import HarnessError
from harness.store import Store

KS = [0, 1, 2, 4, 8]


def _logprobs(store: Store, run_id: str) -> list[list[float]]:
    return [[c["logprob"] for c in row["choices"]] for row in store.examples([run_id])]


def test_k_curve_equals_separate_runs(tmp_path, data_dir, smollm):
    common = dict(templates=["gpt3_style"], seeds=[0], limit=6, data_dir=data_dir, device="cpu", dtype="float32")
    curve = api.plan(["cb"], ["icl"], k=KS, **common)
    assert [s.k for s in curve] == KS
    curve_store = Store(tmp_path / "curve.sqlite")
    results = api.run(curve, store=curve_store, data_dir=data_dir, progress=False, loader=lambda spec: smollm)
    assert all(r.status == "finished" for r in results), [r.error for r in results]
    by_k = {r.config["k"]: r for r in results}
    assert by_k[8].metrics.get("prefix_reused_tokens") is None  # the largest k encodes the prefix
    for k in (1, 2, 4):
        assert by_k[k].metrics["prefix_reused_tokens"] > 0
        # alone-cost FLOPs exceed what the run computed itself (the shared prefix is not recomputed)
        assert by_k[k].metrics["infer_flops_per_example"] > by_k[k].metrics["infer_flops_per_example_shared"]
    alone_store = Store(tmp_path / "alone.sqlite")
    for k in KS:
        (spec,) = api.plan(["cb"], ["icl"], k=k, **common)
        assert spec.run_id == by_k[k].run_id  # the same run as planned alone: one id per k
        (alone,) = api.run([spec], store=alone_store, data_dir=data_dir, progress=False, loader=lambda s: smollm)
        assert alone.metrics["k_used"] == by_k[k].metrics["k_used"] == k
        assert alone.metrics["infer_flops_per_example"] == pytest.approx(by_k[k].metrics["infer_flops_per_example"])
        for a, b in zip(_logprobs(alone_store, spec.run_id), _logprobs(curve_store, spec.run_id), strict=True):
            assert a == pytest.approx(b, abs=1e-4)


def test_k_list_is_validated_before_any_model_loads(data_dir):
    with pytest.raises(HarnessError, match="--k must be >= 0"):
        api.plan(["cb"], ["icl"], k=[4, -1], data_dir=data_dir, limit=2)
    with pytest.raises(HarnessError, match="no k given"):
        api.plan(["cb"], ["icl"], k=[], data_dir=data_dir, limit=2)


def test_jobs_keep_a_curve_together(data_dir):
    from harness.jobs import make_jobs

    specs = api.plan(["cb"], ["icl"], k=[0, 1, 2, 4, 8, 16, 32], templates="all", seeds=[0], limit=2,
                     data_dir=data_dir)
    for job in make_jobs(specs):
        keys = {(s.template, s.seed) for s in job.specs}
        for key in keys:
            assert sum((s.template, s.seed) == key for s in job.specs) == 7


def test_reused_head_then_own_tokens_equals_alone(data_dir, smollm, cb):
    """A prefix that parts from the cached one after its first demonstration (not a literal head, as a seeded
    sample that is not prefix-stable): the common head is reused, the rest encoded once onto it, same numbers."""
    from harness.data import few_shot_examples, load_split
    from harness.scoring import score_prompts

    template = cb.template("gpt3_style")
    prompts = [cb.render(template, ex) for ex in load_split(cb, cb.eval_split, data_dir)[:3]]
    demos = few_shot_examples(cb, 0, data_dir, n=3)
    big = score_prompts(smollm.model, smollm.tokenizer, prompts, cb.demonstrations(template, demos[:2]),
                        batch_size=2)
    other = cb.demonstrations(template, [demos[0], demos[2]])
    alone = score_prompts(smollm.model, smollm.tokenizer, prompts, other, batch_size=2)
    reused = score_prompts(smollm.model, smollm.tokenizer, prompts, other, batch_size=2, reuse=big.cache)
    assert 0 < reused.reused_tokens < reused.prefix_tokens == alone.prefix_tokens
    assert reused.work.tokens == alone.work.tokens - reused.reused_tokens
    for a, b in zip(alone.examples, reused.examples):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
