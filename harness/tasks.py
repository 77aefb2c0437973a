"""Declarative task definitions: load ``tasks/<name>.yaml`` files and render examples into prompts.

A task file (modelled on lm-evaluation-harness's task YAMLs) says where the data lives, which fields hold the
label and the id, and lists prompt templates. Adding a task or a template needs no Python. Each template is a
Jinja2 ``input`` plus one Jinja2 string per label in ``choices``, both rendered with the example's fields under
``StrictUndefined`` (a missing field is an error, not an empty string). Templates may use the harness filter
``lower_first`` (lower-case the first letter unless the first word is "I" or an acronym).

Conventions, as in lm-evaluation-harness: a rendered ``context`` never ends in whitespace; every choice starts
with the task's ``target_delimiter`` (it belongs to the continuation that is scored); k-shot contexts are
``demonstrations(...) + prompt.context``, where demonstrations are joined by, and end with, ``fewshot_delimiter``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import yaml

from harness.errors import HarnessError, suggest

TASKS_DIR_ENV = "HARNESS_TASKS_DIR"
TEMPLATE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]+$")
TASK_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]+$")
REQUIRED_TASK_FIELDS = (
    "name", "description", "hub", "local", "eval_split", "train_split", "label_field", "id_field",
    "label_names", "fewshot_delimiter", "target_delimiter", "templates",
)
OPTIONAL_TEMPLATE_FIELDS = ("target_delimiter",)
REQUIRED_TEMPLATE_FIELDS = ("name", "input", "choices")


# --------------------------------------------------------------------------------------------- Jinja2 plumbing

def lower_first(text: str) -> str:
    """Lower-case the first letter of ``text`` unless its first word is "I" or an all-caps acronym ("TV")."""
    first_word = re.match(r"[A-Za-z]+", text)
    if not text or first_word is None or first_word.start() != 0:
        return text
    word = first_word.group(0)
    if word == "I" or (len(word) > 1 and word.isupper()):
        return text
    return text[0].lower() + text[1:]


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    """The (immutable, sandboxed) Jinja2 environment every template is compiled in."""
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False,
    )
    environment.filters["lower_first"] = lower_first
    return environment


@functools.lru_cache(maxsize=1024)
def _compile(source: str) -> jinja2.Template:
    """Compile one Jinja2 source string (memoised: a pure function of ``source``)."""
    return _environment().from_string(source)


def _syntax_error(source: str) -> str | None:
    """Return a one-line description of the Jinja2 syntax error in ``source``, or None if it compiles."""
    try:
        _environment().parse(source)
    except jinja2.TemplateSyntaxError as error:
        return f"{error.message} (line {error.lineno})"
    return None


# --------------------------------------------------------------------------------------------- data classes

@dataclass(frozen=True)
class Prompt:
    """One example rendered with one template."""

    context: str                # rendered input, no trailing whitespace
    choices: tuple[str, ...]    # continuations, each prefixed with the target delimiter, indexed by label
    label: int                  # index into ``choices``; -1 for an unlabelled example
    example_id: str             # str(example[id_field])


@dataclass(frozen=True)
class Template:
    """A prompt template: a Jinja2 input and one Jinja2 continuation per label."""

    name: str
    input: str
    choices: tuple[str, ...]
    target_delimiter: str = " "

    def render(self, example: dict, label_field: str = "label", id_field: str = "idx") -> Prompt:
        """Render ``example`` into a :class:`Prompt`; a missing field or bad label raises HarnessError."""
        try:
            context = _compile(self.input).render(example)
            choices = tuple(self.target_delimiter + _compile(choice).render(example) for choice in self.choices)
        except jinja2.UndefinedError as error:
            raise HarnessError(
                f"template {self.name!r} cannot render example {example.get(id_field, '?')!r}: {error.message}. "
                f"The example has fields: {', '.join(sorted(example))}."
            ) from None
        if id_field not in example:
            raise HarnessError(f"template {self.name!r}: example has no id field {id_field!r}; "
                               f"it has fields: {', '.join(sorted(example))}.")
        label = _label_of(example, label_field, len(choices), self.name)
        return Prompt(context=context, choices=choices, label=label, example_id=str(example[id_field]))

    def fingerprint(self) -> str:
        """A short sha256 of the definition (input, choices, delimiter); the name is not part of it."""
        definition = {"input": self.input, "choices": list(self.choices), "target_delimiter": self.target_delimiter}
        blob = json.dumps(definition, sort_keys=True, ensure_ascii=False).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]


def _label_of(example: dict, label_field: str, n_choices: int, template_name: str) -> int:
    """The example's integer label, checked against the number of choices (-1 means unlabelled)."""
    if label_field not in example:
        raise HarnessError(f"template {template_name!r}: example {example.get('idx', '?')!r} has no label field "
                           f"{label_field!r}; it has fields: {', '.join(sorted(example))}.")
    label = example[label_field]
    if isinstance(label, bool) or not isinstance(label, int) or not -1 <= label < n_choices:
        raise HarnessError(f"template {template_name!r}: label {label!r} is not an integer in "
                           f"[0, {n_choices}) (or -1 for unlabelled).")
    return label


