"""The task format's T-Few shapes (per-example choices, partial scoring, label_map, filters), load-time validation
of their fields, one-line rendering errors and Task.check_examples; on the fixtures in tests/fixtures/tasks/
(HellaSwag- and Winogrande-shaped made-up rows) and on the real SuperGLUE copies (COPA, WSC)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from harness.data import load_split, builtin_data_dir
from harness.errors import HarnessError
from harness.tasks import Prompt, _display, load_task, tasks_dir

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tasks"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATA_DIR = SHARED_DATA if SHARED_DATA.is_dir() else builtin_data_dir()  # else the byte-identical embedded copy
HELLASWAG = _display(FIXTURES / "hellaswag_mini.yaml")  # as errors show it: relative to the working directory
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"local SuperGLUE copies not found at {DATA_DIR}")


@pytest.fixture(autouse=True)
def _no_harness_env(monkeypatch):
    monkeypatch.delenv("HARNESS_TASKS_DIR", raising=False)
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)


def fixture_task(name: str):
    return load_task(str(FIXTURES / f"{name}.yaml"))


def linked_data(tmp_path: Path, **links: str) -> Path:
    """A data folder whose ``<task>/`` entries link to real task folders (copa_list -> copa, ...)."""
    for task, real in links.items():
        (tmp_path / task).symlink_to(DATA_DIR / real, target_is_directory=True)
    return tmp_path


def rows_of(task_name: str, *files: str) -> list[dict]:
    return [json.loads(line) for file in files for line in (DATA_DIR / task_name / file).read_text().splitlines()
            if line.strip()]


# ------------------------------------------------------------------------------------------ HellaSwag shape

def lm_eval_hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's hellaswag clean-up (lm_eval/tasks/hellaswag/utils.py), restated for the test."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def test_hellaswag_matches_lm_eval_with_per_example_choices():
    task = fixture_task("hellaswag_mini")
    assert task.choices_field == "endings" and task.label_names == ()
    template = task.template("lm_eval")
    rows = load_split(task, "validation", FIXTURES)
    counts = set()
    for row in rows:
        prompt = task.render(template, row)
        query = lm_eval_hellaswag_preprocess(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
        assert prompt.context == query
        assert prompt.choices == tuple(" " + lm_eval_hellaswag_preprocess(e) for e in row["endings"])
        assert prompt.label == int(row["label"]) and prompt.example_id == str(row["ind"])
        assert prompt.n_chars == tuple(len(lm_eval_hellaswag_preprocess(e)) for e in row["endings"])
        assert "[" not in prompt.context and "  " not in prompt.context
        counts.add(len(prompt.choices))
    assert counts == {3, 4}  # the number of choices differs per example
    letters = task.render(task.template("letters"), rows[2])
    assert letters.choices == (" A", " B", " C") and letters.context.endswith("C. aims carefully and throws a "
                                                                              "dart at the board.\nAnswer:")


def test_hellaswag_label_map_reads_string_labels():
    task = fixture_task("hellaswag_mini")
    row = load_split(task, "validation", FIXTURES)[0]
    assert [task.render(task.templates[0], {**row, "label": str(i)}).label for i in range(4)] == [0, 1, 2, 3]
    assert task.render(task.templates[0], {**row, "label": ""}).label == -1  # the test split's unlabelled rows
    with pytest.raises(HarnessError) as caught:
        task.render(task.templates[0], {**row, "label": "7"})
    assert str(caught.value) == (f"{HELLASWAG}: template 'lm_eval', example '11': field "
                                 "'label' is '7', which label_map does not map (it maps '0', '1', '2', '3', '')")
    three = load_split(task, "validation", FIXTURES)[2]  # 3 endings: label_map's 3 is outside them
    with pytest.raises(HarnessError, match=r"example '13': field 'label' is '3' \(label_map gives 3\), not a "
                                           r"choice: a label is an integer in \[0, 3\)"):
        task.render(task.templates[0], {**three, "label": "3"})


# ------------------------------------------------------------------------------------------ Winogrande shape

def test_winogrande_partial_scoring_is_lm_evals():
    task = fixture_task("winogrande_mini")
    partial, ordinary = task.template("partial"), task.template("fill_in")
    for row in load_split(task, "validation", FIXTURES):
        prompt = task.render(partial, row)
        blank = row["sentence"].index("_")
        # lm-eval's partial_context per option and partial_target after the target delimiter
        assert prompt.contexts == tuple(row["sentence"][:blank] + row[o] for o in ("option1", "option2"))
        target = " " + row["sentence"][blank + 1:].strip()
        assert prompt.choices == (target, target) and prompt.partial
        assert prompt.pairs() == tuple((c, target) for c in prompt.contexts)
        assert prompt.n_chars == (len(target) - 1,) * 2
        assert prompt.label == int(row["answer"]) - 1  # label_map {"1": 0, "2": 1}
        assert prompt.context == max(prompt.contexts, key=len)
        plain = task.render(ordinary, row)
        assert plain.choices == (" " + row["option1"], " " + row["option2"]) and not plain.partial
    demos = load_split(task, "train", FIXTURES)[:2]
    prefix = task.demonstrations(partial, demos)
    expected = [row["sentence"][:row["sentence"].index("_")] + row["option" + row["answer"]] + " "
                + row["sentence"][row["sentence"].index("_") + 1:].strip() for row in demos]
    assert prefix == "".join(e + "\n\n" for e in expected)


# ------------------------------------------------------------------------------------------ real data: COPA, WSC

@needs_data
def test_copa_as_a_choice_list_renders_as_copa(tmp_path):
    copa, copa_list = load_task("copa"), fixture_task("copa_list")
    assert copa_list.choices_field == ("choice1", "choice2")
    data = linked_data(tmp_path, copa_list="copa")
    rows = load_split(copa_list, "validation", data) + rows_of("copa", "few_shot/0_seed.jsonl")
    assert len(rows) == 132
    for a, b in zip(copa.templates, copa_list.templates):
        assert a.name == b.name
        for row in rows:
            assert copa_list.render(b, row) == copa.render(a, row)


@needs_data
def test_wsc_partial_renders_every_row():
    task = fixture_task("wsc_partial")
    rows = rows_of("wsc", "train.jsonl", "validation.jsonl", "few_shot/0_seed.jsonl")
    task.check_examples(rows, "training")
    for row in rows:
        prompt = task.render(task.templates[0], row)
        words = row["text"].split(" ")
        assert prompt.contexts[0].endswith(" " + row["span2_text"]) and prompt.contexts[1].endswith(
            " " + row["span1_text"])
        assert prompt.contexts[0][:-len(row["span2_text"])] == prompt.contexts[1][:-len(row["span1_text"])]
        # pronoun context + continuation gives the text back (a few texts end in a space, kept)
        assert prompt.contexts[0] + prompt.choices[0] in (row["text"], row["text"] + " ")
        assert prompt.choices[0].strip() and len(set(prompt.choices)) == 1
        assert prompt.label == row["label"]
    odd = task.render(task.templates[0], next(r for r in rows if r["idx"] == 42 and "safe" in r["text"]))
    assert odd.contexts[0].endswith("want to use it")  # span2_index points one word early in this row


# ------------------------------------------------------------------------------------------ one-line errors

def test_check_examples_names_file_template_role_example_and_field():
    task = fixture_task("winogrande_mini")
    rows = load_split(task, "validation", FIXTURES)
    task.check_examples(rows, "evaluation")
    where = f"{_display(FIXTURES / 'winogrande_mini.yaml')}: template 'partial', "
    sentence = rows[1]["sentence"]
    cases = [
        ({**rows[1], "answer": "3"}, "training",
         f"{where}training example {sentence!r}: field 'answer' is '3', which label_map does not map "
         f"(it maps '1', '2')"),
        ({k: v for k, v in rows[1].items() if k != "answer"}, "evaluation",
         f"{where}evaluation example {sentence!r}: field 'answer' (label_field) is missing; "
         f"the example has fields: option1, option2, sentence"),
        ({k: v for k, v in rows[1].items() if k != "option2"}, "demonstration",
         f"{where}demonstration example {sentence!r}: field 'option2' (choices_field) is missing; "
         f"the example has fields: answer, option1, sentence"),
        ({**rows[1], "sentence": "No blank here."}, "evaluation",
         f"{where}evaluation example 'No blank here.': cannot render input for choice 0: "
         f"ValueError: substring not found"),
    ]
    for row, role, message in cases:
        with pytest.raises(HarnessError) as caught:
            task.check_examples([rows[0], row], role)
        assert str(caught.value) == message
        assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="role must be one of"):
        task.check_examples(rows, "test")


def test_check_examples_unlabelled_and_undefined(tmp_path):
    task = fixture_task("hellaswag_mini")
    rows = load_split(task, "validation", FIXTURES)
    unlabelled = {**rows[0], "label": ""}
    task.check_examples([unlabelled], "evaluation")  # unlabelled rows may be evaluated (scored, not counted)
    with pytest.raises(HarnessError) as caught:
        task.check_examples([rows[1], unlabelled], "demonstration")
    assert str(caught.value) == (f"{HELLASWAG}: template 'lm_eval', demonstration "
                                 "example '11': field 'label' is unlabelled (-1); demonstration examples need a label")
    with pytest.raises(HarnessError, match=r"hellaswag_mini.yaml: template 'lm_eval', training example '12': "
                                           r"field 'activity_label' is undefined \(in input\); the example has "
                                           r"fields: ctx, ctx_a"):
        task.check_examples([{k: v for k, v in rows[1].items() if k != "activity_label"}], "training")
    with pytest.raises(HarnessError, match=r"template 'lm_eval', evaluation example '12': field 'endings' "
                                           r"\(choices_field\) must be a list of at least two choices, got str"):
        task.check_examples([{**rows[1], "endings": "one ending"}], "evaluation")
    with pytest.raises(HarnessError, match=r"example '12': field 'endings' \(choices_field\) element 1 is int, not "
                                           r"a string; give the template a 'choice' to render it"):
        task.check_examples([{**rows[1], "endings": ["a", 3]}], "evaluation")
    with pytest.raises(HarnessError, match=r"template 'lm_eval', evaluation example '12': choice 1 renders to an "
                                           r"empty string"):
        task.check_examples([{**rows[1], "endings": ["a", " [step] "]}], "evaluation")  # emptied by the filters


@needs_data
def test_check_examples_on_real_tasks():
    cb = load_task("cb")
    cb.check_examples(rows_of("cb", "validation.jsonl"), "evaluation")
    cb.check_examples(rows_of("cb", "few_shot/0_seed.jsonl"), "training")
    row = rows_of("cb", "validation.jsonl")[5]
    with pytest.raises(HarnessError) as caught:
        cb.check_examples([{**row, "label": 3}], "evaluation")
    assert str(caught.value) == (f"{_display(tasks_dir() / 'cb.yaml')}: template 'gpt3_style', evaluation example "
                                 f"'{row['idx']}': field "
                                 f"'label' is 3, not a choice: a label is an integer in [0, 3) for this example's 3 "
                                 f"choices, or -1 for unlabelled")
    with pytest.raises(HarnessError, match=r"cb.yaml: template 'gpt3_style', evaluation example '5': field "
                                           r"'label' is 'neutral', not a choice.*; map other values with label_map"):
        cb.check_examples([{**row, "label": "neutral"}], "evaluation")


# ------------------------------------------------------------------------------------------ load-time validation

def base(**changes) -> dict:
    """A valid per-example-choices task, changed by ``changes`` (None deletes a field)."""
    definition = {
        "name": "toy", "description": "toy task", "hub": {"path": "x"},
        "local": {"train": "train.jsonl", "validation": "validation.jsonl"},
        "eval_split": "validation", "train_split": "train", "label_field": "label", "id_field": "idx",
        "choices_field": "endings", "label_map": {"0": 0, "1": 1}, "filters": [{"regex": " +", "replace": " "}],
        "fewshot_delimiter": "\n\n", "target_delimiter": " ",
        "templates": [{"name": "plain", "input": "{{ ctx }}"},
                      {"name": "partial", "input": "{{ ctx }} {{ choice }}", "continuation": "{{ rest }}"}],
    }
    for key, value in changes.items():
        if value is None:
            definition.pop(key)
        else:
            definition[key] = value
    return definition


@pytest.mark.parametrize("changes, message", [
    (dict(choices_field=["only_one"]), "field 'choices_field' must be a field name .* or a list of at least two"),
    (dict(choices_field=3), "field 'choices_field' must be a field name"),
    (dict(choices_field=None), "field 'label_names' is missing \\(it may be left out only when choices_field"),
    (dict(choices_field=["a", "b"], label_names=["x", "y", "z"]),
     "field 'label_names' must have one name per field of choices_field \\(2\\), got 3"),
    (dict(templates=[{"name": "t", "input": "{{ ctx }}", "choices": ["A", "B"]}]),
     "field 'templates\\[0\\].choices' cannot be used with the task's choices_field"),
    (dict(templates=[{"name": "t", "input": "{{ ctx }}", "choice": "{{ choice"}]),
     "template 't': field 'templates\\[0\\].choice' is not valid Jinja2"),
    (dict(templates=[{"name": "t", "input": "{{ ctx }}", "continuation": "{{ rest }}"}]),
     "field 'templates\\[0\\].input' must use \\{\\{ choice \\}\\}"),
    (dict(templates=[{"name": "t", "input": "{{ [ctx, rest][choice_index] }}", "continuation": "{{ rest }}"},
                     {"name": "t", "input": "{{ ctx }}"}]),
     "field 'templates\\[1\\].name' duplicates template name 't'"),  # choice_index alone is enough
    (dict(templates=[{"name": "t", "input": "{{ ctx }} {{ choice }}", "continuation": ""}]),
     "field 'templates\\[0\\].continuation' must be a non-empty string"),
    (dict(templates=[{"name": "t", "input": "{{ choice }}", "continuation": "{% if %}"}]),
     "field 'templates\\[0\\].continuation' is not valid Jinja2"),
    (dict(label_map={"1": "0"}), "field 'label_map.1' must be a choice index >= 0, or -1 for unlabelled \\(got '0'\\)"),
    (dict(label_map={"1": True}), "field 'label_map.1' must be a choice index"),
    (dict(label_map={"a": -2}), "field 'label_map.a' must be a choice index"),
    (dict(label_map={1: 0, "1": 1}), "field 'label_map.1' repeats a key"),
    (dict(label_map=[1, 2]), "field 'label_map' must be a non-empty mapping"),
    (dict(choices_field=["a", "b"], label_map={"1": 0, "2": 2}), "field 'label_map.2' must be a choice index in \\[0, 2\\)"),
    (dict(filters={"regex": "x"}), "field 'filters' must be a list"),
    (dict(filters=[{"regex": "("}]), "field 'filters\\[0\\].regex' is not a valid regular expression"),
    (dict(filters=[{"regex": "a", "replace": "\\1"}]), "field 'filters\\[0\\].replace' is not a valid replacement"),
    (dict(filters=[{"regex": "a", "replace": 3}]), "field 'filters\\[0\\].replace' must be a string"),
    (dict(filters=[{"regx": "a"}]), "unknown field 'filters\\[0\\].regx'. Did you mean 'filters\\[0\\].regex'"),
    (dict(filters=[{"regex": ""}]), "field 'filters\\[0\\].regex' must be a non-empty regular expression"),
    (dict(choice_field="endings"), "unknown field 'choice_field'. Did you mean 'choices_field'"),
])
def test_new_fields_are_validated(tmp_path, changes, message):
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(base(**changes), sort_keys=False))
    with pytest.raises(HarnessError, match=message) as caught:
        load_task(str(path))
    assert str(caught.value).startswith(f"{_display(path)}: ") and "\n" not in str(caught.value)


def test_choice_needs_choices_field(tmp_path):
    definition = base(choices_field=None, label_names=["a", "b"],
                      templates=[{"name": "t", "input": "{{ ctx }}", "choices": ["A", "B"], "choice": "{{ choice }}"}])
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(definition))
    with pytest.raises(HarnessError, match="field 'templates\\[0\\].choice' needs the task's choices_field"):
        load_task(str(path))


def test_fixed_choices_with_partial_scoring_and_label_map(tmp_path):
    """Fixed choices (label_names) work with a continuation too; label_map numbers compare as strings."""
    definition = base(choices_field=None, label_names=["a", "b"], label_map={1: 0, 2: 1}, filters=[],
                      templates=[{"name": "t", "input": "{{ ctx }} {{ choice }}", "choices": ["{{ a }}", "{{ b }}"],
                                  "continuation": "{{ rest }}"}])
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(definition))
    task = load_task(str(path))
    example = {"idx": 7, "ctx": "Then", "a": "it", "b": "they", "rest": "left.", "label": 2}
    assert task.render(task.templates[0], example) == Prompt(
        context="Then they", choices=(" left.", " left."), label=1, example_id="7", target_delimiter=" ",
        contexts=("Then it", "Then they"))
    assert task.render(task.templates[0], {**example, "label": "1"}).label == 0
    assert task.fingerprint() != load_task(str(FIXTURES / "winogrande_mini.yaml")).fingerprint()


def test_template_fingerprint_keeps_old_values_and_sees_new_fields():
    from harness.tasks import Template

    old = Template(name="a", input="{{ x }}", choices=("A", "B"))
    assert old.fingerprint() == "0431e433dcee312f"  # the value before choice/continuation existed
    partial = Template(name="a", input="{{ x }}", choices=("A", "B"), continuation="{{ y }}")
    per_element = Template(name="a", input="{{ x }}", choice="{{ choice }}")
    assert len({old.fingerprint(), partial.fingerprint(), per_element.fingerprint()}) == 3
