"""Declarative task definitions: load ``tasks/<name>.yaml`` files and render examples into prompts.

A task file (modelled on lm-evaluation-harness's task YAMLs) says where the data lives, which fields hold the
label and the id, and lists prompt templates. Adding a task or a template needs no Python. The README's "Tasks
are data" section documents every field with worked examples. This module validates a task file (every problem
is a one-line error naming the file and the field; the field checks are in :mod:`harness.task_fields`) and builds
the :class:`Task`, which renders examples with its templates. The template format (Jinja2 ``input`` and choices,
per-example choices through ``choices_field``, partial scoring, ``label_map``, ``filters``), :class:`Prompt` and
:class:`Template` are in :mod:`harness.templates`; ``Prompt``, ``Template`` and ``lower_first`` are re-exported
here, so ``from harness.tasks import Prompt`` keeps working.

k-shot contexts are ``demonstrations(...) + prompt.context`` (:meth:`Task.demonstrations`), where
demonstrations are joined by, and end with, the task's ``fewshot_delimiter``, as in lm-evaluation-harness.

Task files are found by name in the folders of ``$HARNESS_TASKS_DIR`` (os.pathsep-separated, searched first, so
a task there shadows a built-in of the same name) and then in the built-in folder (``tasks/`` of the source
tree, shipped in the wheel as the package data ``harness/builtin_tasks``).
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

import yaml

from harness.errors import HarnessError, suggest
from harness.task_fields import _check_keys, _choices_field, _fail, _filters, _label_map, _string, _string_list
from harness.templates import (  # Prompt, Template, lower_first and the template constants: re-exported
    CHOICE_VARIABLES, OPTIONAL_TEMPLATE_FIELDS, REQUIRED_TEMPLATE_FIELDS, TEMPLATE_NAME_PATTERN, Prompt, Template,
    _template_from_mapping, lower_first,
)

__all__ = [
    "CHOICE_VARIABLES", "EXAMPLE_ROLES", "OPTIONAL_TASK_FIELDS", "OPTIONAL_TEMPLATE_FIELDS", "REQUIRED_TASK_FIELDS",
    "REQUIRED_TEMPLATE_FIELDS", "TASKS_DIR_ENV", "TASK_NAME_PATTERN", "TEMPLATE_NAME_PATTERN", "Prompt", "Task",
    "Template", "builtin_tasks_dir", "find_task_file", "list_tasks", "load_task", "lower_first", "task_from_text",
    "tasks_dir", "tasks_dirs",
]

TASKS_DIR_ENV = "HARNESS_TASKS_DIR"
TASK_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]+$")
REQUIRED_TASK_FIELDS = (
    "name", "description", "hub", "local", "eval_split", "train_split", "label_field", "id_field",
    "fewshot_delimiter", "target_delimiter", "templates",
)
OPTIONAL_TASK_FIELDS = ("label_names", "choices_field", "label_map", "filters")
EXAMPLE_ROLES = ("evaluation", "demonstration", "training")


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
    label_names: tuple[str, ...]  # () when choices_field gives the choices and the task names no labels
    fewshot_delimiter: str
    templates: tuple[Template, ...]
    source: str = dataclass_field(default="", compare=False, repr=False)  # the YAML text it was parsed from
    choices_field: str | tuple[str, ...] | None = None  # a list field, or fields gathered into a list
    label_map: dict[str, int] | None = dataclass_field(default=None, hash=False)  # raw label (as str) -> index
    filters: tuple[tuple[str, str], ...] = ()  # (regex, replacement) applied in order to every rendered string

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

    def render(self, template: Template, example: dict, role: str = "") -> Prompt:
        """Render ``example`` with ``template`` using this task's fields; an error is one line naming the task
        file, the template, the example id (qualified by ``role`` when given) and the field."""
        try:
            return template.render(example, label_field=self.label_field, id_field=self.id_field,
                                   choices_field=self.choices_field, label_map=self.label_map,
                                   filters=self.filters, label_names=self.label_names, role=role)
        except HarnessError as error:
            raise HarnessError(f"{_display(self.path)}: {error}") from None

    def check_examples(self, examples: list[dict], role: str) -> None:
        """Render every template on every example (cheap: no tokenizer, no model) and raise the first problem
        as a one-line HarnessError naming the file, template, ``role`` example id and field. ``role`` is
        "evaluation", "demonstration" or "training"; the last two also need every example labelled."""
        if role not in EXAMPLE_ROLES:
            raise ValueError(f"role must be one of {', '.join(EXAMPLE_ROLES)}, got {role!r}")
        for example in examples:
            for template in self.templates:
                prompt = self.render(template, example, role=role)
                if role != "evaluation" and prompt.label < 0:
                    raise self._unlabelled(template, prompt, role)

    def _unlabelled(self, template: Template, prompt: Prompt, role: str) -> HarnessError:
        return HarnessError(f"{_display(self.path)}: template {template.name!r}, {role} example "
                            f"{prompt.example_id!r}: field {self.label_field!r} is unlabelled (-1); "
                            f"{role} examples need a label")

    def demonstrations(self, template: Template, examples: list[dict], labels: list[int] | None = None) -> str:
        """The k-shot prefix: each example's context plus its correct choice (for partial scoring: the correct
        choice's context plus the shared continuation), joined by and ending with the few-shot delimiter, so that
        a k-shot context is ``prefix + prompt.context``. "" for no examples. ``labels`` (one per example) shows
        those choices instead of the correct ones (label noise, :mod:`harness.demos`)."""
        demos = []
        for i, example in enumerate(examples):
            prompt = self.render(template, example, role="demonstration")
            if prompt.label < 0:
                raise self._unlabelled(template, prompt, "demonstration")
            context, continuation = prompt.pairs()[prompt.label if labels is None else labels[i]]
            demos.append(context + continuation)
        return "".join(demo + self.fewshot_delimiter for demo in demos)


# --------------------------------------------------------------------------------------------- loading

def builtin_tasks_dir() -> Path:
    """The built-in task folder: ``harness/builtin_tasks`` in an installed wheel, else ``tasks/`` of the source
    tree (a checkout or an editable install)."""
    here = Path(__file__).resolve().parent
    packaged = here / "builtin_tasks"
    return packaged if packaged.is_dir() else here.parent / "tasks"


def tasks_dir() -> Path:
    """The built-in task folder (kept under its old name; :func:`tasks_dirs` lists every folder searched)."""
    return builtin_tasks_dir()


def tasks_dirs() -> list[Path]:
    """Folders searched for a task by name, in order: those of ``$HARNESS_TASKS_DIR`` (os.pathsep-separated),
    then the built-in folder. The first folder holding ``<name>.yaml`` wins, so a task in HARNESS_TASKS_DIR
    shadows a built-in of the same name."""
    extra = []
    for entry in os.environ.get(TASKS_DIR_ENV, "").split(os.pathsep):
        if entry.strip():
            folder = Path(entry.strip()).expanduser()
            if not folder.is_dir():
                raise HarnessError(f"{TASKS_DIR_ENV} names {entry.strip()!r}, which is not a folder; set it to "
                                   f"folders of task YAMLs separated by {os.pathsep!r}, or unset it.")
            extra.append(folder)
    return [*extra, builtin_tasks_dir()]


def _yaml_files(folder: Path) -> dict[str, Path]:
    """``{stem: path}`` of the task YAMLs in ``folder`` (.yaml before .yml)."""
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for suffix in (".yml", ".yaml"):  # .yaml last, so it wins over a .yml of the same stem
        found.update({p.stem: p for p in folder.iterdir() if p.suffix == suffix and p.is_file()})
    return found


def list_tasks(directory: Path | None = None) -> list[str]:
    """Names (file stems) of the task YAMLs in ``directory``, or by default in every folder of
    :func:`tasks_dirs` (built-ins and HARNESS_TASKS_DIR), sorted and without repeats."""
    folders = [Path(directory)] if directory is not None else tasks_dirs()
    return sorted({name for folder in folders for name in _yaml_files(folder)})


def find_task_file(name: str, directory: Path | None = None) -> Path | None:
    """The YAML that ``load_task(name)`` would read: the first folder of :func:`tasks_dirs` (or ``directory``)
    that holds ``<name>.yaml``; None if none does."""
    for folder in ([Path(directory)] if directory is not None else tasks_dirs()):
        path = _yaml_files(folder).get(name)
        if path is not None:
            return path
    return None


def load_task(name_or_path: str, directory: Path | None = None) -> Task:
    """Load a task by name (from ``directory``, default the folders of :func:`tasks_dirs`) or from a path to a
    YAML file."""
    text = str(name_or_path)
    looks_like_path = text.endswith((".yaml", ".yml")) or os.sep in text or "/" in text
    if looks_like_path:
        path = Path(text).expanduser()
        if not path.is_file():
            raise HarnessError(f"task file {text!r} does not exist. Pass a task name "
                               f"({', '.join(list_tasks(directory)) or 'none found'}) or a path to a .yaml file.")
        return _load_file(path, expected_name=None)
    candidate = find_task_file(text, directory)
    if candidate is not None:
        return _load_file(candidate, expected_name=text)
    known = list_tasks(directory)
    if not known:
        folders = [Path(directory)] if directory is not None else tasks_dirs()
        raise HarnessError(f"unknown task {text!r}: no task files in {', '.join(_display(f) for f in folders)}. "
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
    _check_keys(raw, REQUIRED_TASK_FIELDS, OPTIONAL_TASK_FIELDS, where, "")
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
    choices_field = _choices_field(raw["choices_field"], where) if "choices_field" in raw else None
    label_names: tuple[str, ...] = ()
    if "label_names" in raw:
        label_names = _string_list(raw["label_names"], where, "label_names")
        if len(label_names) < 2 or len(set(label_names)) != len(label_names):
            raise _fail(where, "label_names", "must list at least two distinct names")
    elif choices_field is None:
        raise _fail(where, "label_names", "is missing (it may be left out only when choices_field gives "
                                          "per-example choices)")
    if isinstance(choices_field, tuple) and label_names and len(label_names) != len(choices_field):
        raise _fail(where, "label_names", f"must have one name per field of choices_field "
                                          f"({len(choices_field)}), got {len(label_names)}")
    label_map = _label_map(raw["label_map"], len(label_names) or (
        len(choices_field) if isinstance(choices_field, tuple) else 0), where) if "label_map" in raw else None
    filters = _filters(raw["filters"], where) if "filters" in raw else ()
    fewshot_delimiter = _string(raw, "fewshot_delimiter", where, "fewshot_delimiter", allow_empty=True)
    target_delimiter = _string(raw, "target_delimiter", where, "target_delimiter", allow_empty=True)

    raw_templates = raw["templates"]
    if not isinstance(raw_templates, list) or not raw_templates:
        raise _fail(where, "templates", "must be a non-empty list of templates")
    templates = tuple(
        _template_from_mapping(item, index, target_delimiter, len(label_names), choices_field is not None, where)
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
        choices_field=choices_field, label_map=label_map, filters=filters,
    )