@dataclass(frozen=True)
class Task:
    """A task loaded from a YAML file."""

    name: str
    path: Path
    description: str
    hub_path: str
    hub_config: str | None
    local_files: dict[str, str] = dataclass_field(hash=False)
    eval_split: str
    train_split: str
    label_field: str
    id_field: str
    label_names: tuple[str, ...]
    fewshot_delimiter: str
    templates: tuple[Template, ...]
    source: str = dataclass_field(default="", compare=False, repr=False)  # the YAML text it was parsed from

    def fingerprint(self) -> str:
        """16 hex digits of sha256 over the normalized definition: the parsed YAML with every field but
        ``description`` (comments, key order and formatting do not count; any value that can change a number does)."""
        raw = yaml.safe_load(self.source) if self.source else {}
        definition = {key: value for key, value in (raw or {}).items() if key != "description"}
        blob = json.dumps(definition, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]

    def template(self, name: str) -> Template:
        """The template called ``name``; an unknown name raises an error naming the closest ones."""
        for template in self.templates:
            if template.name == name:
                return template
        raise suggest(name, [t.name for t in self.templates], f"{self.name} template")

    def select_templates(self, names: str | list[str] | None) -> list[Template]:
        """Templates by name: None or "all" gives all of them; a comma-separated string or a list picks some."""
        if names is None or names == "all" or names == ["all"]:
            return list(self.templates)
        wanted = names.split(",") if isinstance(names, str) else list(names)
        cleaned = list(dict.fromkeys(name.strip() for name in wanted if name.strip()))
        if not cleaned:
            raise HarnessError(f"no templates selected for task {self.name!r}; pass names or 'all'. "
                               f"Known: {', '.join(t.name for t in self.templates)}.")
        return [self.template(name) for name in cleaned]

    def render(self, template: Template, example: dict) -> Prompt:
        """Render ``example`` with ``template`` using this task's label and id fields."""
        try:
            return template.render(example, label_field=self.label_field, id_field=self.id_field)
        except HarnessError as error:
            raise HarnessError(f"task {self.name!r} ({_display(self.path)}): {error}") from None

    def demonstrations(self, template: Template, examples: list[dict]) -> str:
        """The k-shot prefix: each example's context plus its correct choice, joined by and ending with the
        few-shot delimiter, so that a k-shot context is ``prefix + prompt.context``. "" for no examples."""
        demos = []
        for example in examples:
            prompt = self.render(template, example)
            if prompt.label < 0:
                raise HarnessError(f"task {self.name!r}: demonstration {prompt.example_id!r} has no label.")
            demos.append(prompt.context + prompt.choices[prompt.label])
        return "".join(demo + self.fewshot_delimiter for demo in demos)


# --------------------------------------------------------------------------------------------- loading

def tasks_dir() -> Path:
    """The folder holding task YAMLs: ``$HARNESS_TASKS_DIR`` if set, else ``tasks/`` at the repository root."""
    override = os.environ.get(TASKS_DIR_ENV)
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parent.parent / "tasks"


def list_tasks(directory: Path | None = None) -> list[str]:
    """Names (file stems) of the task YAMLs in ``directory`` (default :func:`tasks_dir`), sorted."""
    folder = Path(directory) if directory is not None else tasks_dir()
    if not folder.is_dir():
        return []
    return sorted({p.stem for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()})


