"""Report cells split by training settings that vary within a (model, method, preset) (harness.report.train_variants):
an ablation such as ``--method-args scale_parameter=false`` stored beside default runs gets its own group and label,
never a median pooled with them; equal settings keep today's labels; a setting missing from older runs' dicts is at
the method's default. Tiny in-memory run dicts, and a store for ``compare --train-a/-b``."""

from __future__ import annotations

import hashlib
import json

from click.testing import CliRunner

from harness.cli import main
from harness.report.breakeven import break_even_table
from harness.report.tables import groups, summary_table, with_groups
from harness.report.train_variants import fmt_setting, method_defaults
from harness.store import ExampleScore, RunResult, Store

ADAPTER = {"batch_size": 8, "grad_accum": 1, "init_std": 0.01, "losses": ["lm"], "lr": 0.003, "max_grad_norm": 1.0,
           "max_length": None, "n_train": 32, "nonlinearity": "relu", "optimizer": "adafactor", "reduction": 16,
           "relative_step": False, "scale_parameter": True, "schedule": "linear", "size": None, "steps": 1000,
           "train_template": None, "warmup_init": False, "warmup_ratio": 0.06, "weight_decay": 0.0, "zero_up": True}


def run(seed, method, train, accuracy, *, preset="paper", k=0, task="rte"):
    config = {"task": task, "method": method, "model": "m", "template": "t0", "seed": seed, "k": k, "preset": preset}
    if train is not None:
        config["train"] = train
    return {"run_id": f"{method}-{seed}-{json.dumps(train, sort_keys=True)}", "status": "finished", "task": task,
            "method": method, "model": "m", "template": "t0", "seed": seed, "k": k, "preset": preset,
            "accuracy": accuracy, "infer_flops_per_example": 1e11 if train else 1e12,
            "train_flops": 1e15 if train else 0.0, "config": config, "finished_at": float(seed)}


def summary(runs) -> dict:
    return {row[1]: row for row in summary_table(runs).rows}


def test_scale_parameter_ablation_gets_its_own_cell():
    off = {**ADAPTER, "scale_parameter": False}
    runs = [run(0, "adapter", ADAPTER, 0.5), run(1, "adapter", ADAPTER, 0.7),
            run(0, "adapter", off, 0.9), run(1, "adapter", off, 0.8), run(0, "icl", {}, 0.4, k=4)]
    rows = summary(runs)
    assert list(rows) == ["icl", "adapter scale_parameter=false", "adapter scale_parameter=true"]
    assert rows["adapter scale_parameter=true"][5] == "60.0" and rows["adapter scale_parameter=true"][-1] == "2"
    assert rows["adapter scale_parameter=false"][5] == "85.0" and rows["adapter scale_parameter=false"][-1] == "2"
    trained = [g for _, g, _ in groups(runs) if g.method == "adapter"]
    assert [g.train for g in trained] == ["scale_parameter=false", "scale_parameter=true"]
    assert [r[1] for r in break_even_table(runs).rows] == ["adapter scale_parameter=false",
                                                          "adapter scale_parameter=true"]
    # several keys: sorted by key, compact numbers; variants ordered by value (numbers numerically)
    more = runs + [run(2, "adapter", {**off, "lr": 3e-4}, 0.6)]
    assert list(summary(more))[1:] == ["adapter lr=0.0003 scale_parameter=false",
                                       "adapter lr=0.003 scale_parameter=false",
                                       "adapter lr=0.003 scale_parameter=true"]


