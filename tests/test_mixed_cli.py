"""``harness mixed`` (issue 16) end to end on the real embedded model and real data: ``harness run`` trains (IA)3 and
LoRA adapters on cb and rte (one step at a high learning rate, so every adapter is far from the identity) and
scores ICL into a temporary store; ``harness mixed`` serves the same queries mixed, task by task and merged, and
its rows in ``mixed_runs`` must reproduce the single-task scores (float32, 1e-4); served with the other task's
adapter they would not. Bad input is one line and exit 2 before any model loads; the report gets its section."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.mixed.records import mixed_rows
from harness.store import Store

TASKS = "cb,rte"
LIMIT = 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A store with finished ia3, lora and icl runs of cb and rte (seed 0, gpt3_style), then `harness mixed` on
    it: (store path, the command's result)."""
    store = tmp_path_factory.mktemp("mixed") / "s.sqlite"
    run = CliRunner().invoke(main, [
        "run", "--methods", "ia3,lora,icl", "--tasks", TASKS, "--templates", "gpt3_style", "--seeds", "0",
        "--preset", "quick", "--limit", str(LIMIT), "--steps", "1", "--train-batch-size", "1", "--lr", "0.05",
        "--method-args", "warmup_ratio=0", "--k", "2", "--device", "cpu", "--store", str(store),
        "--data-dir", str(data_dir), "--quiet"], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    mixed = CliRunner().invoke(main, ["mixed", "--methods", "ia3,lora,icl", "--tasks", TASKS, "--store", str(store),
                                      "--batch-size", "4", "--data-dir", str(data_dir), "--quiet"],
                               catch_exceptions=False)
    return store, mixed


def test_mixed_rows_reproduce_single_task_scores(trained):
    store, result = trained
    assert result.exit_code == 0, result.output
    rows = {(r["method"], r["mode"]): r for r in mixed_rows(Store(store))}
    assert set(rows) == {("ia3", "mixed"), ("ia3", "task_by_task"), ("ia3", "merged"), ("lora", "mixed"),
                         ("lora", "task_by_task"), ("lora", "merged"), ("icl", "mixed"), ("icl", "task_by_task")}
    runs = {(r["method"], r["task"]): r["run_id"] for r in Store(store).runs()}
    for (method, mode), r in rows.items():
        assert r["dtype"] == "float32" and r["n_tasks"] == 2 and r["n_examples"] == 2 * LIMIT
        assert r["run_ids"] == {"cb": runs[(method, "cb")], "rte": runs[(method, "rte")]}
        assert r["examples_per_second"] > 0 and r["flops_per_example"] > 1e9 and r["peak_memory_bytes"] > 1e8
        assert 0 < r["latency_median_s"] <= r["latency_p90_s"] and r["setup_seconds"] >= 0
        # the equality check: float32 on the CPU, as the runs were scored (merging rounds a little differently)
        assert r["max_abs_diff"] <= (1e-4 if mode != "merged" else 1e-3), (method, mode, r["max_abs_diff"])
    for method in ("ia3", "lora", "icl"):
        assert rows[(method, "mixed")]["tasks_per_batch"] > 1.5  # batches of 4 really hold both tasks
        assert rows[(method, "task_by_task")]["tasks_per_batch"] == 1
        # all tasks' adapters (or prefix caches) held at once: more than one task's
        assert rows[(method, "mixed")]["state_bytes"] > rows[(method, "task_by_task")]["state_bytes"] > 0
    assert rows[("ia3", "merged")]["state_bytes"] == 0
    # merged weights have no adapter overhead per token
    assert rows[("lora", "merged")]["flops_per_example"] < rows[("lora", "mixed")]["flops_per_example"]
    assert "ia3" in result.output and "task_by_task" in result.output


def test_wrong_adapter_would_fail_the_check(trained, smollm, data_dir):
    """The check has teeth: serving cb's queries with rte's adapter (and back) moves the scores far past 1e-4."""
    from harness.costs import ModelDims
    from harness.mixed.execute import stored_scores, task_inputs
    from harness.mixed.modes import max_abs_diff, serve_mixed
    from harness.mixed.plan import plan_mixed

    store, _ = trained
    db = Store(store)
    plan = plan_mixed(db, ["ia3"], ["cb", "rte"])[0]
    inputs = task_inputs(smollm, plan, LIMIT, data_dir)
    right = serve_mixed(smollm.model, smollm.tokenizer, plan.kind, inputs, 4, ModelDims.from_model(smollm.model))
    assert max_abs_diff(right.examples, stored_scores(db, plan)) <= 1e-4
    inputs[0].folder, inputs[1].folder = inputs[1].folder, inputs[0].folder
    wrong = serve_mixed(smollm.model, smollm.tokenizer, plan.kind, inputs, 4, ModelDims.from_model(smollm.model))
    assert max_abs_diff(wrong.examples, stored_scores(db, plan)) > 1e-2


def test_report_has_the_mixed_section(trained, tmp_path):
    store, _ = trained
    result = CliRunner().invoke(main, ["report", "--store", str(store), "--out", str(tmp_path), "--no-plots",
                                       "--format", "both"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report.md").read_text()
    section = text[text.index("Mixed-task batches"):]
    for method in ("ia3", "lora", "icl"):
        assert f"| {method} " in section
    assert "Mixed / task-by-task" in section and "x |" in section
    assert "Mixed-task batches" in (tmp_path / "report.tex").read_text()


def test_report_without_mixed_runs_has_no_section(tmp_path):
    from harness.report.mixed import mixed_table

    assert mixed_table([]) is None
    row = {"mixed_id": "a", "method": "lora", "mode": "mixed", "n_tasks": 2, "device": "cpu", "dtype": "float32",
           "examples_per_second": 6.0, "peak_memory_bytes": 2e9, "state_bytes": 4e6, "flops_per_example": 2e10,
           "max_abs_diff": 1e-5}
    table = mixed_table([row, row | {"mode": "task_by_task", "examples_per_second": 4.0, "peak_memory_bytes": 1e9},
                         row | {"mixed_id": "old", "examples_per_second": 1.0}], methods=["lora", "full"])
    (cells,) = table.rows
    assert cells[:3] == ("lora", "yes", "2") and cells[6] == "1.50x" and cells[9] == "2.00x"
    assert any("full" in note for note in table.notes)


@pytest.mark.parametrize("args,needle", [
    (["--methods", "lroa"], "Did you mean 'lora'"),
    (["--methods", "bitfit"], "cannot be mixed by `harness mixed`; mixable: lora, ia3, tfew, prompt_tuning, icl"),
    (["--methods", "ia3", "--tasks", "cb,copa"], "no finished ia3 runs for cb, copa"),
    (["--methods", "icl", "--seed", "7"], "harness run --methods icl --tasks rte,cb --seeds 7"),
    (["--methods", "ia3", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--methods", "ia3", "--device", "tpu"], "unknown --device"),
])
def test_bad_input_is_one_line_exit_2_before_any_model_loads(args, needle, tmp_path, monkeypatch):
    import harness.models

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(harness.models, "load_model", no_load)
    store = tmp_path / "s.sqlite"
    Store(store)
    result = CliRunner().invoke(main, ["mixed", "--store", str(store), *args], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("Error")]) == 1


def test_missing_store_and_help():
    result = CliRunner().invoke(main, ["mixed", "--store", "/nonexistent/s.sqlite"])
    assert result.exit_code == 2 and "no results store at /nonexistent/s.sqlite" in result.output
    result = CliRunner().invoke(main, ["mixed", "--help"])
    assert result.exit_code == 0 and "mixed-task batches" in result.output and "--batch-size" in result.output


def test_equality_check_names_the_rows_over_the_tolerance():
    from harness.mixed.execute import failed_checks

    rows = [{"method": "lora", "mode": "mixed", "dtype": "float32", "max_abs_diff": 3e-3},
            {"method": "lora", "mode": "merged", "dtype": "float32", "max_abs_diff": 3e-3},
            {"method": "ia3", "mode": "mixed", "dtype": "bfloat16", "max_abs_diff": 3e-2},
            {"method": "icl", "mode": "task_by_task", "dtype": "float32", "max_abs_diff": float("nan")}]
    assert [line.split(":")[0] for line in failed_checks(rows)] == ["lora mixed", "icl task_by_task"]
