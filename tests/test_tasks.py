"""Tests for harness.tasks: the real task YAMLs render the real data, and malformed task files fail clearly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harness.data import builtin_data_dir
import yaml

from harness.errors import HarnessError
from harness.tasks import Prompt, Task, Template, list_tasks, load_task, lower_first, tasks_dir, tasks_dirs

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATA_DIR = SHARED_DATA if SHARED_DATA.is_dir() else builtin_data_dir()  # else the byte-identical embedded copy
TASK_NAMES = ["cb", "copa", "rte", "wic", "wsc"]
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"local SuperGLUE copies not found at {DATA_DIR}")


@pytest.fixture(autouse=True)
def _no_harness_env(monkeypatch):
    """Run against the repository's tasks/ folder whatever the caller's environment says."""
    monkeypatch.delenv("HARNESS_TASKS_DIR", raising=False)
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)


def read_rows(task: str, file: str) -> list[dict]:
    """Rows of ``<DATA_DIR>/<task>/<file>``."""
    with open(DATA_DIR / task / file, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ------------------------------------------------------------------------------------------ the real task files

def test_all_tasks_listed():
    assert set(TASK_NAMES) <= set(list_tasks())
    assert tasks_dir() == Path(__file__).resolve().parents[1] / "tasks"


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_files_are_complete(name):
    task = load_task(name)
    assert task.name == name
    assert task.path.name == f"{name}.yaml"
    assert len(task.templates) >= 3
    assert len({t.name for t in task.templates}) == len(task.templates)
    assert task.eval_split == "validation" and task.train_split == "train"
    assert task.hub_path == "super_glue"
    assert task.hub_config == ("wsc.fixed" if name == "wsc" else name)
    assert task.local_files["few_shot"] == "few_shot/{seed}_seed.jsonl"
    for template in task.templates:
        assert template.input == template.input.rstrip()
        assert len(template.choices) == len(task.label_names)


def test_label_names():
    assert load_task("rte").label_names == ("entailment", "not_entailment")
    assert load_task("cb").label_names == ("entailment", "contradiction", "neutral")
    assert load_task("copa").label_names == ("choice1", "choice2")
    assert load_task("wic").label_names == ("False", "True")
    assert load_task("wsc").label_names == ("False", "True")


GOLDEN = {
    "rte": Prompt(
        context="Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
                "according to the Christopher Reeve Foundation.\n"
                "Question: Christopher Reeve had an accident. True or False?\n"
                "Answer:",
        choices=(" True", " False"), label=1, example_id="0", target_delimiter=" "),
    "cb": Prompt(
        context="Valence the void-brain, Valence the virtuous valet. Why couldn't the figger choose his own "
                "portion of titanic anatomy to shaft? Did he think he was helping?\n"
                "Question: Valence was helping. True, False, or Neither?\n"
                "Answer:",
        choices=(" True", " False", " Neither"), label=1, example_id="0", target_delimiter=" "),
    "copa": Prompt(
        context="The man turned on the faucet so",
        choices=(" the toilet filled with water.", " water flowed from the spout."), label=1, example_id="0", target_delimiter=" "),
    "wic": Prompt(
        context="An emerging professional class.\n"
                "Apologizing for losing your temper, even though you were badly provoked, showed real class.\n"
                "Question: Is the word 'class' used in the same way in the two sentences above?\n"
                "Answer:",
        choices=(" No", " Yes"), label=0, example_id="0", target_delimiter=" "),
    "wsc": Prompt(
        context="Passage: Bernard , who had not told the government official that he was less than 21 when he "
                "filed for a homestead claim, did not consider that he had done anything dishonest. Still, "
                "anyone who knew that he was 19 years old could take his claim away from him .\n"
                "Question: In the passage above, does the pronoun \"him\" refer to \"anyone\"?\n"
                "Answer:",
        choices=(" No", " Yes"), label=0, example_id="0", target_delimiter=" "),
}


@needs_data
@pytest.mark.parametrize("name", TASK_NAMES)
def test_golden_first_validation_example(name):
    task = load_task(name)
    first = read_rows(name, "validation.jsonl")[0]
    assert task.render(task.templates[0], first) == GOLDEN[name]


@needs_data
def test_copa_cause_uses_because():
    task = load_task("copa")
    cause = next(row for row in read_rows("copa", "validation.jsonl") if row["question"] == "cause")
    prompt = task.render(task.template("connective"), cause)
    assert prompt.context.endswith(" because")
    assert not prompt.context.endswith(". because")


@needs_data
@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_template_renders_every_example(name):
    task = load_task(name)
    rows = read_rows(name, "validation.jsonl") + read_rows(name, "few_shot/0_seed.jsonl")
    for template in task.templates:
        for row in rows:
            prompt = task.render(template, row)
            assert len(prompt.choices) == len(task.label_names)
            assert all(choice.startswith(template.target_delimiter) for choice in prompt.choices)
            assert all(choice.strip() for choice in prompt.choices)
            assert prompt.context == prompt.context.rstrip(), (template.name, row["idx"])
            assert prompt.context and "{{" not in prompt.context
            assert prompt.label == row["label"]
            assert prompt.example_id == str(row["idx"])


@needs_data
@pytest.mark.parametrize("k", [0, 1, 4])
def test_demonstrations(k):
    task = load_task("cb")
    template = task.templates[0]
    demos = read_rows("cb", "few_shot/0_seed.jsonl")[:k]
    prefix = task.demonstrations(template, demos)
    if k == 0:
        assert prefix == ""
        return
    assert prefix.endswith(task.fewshot_delimiter)
    assert prefix.count("\nAnswer:") == k
    pieces = prefix[: -len(task.fewshot_delimiter)].split(task.fewshot_delimiter)
    assert len(pieces) == k
    for piece, row in zip(pieces, demos):
        prompt = task.render(template, row)
        assert piece == prompt.context + prompt.choices[row["label"]]


def test_fingerprint():
    a = Template(name="a", input="{{ x }}", choices=("A", "B"))
    assert a.fingerprint() == Template(name="renamed", input="{{ x }}", choices=("A", "B")).fingerprint()
    assert a.fingerprint() != Template(name="a", input="{{ x }}", choices=("A", "C")).fingerprint()
    assert a.fingerprint() != Template(name="a", input="{{ x }}", choices=("A", "B"), target_delimiter="").fingerprint()
    assert len(a.fingerprint()) == 16 and int(a.fingerprint(), 16) >= 0
    fingerprints = [t.fingerprint() for name in TASK_NAMES for t in load_task(name).templates]
    assert len(set(fingerprints)) == len(fingerprints)


def test_select_templates():
    task = load_task("rte")
    names = [t.name for t in task.templates]
    assert [t.name for t in task.select_templates(None)] == names
    assert [t.name for t in task.select_templates("all")] == names
    assert [t.name for t in task.select_templates(f"{names[1]}, {names[0]}")] == [names[1], names[0]]
    assert [t.name for t in task.select_templates([names[2]])] == [names[2]]
    with pytest.raises(HarnessError, match="Did you mean 'gpt3_style'"):
        task.select_templates("gpt3_styel")
    with pytest.raises(HarnessError, match="no templates selected"):
        task.select_templates(" , ")


def test_unknown_template_and_task_suggest():
    with pytest.raises(HarnessError, match="unknown wic template 'same_sens'. Did you mean 'same_sense'"):
        load_task("wic").template("same_sens")
    with pytest.raises(HarnessError, match="unknown task 'rtee'. Did you mean 'rte'"):
        load_task("rtee")


def test_load_by_path_and_env_adds_folders(tmp_path, monkeypatch):
    by_path = load_task(str(tasks_dir() / "rte.yaml"))
    assert by_path == load_task("rte")
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    (first / "mine.yaml").write_text(yaml.safe_dump(valid_task_dict("mine")))
    shadow = valid_task_dict("cb")
    shadow["description"] = "my own cb"
    (second / "cb.yaml").write_text(yaml.safe_dump(shadow))
    monkeypatch.setenv("HARNESS_TASKS_DIR", os.pathsep.join([str(first), "", str(second)]))
    assert tasks_dirs() == [first, second, tasks_dir()]
    assert tasks_dir() == Path(__file__).resolve().parents[1] / "tasks"  # the built-ins stay
    assert set(list_tasks()) == set(TASK_NAMES) | {"mine"}  # built-ins plus the added folders
    assert load_task("mine").name == "mine"
    assert load_task("cb").description == "my own cb"  # a task in HARNESS_TASKS_DIR wins over a built-in
    assert load_task("rte") == by_path
    with pytest.raises(HarnessError, match="does not exist"):
        load_task(str(tmp_path / "absent.yaml"))
    monkeypatch.setenv("HARNESS_TASKS_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(HarnessError, match="HARNESS_TASKS_DIR names .*nowhere.*not a folder"):
        list_tasks()


def test_render_errors():
    template = Template(name="t", input="{{ premise }} {{ missing_field }}", choices=("a", "b"))
    with pytest.raises(HarnessError, match="template 't', example '3': field 'missing_field' is undefined "
                                           "\\(in input\\); the example has fields: idx, label, premise"):
        template.render({"premise": "p", "idx": 3, "label": 0})
    ok = Template(name="t", input="{{ premise }}", choices=("a", "b"))
    with pytest.raises(HarnessError, match="example '3': field 'label' is 2, not a choice"):
        ok.render({"premise": "p", "idx": 3, "label": 2})
    with pytest.raises(HarnessError, match="example '3': field 'label' \\(label_field\\) is missing"):
        ok.render({"premise": "p", "idx": 3})
    with pytest.raises(HarnessError, match="example '\\?': field 'idx' \\(id_field\\) is missing"):
        ok.render({"premise": "p", "label": 0})
    assert ok.render({"premise": "p", "idx": 3, "label": -1}).label == -1


def test_lower_first():
    assert lower_first("The toilet filled.") == "the toilet filled."
    assert lower_first("I was thirsty.") == "I was thirsty."
    assert lower_first("I'm late.") == "I'm late."
    assert lower_first("TV broke.") == "TV broke."
    assert lower_first("A canal was built.") == "a canal was built."
    assert lower_first("") == ""


# ------------------------------------------------------------------------------------------ malformed task files

def valid_task_dict(name: str = "toy") -> dict:
    """A minimal valid task definition."""
    return {
        "name": name, "description": "toy task", "hub": {"path": "super_glue", "config": "rte"},
        "local": {"train": "train.jsonl", "validation": "validation.jsonl", "few_shot": "few_shot/{seed}_seed.jsonl"},
        "eval_split": "validation", "train_split": "train", "label_field": "label", "id_field": "idx",
        "label_names": ["yes", "no"], "fewshot_delimiter": "\n\n", "target_delimiter": " ",
        "templates": [
            {"name": "first", "input": "{{ premise }}\nAnswer:", "choices": ["Yes", "No"]},
            {"name": "second", "input": "{{ premise }}?", "choices": ["True", "False"]},
        ],
    }


def write_task(tmp_path: Path, definition: dict, name: str = "toy") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(definition, sort_keys=False))
    return path


def test_valid_fixture_loads(tmp_path):
    task = load_task(str(write_task(tmp_path, valid_task_dict())))
    assert isinstance(task, Task)
    assert [t.name for t in task.templates] == ["first", "second"]
    assert task.render(task.templates[0], {"premise": "P", "idx": 1, "label": 1}) == Prompt(
        context="P\nAnswer:", choices=(" Yes", " No"), label=1, example_id="1", target_delimiter=" ")


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["templates"][1].update(choices="True"),
     "field 'templates\\[1\\].choices' must be a non-empty list of strings"),
    (lambda d: d["templates"][1].update(choices=["True"]),
     "field 'templates\\[1\\].choices' must have one entry per label"),
    (lambda d: d.pop("label_field"), "field 'label_field' is missing"),
    (lambda d: d.update(templats=d.pop("templates")), "unknown field 'templats'. Did you mean 'templates'"),
    (lambda d: d["templates"][0].update(inptu="x"), "unknown field 'templates\\[0\\].inptu'"),
    (lambda d: d["templates"][0].update(input="{{ premise }}\nAnswer: "),
     "field 'templates\\[0\\].input' must not end with whitespace"),
    (lambda d: d.update(templates=[]), "field 'templates' must be a non-empty list"),
    (lambda d: d.update(label_names=["yes"]), "field 'label_names' must list at least two"),
    (lambda d: d["hub"].pop("path"), "field 'hub.path' is missing"),
    (lambda d: d.update(eval_split="test"), "field 'local' has no entry for eval_split 'test'"),
    (lambda d: d["local"].update(few_shot="few.jsonl"), "field 'local.few_shot' must contain"),
    (lambda d: d["templates"][1].update(name="first"), "field 'templates\\[1\\].name' duplicates"),
    (lambda d: d["templates"][1].update(name="has space"), "field 'templates\\[1\\].name' must use only"),
])
def test_malformed_fields(tmp_path, mutate, message):
    definition = valid_task_dict()
    mutate(definition)
    path = write_task(tmp_path, definition)
    with pytest.raises(HarnessError, match=message) as caught:
        load_task(str(path))
    assert str(path.name) in str(caught.value)


def test_bad_jinja_names_file_and_template(tmp_path):
    definition = valid_task_dict()
    definition["templates"][1]["input"] = "{{ premise }"
    path = write_task(tmp_path, definition)
    with pytest.raises(HarnessError, match=r"toy\.yaml: template 'second': field 'templates\[1\]\.input' "
                                           r"is not valid Jinja2"):
        load_task(str(path))
    definition = valid_task_dict()
    definition["templates"][0]["choices"] = ["{% if x %}Yes", "No"]
    with pytest.raises(HarnessError, match=r"template 'first': field 'templates\[0\]\.choices\[0\]'"):
        load_task(str(write_task(tmp_path, definition)))


def test_invalid_yaml_and_non_mapping(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(HarnessError, match="broken.yaml: not valid YAML at line"):
        load_task(str(path))
    path.write_text("- just\n- a list\n")
    with pytest.raises(HarnessError, match="broken.yaml: a task file must be a YAML mapping"):
        load_task(str(path))


def test_name_must_match_file_when_loaded_by_name(tmp_path):
    write_task(tmp_path, valid_task_dict("other"), name="toy")
    with pytest.raises(HarnessError, match="field 'name' is 'other' but the file is toy.yaml"):
        load_task("toy", directory=tmp_path)
    assert load_task(str(tmp_path / "toy.yaml")).name == "other"