def defaults(method, preset="paper") -> dict:
    """A run's stored settings at the method's current defaults (lists as JSON gives them back)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in method_defaults(method, preset).items()}


def test_equal_settings_keep_todays_labels():
    lora, quick = defaults("lora"), defaults("lora", "quick")
    assert (quick["steps"], quick["batch_size"]) != (lora["steps"], lora["batch_size"])
    runs = [run(0, "adapter", ADAPTER, 0.5), run(1, "adapter", dict(ADAPTER), 0.7), run(0, "icl", {}, 0.4, k=4),
            run(0, "zeroshot", None, 0.3), run(0, "lora", lora, 0.5), run(0, "lora", quick, 0.6, preset="quick")]
    df = with_groups(runs)
    assert df["group_train"].isna().all() and (df["train_rank"] == 0).all()
    # the quick preset's steps and batch size are explained by the preset: not repeated in the label
    assert list(summary(runs)) == ["icl", "zeroshot", "adapter", "lora preset=paper", "lora preset=quick"]
    assert summary(runs)["adapter"][5] == "60.0"


def test_a_setting_missing_from_older_runs_is_at_the_default():
    old = {k: v for k, v in ADAPTER.items() if k != "zero_up"}
    assert list(summary([run(0, "adapter", ADAPTER, 0.5), run(1, "adapter", old, 0.7)])) == ["adapter"]
    # intrinsic_said's LATER_ARGS (update, embedding) are left out of the stored settings at their defaults
    said = {"lr": 0.03, "steps": 1000}
    assert list(summary([run(0, "intrinsic_said", {**said, "embedding": False}, 0.5),
                         run(1, "intrinsic_said", said, 0.7)])) == ["intrinsic_said"]
    assert list(summary([run(0, "intrinsic_said", {**said, "embedding": True}, 0.5),
                         run(1, "intrinsic_said", said, 0.7)])) == ["intrinsic_said embedding=false",
                                                                    "intrinsic_said embedding=true"]
    # a method the registry does not know: a missing key takes the most common value present
    mystery = [run(0, "mystery", {"x": 1}, 0.5), run(1, "mystery", {"x": 1}, 0.5), run(2, "mystery", {}, 0.5)]
    assert list(summary(mystery)) == ["mystery"]
    assert {k: v[-1] for k, v in summary([*mystery, run(3, "mystery", {"x": 2}, 0.5)]).items()} == {
        "mystery x=1": "3", "mystery x=2": "1"}


def test_a_cell_run_only_off_the_default_is_labelled():
    """Every run of a cell at scale_parameter=false (no default runs beside them): the label still says so, so the
    cell is never read as the method's default; a cell at the defaults keeps its bare name."""
    off = {**ADAPTER, "scale_parameter": False}
    assert list(summary([run(0, "adapter", off, 0.5), run(1, "adapter", dict(off), 0.7)])) == [
        "adapter scale_parameter=false"]
    assert list(summary([run(0, "adapter", ADAPTER, 0.5), run(1, "adapter", dict(ADAPTER), 0.7)])) == ["adapter"]
    # a default of None is resolved per run (AdaLoRA's total_step: the run's steps): never off the default
    ada = defaults("adalora")
    assert ada["total_step"] is None
    assert list(summary([run(0, "adalora", {**ada, "total_step": 1000}, 0.5)])) == ["adalora"]
    assert list(summary([run(0, "adalora", {**ada, "total_step": 1000, "init_r": 6}, 0.5)])) == ["adalora init_r=6"]
    # mixed: a key varying within the cell and one off the default everywhere are both named
    runs = [run(0, "adapter", {**off, "lr": 1e-3}, 0.5), run(1, "adapter", {**off, "lr": 3e-3}, 0.7)]
    assert list(summary(runs)) == ["adapter lr=0.001 scale_parameter=false", "adapter lr=0.003 scale_parameter=false"]


def test_fmt_setting():
    assert [fmt_setting(v) for v in (True, False, None, 0.0003, 1e-05, 16.0, 1000, ["lm", "ul"], "relu")] == [
        "true", "false", "none", "0.0003", "1e-05", "16", "1000", "lm|ul", "relu"]
    assert fmt_setting(0.1234567891) == "0.1234567891"  # never rounded into another value


def _write(store, train, n_correct, seed):
    config = {"task": "rte", "method": "adapter", "model": "m", "template": "t0", "seed": seed, "k": 0,
              "preset": "paper", "limit": None, "dtype": "float32", "device": "cpu", "kv_cache": True, "train": train}
    run_id = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    examples = [ExampleScore(f"e{i}", 0, [-1.0, -2.0] if i < n_correct else [-2.0, -1.0], [1, 1], [3, 3])
                for i in range(10)]
    store.write(RunResult(run_id, config, "finished", {"n_eval": 10, "accuracy": n_correct / 10,
                                                        "accuracy_norm": n_correct / 10,
                                                        "accuracy_norm_char": n_correct / 10}, examples))


def test_compare_selects_training_settings(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    old = {k: v for k, v in ADAPTER.items() if k != "zero_up"}  # a stored-before run: zero_up at its default
    for seed in (0, 1):
        _write(store, old, 5, seed)
        _write(store, {**ADAPTER, "scale_parameter": False}, 9, seed)
    path = str(tmp_path / "s.sqlite")
    pooled = CliRunner().invoke(main, ["compare", "adapter", "adapter", "--store", path])
    assert pooled.exit_code == 2 and "scale_parameter=false" in pooled.output and "--train-a" in pooled.output
    res = CliRunner().invoke(main, ["compare", "adapter", "adapter", "--train-a", "scale_parameter=false",
                                    "--train-b", "scale_parameter=true,zero_up=true", "--store", path])
    assert res.exit_code == 0, res.output
    assert "accuracy adapter [scale_parameter=false]: 90.0" in res.output
    assert "accuracy adapter [scale_parameter=true,zero_up=true]: 50.0" in res.output
    none = CliRunner().invoke(main, ["compare", "adapter", "adapter", "--train-a", "lr=0.1",
                                     "--train-b", "scale_parameter=true", "--store", path])
    assert none.exit_code == 2 and "with training settings lr=0.1" in none.output
