"""Run identity: what re-runs a finished run and what does not (issue "numbers users can trust").

Each row of IDENTITY_CASES changes one input of a plan (the task file, the data, the model file, the code's
scoring version, a setting) and says whether the run ids must change. Plans are built without loading a model;
one slow test checks the store end to end with the real model.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from harness import api, identity
from harness.errors import HarnessError
from harness.store import Store

TASK_YAML = Path(__file__).resolve().parents[1] / "tasks" / "cb.yaml"


@pytest.fixture
def world(tmp_path, data_dir):
    """A private copy of cb (task file + data) and a fake weights file, so every input can be edited."""
    tasks, data = tmp_path / "tasks", tmp_path / "data"
    tasks.mkdir()
    (tasks / "cb.yaml").write_text(TASK_YAML.read_text())
    shutil.copytree(data_dir / "cb", data / "cb")
    weights = tmp_path / "models" / "tiny.gguf"
    weights.parent.mkdir()
    weights.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    return {"task": tasks / "cb.yaml", "data": data, "weights": weights, "root": tmp_path}


def _ids(world, methods=("zeroshot", "icl", "lora"), **overrides) -> dict:
    args = dict(seeds=[0], templates="all", preset="quick", limit=4, k=2, data_dir=world["data"],
                model=str(world["weights"]), device="cpu", dtype="float32")
    args.update(overrides)
    specs = api.plan([str(world["task"])], list(methods), **args)
    return {(s.method, s.template, s.seed): s.run_id for s in specs}


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def _replace_row(path: Path, line: int, old: str, new: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    assert old in lines[line]
    lines[line] = lines[line].replace(old, new, 1)
    path.write_text("".join(lines))


def _move_weights(world):
    moved = world["root"] / "elsewhere" / "tiny.gguf"
    moved.parent.mkdir()
    shutil.copy(world["weights"], moved)
    world["weights"] = moved


# (what changed, how, which methods' runs must re-run; the others must keep their ids)
IDENTITY_CASES = [
    ("nothing", lambda w: None, set()),
    ("fewshot_delimiter", lambda w: _edit(w["task"], 'fewshot_delimiter: "\\n\\n"', 'fewshot_delimiter: "\\n"'),
     {"zeroshot", "icl", "lora"}),
    ("description only", lambda w: _edit(w["task"], "description: CommitmentBank", "description: CB"), set()),
    ("a YAML comment", lambda w: w["task"].write_text("# a comment\n" + w["task"].read_text()), set()),
    ("one template's answer word", lambda w: _edit(w["task"], '"Neither"', '"Maybe"'), {"zeroshot", "icl", "lora"}),
    ("an evaluation row", lambda w: _replace_row(w["data"] / "cb" / "validation.jsonl", 0, '"premise": "',
                                                 '"premise": "So '), {"zeroshot", "icl", "lora"}),
    ("an evaluation row past --limit", lambda w: _replace_row(w["data"] / "cb" / "validation.jsonl", 10,
                                                              '"premise": "', '"premise": "So '), set()),
    ("a few-shot row (demonstration and training)",
     lambda w: _replace_row(w["data"] / "cb" / "few_shot" / "0_seed.jsonl", 0, '"premise": "', '"premise": "So '),
     {"icl", "lora"}),
    ("T-Few subset file removed (seeded fallback sample)",
     lambda w: (w["data"] / "cb" / "few_shot" / "0_seed.jsonl").unlink(), {"icl", "lora"}),
    ("model weights", lambda w: w["weights"].write_bytes(w["weights"].read_bytes() + b"\0"),
     {"zeroshot", "icl", "lora"}),
    ("same weights at another path", _move_weights, set()),
]


@pytest.mark.parametrize("what,change,reruns", IDENTITY_CASES, ids=[c[0] for c in IDENTITY_CASES])
def test_what_changes_the_run_id(world, what, change, reruns):
    before = _ids(world)
    change(world)
    after = _ids(world)
    assert before.keys() == after.keys()
    changed = {key[0] for key in before if before[key] != after[key]}
    kept = {key[0] for key in before if before[key] == after[key]}
    assert changed == reruns, what
    assert kept == {"zeroshot", "icl", "lora"} - reruns, what


def test_scoring_version_changes_every_id(world, monkeypatch):
    before = _ids(world)
    monkeypatch.setattr(identity, "SCORING_VERSION", identity.SCORING_VERSION + 1)
    after = _ids(world)
    assert all(before[key] != after[key] for key in before)


def test_settings_that_cannot_change_numbers_keep_ids(world):
    assert _ids(world) == _ids(world, methods=("zeroshot", "icl", "lora"))
    assert _ids(world, limit=4) != _ids(world, limit=5)  # a different evaluation set


def test_model_is_shown_by_file_name_not_path(world):
    specs = api.plan([str(world["task"])], ["zeroshot"], seeds=[0], preset="quick", limit=2,
                     data_dir=world["data"], model=str(world["weights"]), device="cpu", dtype="float32")
    assert {s.model for s in specs} == {"tiny.gguf"}
    assert {s.model_path for s in specs} == {str(world["weights"])}
    assert all(s.model_fingerprint.startswith("sha256:") for s in specs)


def test_spec_records_the_task_text_so_nothing_reloads_it_by_name(world):
    specs = api.plan([str(world["task"])], ["zeroshot"], seeds=[0], preset="quick", limit=2,
                     data_dir=world["data"], model=str(world["weights"]), device="cpu", dtype="float32")
    world["task"].unlink()  # the file is gone: runs, eval and reports still know the task
    task = specs[0].load_task()
    assert task.name == "cb" and task.fingerprint() == specs[0].task_hash


def test_rendering_errors_are_caught_before_any_model_load(world, monkeypatch):
    import harness.models

    monkeypatch.setattr(harness.models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    _edit(world["task"], "{{ hypothesis | trim }}", "{{ hypothesys | trim }}")
    with pytest.raises(HarnessError) as error:
        _ids(world)
    message = str(error.value)
    assert "\n" not in message and "hypothesys" in message and "cb" in message


def test_a_label_outside_the_choices_is_caught_in_training_rows(world):
    _replace_row(world["data"] / "cb" / "few_shot" / "0_seed.jsonl", 0, '"label": ', '"label": 7, "x": ')
    with pytest.raises(HarnessError) as error:
        _ids(world, methods=("lora",))
    assert "7" in str(error.value) and "\n" not in str(error.value)
    _ids(world, methods=("zeroshot",))  # zero-shot reads no training rows: fine


def test_two_task_files_with_one_name_are_refused(world):
    other = world["root"] / "other" / "cb.yaml"
    other.parent.mkdir()
    other.write_text(world["task"].read_text().replace('"Neither"', '"Maybe"'))
    with pytest.raises(HarnessError, match="two different task files"):
        api.plan([str(world["task"]), str(other)], ["zeroshot"], seeds=[0], preset="quick", limit=2,
                 data_dir=world["data"], model=str(world["weights"]), device="cpu", dtype="float32")


def test_model_fingerprint_is_cached_and_follows_content(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "w.gguf"
    weights.write_bytes(b"a" * 1000)
    first = identity.model_fingerprint(str(weights))
    assert (tmp_path / "cache" / "fingerprints.json").is_file()
    calls = []
    monkeypatch.setattr(identity.hashlib, "sha256", lambda *a: calls.append(a) or pytest.fail("re-hashed"))
    assert identity.model_fingerprint(str(weights)) == first  # from the cache
    monkeypatch.undo()
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    weights.write_bytes(b"b" * 1000)
    assert identity.model_fingerprint(str(weights)) != first
    assert identity.model_fingerprint("random:smollm2-135m").startswith("random:")


@pytest.mark.slow
def test_store_reruns_a_changed_task_and_skips_an_unchanged_one(world, smollm):
    """End to end: the fewshot_delimiter change that once printed "0 executed, 5 already in store"."""
    store = Store(world["root"] / "s.sqlite")

    def go():
        specs = api.plan([str(world["task"])], ["icl"], seeds=[0], templates="gpt3_style", preset="quick",
                         limit=2, k=2, data_dir=world["data"], device="cpu", dtype="float32")
        return api.run(specs, store=store, data_dir=world["data"], progress=False, loader=lambda spec: smollm)

    first = go()
    assert [r.status for r in first] == ["finished"], first[0].error
    assert go() == []  # unchanged: skipped
    _edit(world["task"], 'fewshot_delimiter: "\\n\\n"', 'fewshot_delimiter: "\\n###\\n"')
    again = go()
    assert len(again) == 1 and again[0].status == "finished"
    assert len(store.runs()) == 2  # the old run is kept, not overwritten


def test_a_harness_copied_into_another_repository_records_no_foreign_commit(tmp_path):
    """git_commit() is the harness checkout's commit, never that of a repository that merely encloses a copy."""
    import subprocess
    import sys

    repo = tmp_path / "user-repo"
    shutil.copytree(Path(__file__).resolve().parents[1] / "harness", repo / "vendor" / "harness",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q",
                    "--allow-empty", "-m", "user"], check=True)
    code = "from harness import environment as e; print(e.checkout_root(), e.git_commit())"
    out = subprocess.run([sys.executable, "-c", code], cwd=repo / "vendor", capture_output=True, text=True,
                         env={"PYTHONPATH": str(repo / "vendor"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "None"]


def test_the_harness_checkout_records_its_commit():
    from harness import environment

    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not running from a git checkout")
    assert environment.checkout_root() == root
    assert environment.git_commit() and len(environment.git_commit().removesuffix("-dirty")) == 40


def test_reports_use_only_the_latest_run_of_an_experiment():
    """A re-run after an input changed supersedes the old run in reports (never pooled into one median)."""
    from harness.report.tables import select_runs

    def run(run_id, task_hash, finished_at, accuracy, template="t"):
        config = {"task": "cb", "method": "icl", "template": template, "seed": 0, "k": 2, "model": "m",
                  "task_hash": task_hash, "scoring_version": 2}
        return {"run_id": run_id, "status": "finished", "task": "cb", "method": "icl", "template": template,
                "seed": 0, "k": 2, "model": "m", "config": config, "finished_at": finished_at, "accuracy": accuracy}

    runs = [run("old", "a", 1.0, 0.1), run("new", "b", 2.0, 0.9), run("other", "a", 1.0, 0.5, template="u")]
    assert sorted(select_runs(runs)["run_id"]) == ["new", "other"]
    assert select_runs(runs, tasks=["rte"]).empty


@pytest.mark.slow
def test_a_task_given_by_path_trains_in_worker_processes(world):
    """--workers: the spawned processes get the task from the spec (its YAML text), never by name."""
    from click.testing import CliRunner

    from harness.cli import main

    renamed = world["root"] / "elsewhere" / "mycb.yaml"
    renamed.parent.mkdir()
    renamed.write_text(world["task"].read_text().replace("name: cb", "name: mycb"))
    (world["data"] / "mycb").symlink_to(world["data"] / "cb")
    store = world["root"] / "w.sqlite"
    args = ["run", "--methods", "ia3,lora", "--tasks", str(renamed), "--seeds", "0", "--templates", "gpt3_style",
            "--preset", "quick", "--steps", "2", "--train-batch-size", "2", "--limit", "2", "--data-dir",
            str(world["data"]), "--workers", "2", "--store", str(store), "--quiet"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    runs = Store(store).runs()
    assert [(r["task"], r["status"]) for r in runs] == [("mycb", "finished")] * 2
    assert all(r["env"].get("workers") == 2 for r in runs)


def test_a_changed_flops_formula_changes_only_that_methods_ids():
    # dora, oft, compacter and ptuning store other FLOPs since their per-forward-call work is counted
    # (MethodInfo.costs_version 1): their old runs must not be served as new; every other id stays the same
    from harness.methods import get_method
    from harness.spec import RunSpec

    assert {m: get_method(m).costs_version for m in ("dora", "oft", "compacter", "ptuning", "lora", "ia3")} == \
        {"dora": 1, "oft": 2, "compacter": 1, "ptuning": 1, "lora": 0, "ia3": 0}  # oft 2: coft's projection
    old = RunSpec(task="cb", method="dora", template="t", seed=0, k=0, model="m")
    new = dataclasses.replace(old, costs_version=1)
    assert "costs_version" not in old.identity() and new.identity()["costs_version"] == 1
    assert old.run_id != new.run_id


def test_encoder_decoder_flops_accounting_changes_only_encoder_decoder_peft_ids(tmp_path):
    # PEFT runs on an encoder-decoder store FLOPs with the per-token overhead split by stack (SEQ2SEQ_COSTS_VERSION):
    # their old runs must not be served as new; causal models' and in-context runs' ids stay the same
    from harness import api, identity

    assert identity.is_encoder_decoder("random:t5-small") and identity.is_encoder_decoder("random:t0-3b")
    assert not identity.is_encoder_decoder("random:smollm2-135m") and not identity.is_encoder_decoder("smollm2-135m")
    folder = tmp_path / "t5-folder"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "t5"}')
    assert identity.is_encoder_decoder(str(folder))
    for model, expected in (("random:t5-small", identity.SEQ2SEQ_COSTS_VERSION), ("random:smollm2-135m", 0)):
        specs = api.plan(["cb"], ["lora", "icl"], templates=["gpt3_style"], seeds=[0], k=2, model=model, limit=2,
                         preset="quick", device="cpu")
        by_method = {s.method: s for s in specs}
        assert by_method["lora"].seq2seq_costs == expected and by_method["icl"].seq2seq_costs == 0
        assert ("seq2seq_costs" in by_method["lora"].identity()) == bool(expected)


def test_adafactor_runs_on_cuda_hash_the_optimizer_version(world, monkeypatch):
    """harness.optim's Adafactor (CUDA only) has its own version in the ids of the runs it trains: a change in
    how it batches its reductions re-runs them; every CPU run and every other optimizer's run keeps its id."""
    cpu = api.plan([str(world["task"])], ["ia3", "lora", "icl"], seeds=[0], templates="all", preset="quick", limit=4,
                   k=2, data_dir=world["data"], model=str(world["weights"]), device="cpu", dtype="float32")
    assert {s.optimizer_version for s in cpu} == {0} and all("optimizer_version" not in s.identity() for s in cpu)
    settings = {s.method: dict(s.train) for s in cpu}
    assert identity.optimizer_version("cuda", settings["ia3"]) == identity.CUDA_ADAFACTOR_VERSION >= 1
    assert identity.optimizer_version("cuda", settings["lora"]) == 0  # AdamW
    assert identity.optimizer_version("cpu", settings["ia3"]) == 0  # transformers' Adafactor
    ia3 = next(s for s in cpu if s.method == "ia3")
    on_cuda = dataclasses.replace(ia3, device="cuda", optimizer_version=identity.CUDA_ADAFACTOR_VERSION)
    assert on_cuda.run_id != dataclasses.replace(ia3, device="cuda").run_id
    # a plan made by a harness with another optimizer version is refused before anything loads (Ray workers)
    monkeypatch.setattr(identity, "CUDA_ADAFACTOR_VERSION", identity.CUDA_ADAFACTOR_VERSION + 1)
    with pytest.raises(HarnessError, match="optimizer version"):
        api.check_inputs([on_cuda], world["data"])
