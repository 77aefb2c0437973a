"""Report sections of the demonstration variants (issue 15; harness.report.variants): spread due to order, seed
and template; accuracy vs label noise; balanced vs T-Few demonstrations; only when such runs exist, the other
tables reading the default runs alone; ``compare --variant-a/-b``. A hand-made store with known accuracies."""

from __future__ import annotations

import hashlib
import json

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.report.document import report_tables
from harness.report.format import to_markdown
from harness.report.tables import experiment_key, select_runs, summary_table
from harness.report.variants import (default_runs, demos_table, label_noise_table, parse_variant, spread_table,
                                     variant_plots)
from harness.store import ExampleScore, RunResult, Store

N = 10


def _write(store, n_correct, *, template="t0", seed=0, order=0, label_noise=None, demos="tfew", task="cb"):
    config = {"task": task, "method": "icl", "model": "m", "template": template, "seed": seed, "k": 8,
              "preset": "paper", "limit": N, "dtype": "float32", "device": "cpu", "kv_cache": True,
              "demos": demos, "order": order, "label_noise": label_noise}
    run_id = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    examples = [ExampleScore(f"e{i}", 0, [-1.0, -2.0] if i < n_correct else [-2.0, -1.0], [1, 1], [3, 3])
                for i in range(N)]
    metrics = {"n_eval": N, "accuracy": n_correct / N, "accuracy_norm": n_correct / N,
               "accuracy_norm_char": n_correct / N, "infer_flops_per_example": 1e9, "k_used": 8}
    store.write(RunResult(run_id, config, "finished", metrics, examples))


@pytest.fixture
def store(tmp_path):
    db = Store(tmp_path / "v.sqlite")
    # base runs: template t0/t1 x seed 0/1; seeds move accuracy by 2 (t0) / 4 (t1) examples, templates by 2 / 2
    base = {("t0", 0): 4, ("t0", 1): 6, ("t1", 0): 6, ("t1", 1): 8}
    for (template, seed), c in base.items():
        _write(db, c, template=template, seed=seed)
    for seed, others in ((0, (5, 3)), (1, (6, 6))):  # orders 1, 2 of t0: ranges 2 (seed 0) and 0 (seed 1)
        for order, c in enumerate(others, start=1):
            _write(db, c, template="t0", seed=seed, order=order)
    for seed in (0, 1):
        _write(db, 2, template="t0", seed=seed, label_noise=1.0)
        _write(db, 3, template="t0", seed=seed, label_noise="random")
        _write(db, 9, template="t0", seed=seed, demos="balanced")
    return db


def test_sections_only_with_such_runs(tmp_path):
    plain = Store(tmp_path / "plain.sqlite")
    _write(plain, 5)
    runs = select_runs(plain.runs())
    assert spread_table(runs) is None and label_noise_table(runs) is None and demos_table(runs) is None
    assert variant_plots(runs, tmp_path / "plots") == []
    assert len(report_tables(runs)) == 5


def test_spread_noise_and_balanced_tables(store, tmp_path):
    runs = select_runs(store.runs())
    assert len(runs) == 14
    (row,) = spread_table(runs).rows
    # order: SDs over orders {4,5,3} = 10.0 and {6,6,6} = 0 -> mean 5.0; ranges 20 and 0 -> 10.0; 2 groups
    assert row[4:7] == ("5.0", "10.0", "2")
    # seed (order 0): t0 {40, 60} SD 14.1 range 20; t1 {60, 80} the same -> 14.1, 20.0
    assert row[7:10] == ("14.1", "20.0", "2")
    # template (order 0): seed 0 {40, 60}, seed 1 {60, 80} -> 14.1, 20.0
    assert row[10:13] == ("14.1", "20.0", "2")
    noise = label_noise_table(runs)
    assert noise.columns[4:] == ("p=0", "p=1", "p=random")
    (row,) = [r for r in noise.rows if r[3] == "tfew"]
    assert row[4:] == ("50.0 (2)", "20.0 (2)", "30.0 (2)")  # p=0: t0 order 0, seeds 0 and 1
    (row,) = demos_table(runs).rows
    assert row[3:] == ("50.0", "90.0", "+40.0", "2")
    # the main tables read the default runs only: 4 base runs, not the variants
    assert len(default_runs(runs)) == 4
    assert summary_table(default_runs(runs)).rows[0][-1] == "4"
    text = "\n".join(to_markdown(t) for t in report_tables(runs))
    assert "spread due to demonstration order" in text and "label noise" in text and "class-balanced" in text
    plots = variant_plots(runs, tmp_path / "plots")
    assert [p.name for p in plots] == ["icl_order_spread", "icl_accuracy_vs_label_noise"]
    assert all(p.paths for p in plots)


def test_defaults_are_the_experiment_of_runs_made_before_the_fields():
    old = {"task": "cb", "method": "icl", "k": 8}
    assert experiment_key(old) == experiment_key({**old, "demos": "tfew", "order": 0, "label_noise": None})
    assert experiment_key(old) != experiment_key({**old, "order": 1})


def test_compare_one_method_across_variants(store):
    out = CliRunner().invoke(main, ["compare", "icl", "icl", "--store", str(store.path), "--variant-b",
                                    "label_noise=1.0"])
    assert out.exit_code == 0, out.output
    assert "icl [default] vs icl [label_noise=1.0]" in out.output
    assert "pairs (examples): 20" in out.output and "+30.0 points" in out.output
    # without a variant each side is the default runs: a store with variants does not make cells ambiguous
    out = CliRunner().invoke(main, ["compare", "icl", "icl", "--store", str(store.path)])
    assert out.exit_code == 0, out.output
    bad = CliRunner().invoke(main, ["compare", "icl", "icl", "--store", str(store.path), "--variant-a", "seed=3"])
    assert bad.exit_code == 2 and "unknown variant field" in bad.output
    assert parse_variant("order=2,demos=balanced,label_noise=random") == {
        "demos": "balanced", "order": 2, "label_noise": "random"}