def load_task(name_or_path: str, directory: Path | None = None) -> Task:
    """Load a task by name (from ``directory``, default :func:`tasks_dir`) or from a path to a YAML file."""
    text = str(name_or_path)
    looks_like_path = text.endswith((".yaml", ".yml")) or os.sep in text or "/" in text
    if looks_like_path:
        path = Path(text).expanduser()
        if not path.is_file():
            raise HarnessError(f"task file {text!r} does not exist. Pass a task name "
                               f"({', '.join(list_tasks(directory)) or 'none found'}) or a path to a .yaml file.")
        return _load_file(path, expected_name=None)
    folder = Path(directory) if directory is not None else tasks_dir()
    for suffix in (".yaml", ".yml"):
        candidate = folder / f"{text}{suffix}"
        if candidate.is_file():
            return _load_file(candidate, expected_name=text)
    known = list_tasks(folder)
    if not known:
        raise HarnessError(f"unknown task {text!r}: no task files in {_display(folder)}. "
                           f"Set {TASKS_DIR_ENV} to a folder of task YAMLs or pass a path to a .yaml file.")
    raise suggest(text, known, "task")


def _display(path: Path) -> str:
    """``path`` relative to the working directory when it lies under it, else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _load_file(path: Path, expected_name: str | None) -> Task:
    """Parse and validate one task YAML into a :class:`Task`."""
    where = _display(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise HarnessError(f"{where}: not valid YAML{at}: {problem}") from None
    except OSError as error:
        raise HarnessError(f"{where}: cannot read task file: {error.strerror}") from None
    task = _task_from_mapping(raw, path, where, source=path.read_text(encoding="utf-8"))
    if expected_name is not None and task.name != expected_name:
        raise HarnessError(f"{where}: field 'name' is {task.name!r} but the file is {path.name}; "
                           f"make them match.")
    return task


def _fail(where: str, field: str, requirement: str) -> HarnessError:
    """The standard malformed-file error."""
    return HarnessError(f"{where}: field {field!r} {requirement}")


def _check_keys(mapping: dict, required: tuple[str, ...], optional: tuple[str, ...], where: str, prefix: str) -> None:
    """Every required key present; no unknown keys (with a suggestion for typos)."""
    allowed = required + optional
    for key in mapping:  # unknown keys first, so a typo gets a suggestion rather than "missing"
        if key not in allowed:
            raise HarnessError(f"{where}: {suggest(prefix + str(key), [prefix + k for k in allowed], 'field')}")
    for key in required:
        if key not in mapping:
            raise _fail(where, prefix + key, "is missing")


def _string(mapping: dict, key: str, where: str, field: str, *, allow_empty: bool = False) -> str:
    """``mapping[key]`` as a string (non-empty unless ``allow_empty``)."""
    value = mapping[key]
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise _fail(where, field, "must be a string" if allow_empty else "must be a non-empty string")
    return value


def _string_list(value: Any, where: str, field: str) -> tuple[str, ...]:
    """``value`` as a non-empty tuple of non-empty strings."""
    if (not isinstance(value, list) or not value
            or not all(isinstance(item, str) and item.strip() for item in value)):
        raise _fail(where, field, "must be a non-empty list of strings")
    return tuple(value)


def _jinja(source: str, where: str, field: str, template_name: str) -> str:
    """``source`` checked for Jinja2 syntax errors."""
    problem = _syntax_error(source)
    if problem is not None:
        raise HarnessError(f"{where}: template {template_name!r}: field {field!r} is not valid Jinja2: {problem}")
    return source


def _template_from_mapping(raw: Any, index: int, default_delimiter: str, n_labels: int, where: str) -> Template:
    """Validate ``templates[index]``."""
    prefix = f"templates[{index}]"
    if not isinstance(raw, dict):
        raise _fail(where, prefix, "must be a mapping with keys name, input, choices")
    _check_keys(raw, REQUIRED_TEMPLATE_FIELDS, OPTIONAL_TEMPLATE_FIELDS, where, prefix + ".")
    name = _string(raw, "name", where, f"{prefix}.name")
    if not TEMPLATE_NAME_PATTERN.match(name):
        raise _fail(where, f"{prefix}.name", f"must use only letters, digits, '_', '-', '.' (got {name!r})")
    source = _string(raw, "input", where, f"{prefix}.input")
    if source != source.rstrip():
        raise _fail(where, f"{prefix}.input", "must not end with whitespace (the space before the answer "
                                              "belongs to the continuation: see target_delimiter)")
    _jinja(source, where, f"{prefix}.input", name)
    choices = _string_list(raw["choices"], where, f"{prefix}.choices")
    if len(choices) != n_labels:
        raise _fail(where, f"{prefix}.choices", f"must have one entry per label ({n_labels}, as label_names), "
                                                f"got {len(choices)}")
    for position, choice in enumerate(choices):
        _jinja(choice, where, f"{prefix}.choices[{position}]", name)
    delimiter = raw.get("target_delimiter", default_delimiter)
    if not isinstance(delimiter, str):
        raise _fail(where, f"{prefix}.target_delimiter", "must be a string")
    return Template(name=name, input=source, choices=choices, target_delimiter=delimiter)


def task_from_text(text: str, origin: str = "<task>") -> Task:
    """A task from its YAML ``text`` (as recorded with every run), memoised; ``origin`` names it in errors."""
    return _task_from_text(text, origin)


@functools.lru_cache(maxsize=64)
def _task_from_text(text: str, origin: str) -> Task:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise HarnessError(f"{origin}: not valid YAML: {str(error).splitlines()[0]}") from None
    return _task_from_mapping(raw, Path(origin), origin, source=text)


def _task_from_mapping(raw: Any, path: Path, where: str, source: str = "") -> Task:
    """Validate a parsed task file and build the :class:`Task`."""
    if not isinstance(raw, dict):
        raise HarnessError(f"{where}: a task file must be a YAML mapping with fields {', '.join(REQUIRED_TASK_FIELDS)}")
    _check_keys(raw, REQUIRED_TASK_FIELDS, (), where, "")
    name = _string(raw, "name", where, "name")
    if not TASK_NAME_PATTERN.match(name):
        raise _fail(where, "name", f"must use only letters, digits, '_', '-', '.' (got {name!r})")
    description = _string(raw, "description", where, "description")

    hub = raw["hub"]
    if not isinstance(hub, dict):
        raise _fail(where, "hub", "must be a mapping {path: ..., config: ...}")
    _check_keys(hub, ("path",), ("config",), where, "hub.")
    hub_path = _string(hub, "path", where, "hub.path")
    hub_config = hub.get("config")
    if hub_config is not None and (not isinstance(hub_config, str) or not hub_config.strip()):
        raise _fail(where, "hub.config", "must be a non-empty string or null")

    splits = {key: _string(raw, key, where, key) for key in ("eval_split", "train_split")}
    local = raw["local"]
    if not isinstance(local, dict) or not local:
        raise _fail(where, "local", "must be a mapping of split name to file, e.g. {train: train.jsonl}")
    local_files = {}
    for split, file in local.items():
        if not isinstance(split, str) or not isinstance(file, str) or not file.strip():
            raise _fail(where, f"local.{split}", "must be a file name relative to <data_dir>/<name>/")
        local_files[split] = file
    for key, split in splits.items():
        if split not in local_files:
            raise _fail(where, "local", f"has no entry for {key} {split!r}")
    if "few_shot" in local_files and "{seed}" not in local_files["few_shot"]:
        raise _fail(where, "local.few_shot", "must contain '{seed}', e.g. 'few_shot/{seed}_seed.jsonl'")

    label_field = _string(raw, "label_field", where, "label_field")
    id_field = _string(raw, "id_field", where, "id_field")
    label_names = _string_list(raw["label_names"], where, "label_names")
    if len(label_names) < 2 or len(set(label_names)) != len(label_names):
        raise _fail(where, "label_names", "must list at least two distinct names")
    fewshot_delimiter = _string(raw, "fewshot_delimiter", where, "fewshot_delimiter", allow_empty=True)
    target_delimiter = _string(raw, "target_delimiter", where, "target_delimiter", allow_empty=True)

    raw_templates = raw["templates"]
    if not isinstance(raw_templates, list) or not raw_templates:
        raise _fail(where, "templates", "must be a non-empty list of templates")
    templates = tuple(
        _template_from_mapping(item, index, target_delimiter, len(label_names), where)
        for index, item in enumerate(raw_templates)
    )
    seen: set[str] = set()
    for index, template in enumerate(templates):
        if template.name in seen:
            raise _fail(where, f"templates[{index}].name", f"duplicates template name {template.name!r}")
        seen.add(template.name)

    return Task(
        name=name, path=path, description=description, hub_path=hub_path, hub_config=hub_config,
        local_files=local_files, eval_split=splits["eval_split"], train_split=splits["train_split"],
        label_field=label_field, id_field=id_field, label_names=label_names,
        fewshot_delimiter=fewshot_delimiter, templates=templates, source=source,
    )
