"""CLI: every command has help; bad input is one line and exit 2 before any model loads; a real end-to-end run."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from harness.cli import main
from harness.store import Store


def _commands(group, prefix=()):
    for name, command in group.commands.items():
        yield prefix + (name,)
        if hasattr(command, "commands"):
            yield from _commands(command, prefix + (name,))


@pytest.mark.parametrize("path", [()] + list(_commands(main)))
def test_every_command_has_help(path):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    command = main
    for name in path:
        command = command.commands[name]
    assert command.help, f"command {' '.join(path)} has no docstring"


@pytest.mark.parametrize("args,needle", [
    (["run", "--methods", "lroa", "--tasks", "cb"], "Did you mean 'lora'"),
    (["run", "--methods", "icl", "--tasks", "cbb"], "Did you mean 'cb'"),
    (["run", "--methods", "icl", "--tasks", "cb", "--templates", "gpt3"], "unknown cb template"),
    (["run", "--methods", "icl", "--tasks", "cb", "--seeds", "a,b"], "--seeds must be"),
    (["run", "--methods", "icl", "--tasks", "cb", "--data-dir", "/nonexistent/folder"], "/nonexistent/folder"),
    (["run", "--methods", "icl", "--tasks", "cb", "--model", "/no/such/model.gguf"], "does not exist"),
    (["run", "--methods", "icl", "--tasks", "cb", "--preset", "quik"], "Did you mean 'quick'"),
    (["run", "--methods", "icl", "--tasks", "cb", "--device", "tpu"], "unknown --device"),
    (["run", "--methods", "lora", "--tasks", "cb", "--workers", "0"], "--workers must be >= 1"),
    (["run", "--methods", "icl", "--tasks", "cb", "--k", "4,x"], "--k must be comma-separated integers"),
    (["run", "--methods", "icl", "--tasks", "cb", "--k", "0,-2"], "--k must be >= 0"),
    (["run", "--methods", "lora", "--tasks", "cb", "--calibrate"], "--calibrate applies to in-context runs"),
    (["results", "--store", "/nonexistent/store.sqlite"], "no results store"),
])
def test_bad_input_is_one_line_exit_2(args, needle, tmp_path):
    result = CliRunner().invoke(main, args + ([] if "--store" in args else []), catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert needle in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1


def test_missing_task_data_names_the_path_and_the_fix(tmp_path):
    (tmp_path / "cb").mkdir()
    result = CliRunner().invoke(main, ["run", "--methods", "icl", "--tasks", "cb", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert str(tmp_path / "cb") in result.output and "--data-dir" in result.output


def test_malformed_task_file_names_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((__import__("pathlib").Path(__file__).parents[1] / "tasks" / "cb.yaml").read_text()
                   .replace("label_field: label", "label_field: [1, 2]").replace("name: cb", "name: bad"))
    result = CliRunner().invoke(main, ["run", "--methods", "icl", "--tasks", str(bad)])
    assert result.exit_code == 2
    assert "bad.yaml" in result.output and "label_field" in result.output


@pytest.mark.slow
def test_end_to_end_icl_and_zeroshot_on_real_cb(tmp_path, data_dir):
    store = tmp_path / "s.sqlite"
    args = ["run", "--methods", "icl,zeroshot", "--tasks", "cb", "--seeds", "0,1", "--templates", "gpt3_style",
            "--k", "4", "--limit", "8", "--store", str(store), "--data-dir", str(data_dir), "--quiet"]
    first = CliRunner().invoke(main, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    runs = Store(store).runs()
    # icl: 2 seeds; zeroshot is seed-independent: 1 run
    assert sorted((r["method"], r["seed"]) for r in runs) == [("icl", 0), ("icl", 1), ("zeroshot", 0)]
    for r in runs:
        assert r["status"] == "finished" and r["n_eval"] == 8
        assert 0.0 <= r["accuracy"] <= 1.0
    icl = [r for r in runs if r["method"] == "icl"]
    zs = [r for r in runs if r["method"] == "zeroshot"][0]
    for r in icl:  # demonstrations cached once: far cheaper than re-encoding them per query x choice
        assert r["infer_flops_per_example"] < r["infer_flops_per_example_uncached"] / 2
        assert r["checkpoint_bytes"] > 0 and r["k_used"] == 4
    assert zs["checkpoint_bytes"] == 0 and zs["trainable_params"] == 0
    assert icl[0]["infer_flops_per_example"] > zs["infer_flops_per_example"]
    # same command again: everything skipped, nothing changes
    again = CliRunner().invoke(main, args, catch_exceptions=False)
    assert again.exit_code == 0 and "0 executed" in again.output
    assert len(Store(store).runs()) == 3
    # results as JSON carry the documented fields
    out = CliRunner().invoke(main, ["results", "--store", str(store), "--format", "json"])
    rows = json.loads(out.output)
    for key in ("run_id", "task", "method", "model", "template", "seed", "k", "n_eval", "accuracy", "accuracy_norm",
                "infer_flops_per_example", "infer_flops_per_example_uncached", "train_flops", "peak_memory_bytes",
                "checkpoint_bytes", "trainable_params", "seconds", "status"):
        assert key in rows[0]
    # per-example export
    out = CliRunner().invoke(main, ["export", "--store", str(store), "--format", "jsonl"])
    lines = [json.loads(x) for x in out.output.splitlines()]
    assert len(lines) == 24
    assert len(lines[0]["choices"]) == 3 and {"logprob", "n_tokens"} <= set(lines[0]["choices"][0])
    # accuracy recomputes from the exported rows
    for r in runs:
        mine = [x for x in lines if x["run_id"] == r["run_id"]]
        assert sum(x["prediction"] == x["label"] for x in mine) / 8 == r["accuracy"]


def test_methods_lists_family_merges_and_mixed_batches():
    from harness.methods import list_methods

    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[0].split()
    assert header[:3] == ["method", "kind", "family"] and "merges" in header
    for info in list_methods():
        line = next(line for line in result.output.splitlines() if line.split()[:1] == [info.name])
        assert info.family in line
    assert "peft:<type>" in result.output and "--params" in result.output


@pytest.mark.slow
def test_methods_with_a_model_counts_trainable_parameters_or_says_why_not(smollm):
    from harness.methods.describe import describe_methods

    text = describe_methods(smollm.model, "smollm2-135m")
    rows = {line.split()[0]: line for line in text.splitlines()[2:] if line.strip()}
    assert "n/a (" in rows["bitfit"] and "bias" in rows["bitfit"]
    assert "460.8K (0.343%)" in rows["lora"] and "134.5M (100%)" in rows["full"]
    assert "269.0K (0.2%)" in rows["fishmask"]
