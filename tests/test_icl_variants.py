"""Demonstration variants (issue 15; harness.demos): --orders permutes the same demonstrations, --label-noise
corrupts their labels, --demos balanced draws them class-balanced; each variant is its own run, default runs keep
their ids, and every option is checked before any model loads. Runs on the real model with --limit."""

from __future__ import annotations

from collections import Counter

import pytest
from click.testing import CliRunner

from harness import api, demos
from harness.cli import main
from harness.errors import HarnessError
from harness.spec import RunSpec
from harness.store import Store

COMMON = dict(templates=["gpt3_style"], seeds=[0], limit=2, device="cpu", dtype="float32")


def _prefix(cb, data_dir, k=6, **variant):
    template = cb.template("gpt3_style")
    rows = demos.select_examples(cb, 0, data_dir, k, variant.pop("source", "tfew"))
    shown, labels = demos.arrange(cb, template, rows, seed=0, **variant)
    return shown, labels, cb.demonstrations(template, shown, labels)


def test_order_permutes_the_same_demonstrations(cb, data_dir):
    rows0, labels0, prefix0 = _prefix(cb, data_dir)
    seen = {prefix0}
    for order in (1, 2, 3):
        rows, labels, prefix = _prefix(cb, data_dir, order=order)
        assert prefix not in seen  # every order is a different prompt ...
        seen.add(prefix)
        key = lambda rs, ls: sorted((r["idx"], lab) for r, lab in zip(rs, ls))  # noqa: E731
        assert key(rows, labels) == key(rows0, labels0)  # ... of the same demonstrations and labels
        assert sorted(prefix.split(cb.fewshot_delimiter)) == sorted(prefix0.split(cb.fewshot_delimiter))
    assert demos.n_orders(2, 5) == 2 and demos.n_orders(0, 5) == 1
    with pytest.raises(HarnessError, match="does not exist"):
        demos.permutation(2, 2, 0)


def test_label_noise_changes_the_labels_it_says(cb, data_dir):
    rows, gold, prefix = _prefix(cb, data_dir, k=8)
    _, wrong, noisy = _prefix(cb, data_dir, k=8, label_noise=1.0)
    assert all(w != g for w, g in zip(wrong, gold, strict=True)) and noisy != prefix
    _, half, _ = _prefix(cb, data_dir, k=8, label_noise=0.5)
    assert sum(h != g for h, g in zip(half, gold)) == 4
    _, rand, _ = _prefix(cb, data_dir, k=8, label_noise="random")
    assert set(rand) <= {0, 1, 2} and rand != gold
    assert _prefix(cb, data_dir, k=8, label_noise=0.5) == _prefix(cb, data_dir, k=8, label_noise=0.5)  # seeded


def test_balanced_demonstrations_are_balanced_at_every_prefix(cb, data_dir):
    rows = demos.balanced_examples(cb, 0, data_dir, 12)
    for k in range(1, 13):
        counts = Counter(r["label"] for r in rows[:k])
        assert max(counts.values()) - min(counts.get(c, 0) for c in (0, 1, 2)) <= 1, (k, counts)
    assert rows != demos.balanced_examples(cb, 1, data_dir, 12)
    with pytest.raises(HarnessError, match="too few"):
        demos.balanced_examples(cb, 0, data_dir, 200)  # cb's train split has 16 neutral rows


def test_default_run_ids_are_unchanged(data_dir):
    spec = RunSpec(task="cb", method="icl", template="gpt3_style", seed=32, k=8, model="m", limit=16,
                   scoring_version=3, data_hash="d", task_hash="t", model_fingerprint="f")
    assert spec.run_id == "e339ab89a70b8346"  # the id this spec had before the variant fields existed
    assert not {"demos", "order", "label_noise"} & set(spec.identity())
    plain = api.plan(["cb"], ["icl", "zeroshot"], k=[0, 4], data_dir=data_dir, **COMMON)
    same = api.plan(["cb"], ["icl", "zeroshot"], k=[0, 4], data_dir=data_dir, demos="tfew", orders=1,
                    label_noise=[0.0], **COMMON)
    assert [s.run_id for s in plain] == [s.run_id for s in same]


def test_variants_plan_and_run_on_the_real_model(tmp_path, data_dir, smollm):
    specs = api.plan(["cb"], ["icl", "zeroshot"], k=[0, 4], data_dir=data_dir, orders=2, label_noise=[0, 1.0],
                     demos="tfew,balanced", **COMMON)
    variants = Counter((s.method, s.k, s.demos, s.label_noise, s.order) for s in specs)
    assert variants[("zeroshot", 0, "tfew", None, 0)] == 1 and variants[("icl", 0, "tfew", None, 0)] == 1
    assert sum(n for (m, k, *_), n in variants.items() if k == 4) == 8  # 2 sources x 2 noise levels x 2 orders
    assert len({s.run_id for s in specs}) == len(specs)
    tfew = {s.order: s for s in specs if s.k == 4 and s.demos == "tfew" and s.label_noise is None}
    balanced = next(s for s in specs if s.k == 4 and s.demos == "balanced" and s.label_noise is None and not s.order)
    noisy = next(s for s in specs if s.k == 4 and s.demos == "tfew" and s.label_noise == 1.0 and not s.order)
    assert balanced.data_hash != tfew[0].data_hash and noisy.data_hash == tfew[0].data_hash
    chosen = [tfew[0], tfew[1], balanced, noisy]
    store = Store(tmp_path / "s.sqlite")
    results = api.run(chosen, store=store, data_dir=data_dir, progress=False, loader=lambda s: smollm)
    assert all(r.status == "finished" for r in results), [r.error for r in results]
    by_id = {r.run_id: r for r in results}
    logprobs = {s.run_id: [e.logprobs for e in by_id[s.run_id].examples] for s in chosen}
    assert len({str(v) for v in logprobs.values()}) == 4  # each variant scores its own prompt
    assert by_id[tfew[1].run_id].config["order"] == 1 and by_id[noisy.run_id].config["label_noise"] == 1.0
    # same demonstrations in another order: the same text, so the same bytes
    assert by_id[tfew[1].run_id].metrics["checkpoint_bytes"] == by_id[tfew[0].run_id].metrics["checkpoint_bytes"]


@pytest.mark.parametrize("args,needle", [
    (["--orders", "0"], "--orders must be one integer >= 1"),
    (["--orders", "2,3"], "--orders must be one integer >= 1"),
    (["--label-noise", "1.5"], "--label-noise takes fractions in [0, 1]"),
    (["--label-noise", "0.5,lots"], "--label-noise takes fractions in [0, 1]"),
    (["--demos", "stratified"], "--demos must be one of tfew, balanced"),
    (["--methods", "lora", "--demos", "balanced"], "apply to k-shot in-context runs"),
    (["--demos", "balanced", "--k", "200"], "too few"),
])
def test_bad_variant_options_exit_2_before_any_model_loads(args, needle, monkeypatch):
    import harness.models

    def no_load(*a, **kw):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(harness.models, "load_model", no_load)
    base = ["run", "--tasks", "cb", "--limit", "2", "--seeds", "0", "--store", "/nonexistent/dir/s.sqlite"]
    if "--methods" not in args:
        base += ["--methods", "icl"]
    result = CliRunner().invoke(main, base + args, catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1
