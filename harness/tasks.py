"""Declarative task definitions: load ``tasks/<name>.yaml`` files and render examples into prompts.

A task file (modelled on lm-evaluation-harness's task YAMLs) says where the data lives, which fields hold the
label and the id, and lists prompt templates. Adding a task or a template needs no Python. Each template is a
Jinja2 ``input`` plus its answer choices, all rendered with the example's fields under ``StrictUndefined`` (a
missing field is an error, not an empty string). Templates may use the harness filter ``lower_first`` (lower-case
the first letter unless the first word is "I" or an acronym). The README's "Tasks are data" section documents
every field with worked examples; in short:

- fixed choices: a template's ``choices`` lists one Jinja2 string per label (``label_names``);
- per-example choices: the task's ``choices_field`` names a list field (``endings``, HellaSwag) or a list of
  fields (``[choice1, choice2]``, COPA); a template's optional ``choice`` is a Jinja2 string rendered once per
  element with ``choice`` (the element) and ``choice_index`` (0-based) beside the example's fields;
- partial scoring (lm-evaluation-harness's Winogrande method): a template with a ``continuation`` renders its
  ``input`` once per choice (with ``choice``), and every choice is scored by the log-probability of the one
  shared continuation given that choice's context (:attr:`Prompt.contexts`);
- ``label_map`` maps raw label values (strings, 1-based numbers) to choice indices; ``filters`` are regular
  expression substitutions applied to every rendered string (HellaSwag's clean-up).

Conventions, as in lm-evaluation-harness: a rendered ``context`` never ends in whitespace; every choice starts
with the task's ``target_delimiter`` (it belongs to the continuation that is scored); k-shot contexts are
``demonstrations(...) + prompt.context``, where demonstrations are joined by, and end with, ``fewshot_delimiter``.

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

import jinja2
import jinja2.meta
import jinja2.sandbox
import yaml

from harness.errors import HarnessError, suggest

TASKS_DIR_ENV = "HARNESS_TASKS_DIR"
TEMPLATE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]+$")
TASK_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]+$")
REQUIRED_TASK_FIELDS = (
    "name", "description", "hub", "local", "eval_split", "train_split", "label_field", "id_field",
    "fewshot_delimiter", "target_delimiter", "templates",
)
OPTIONAL_TASK_FIELDS = ("label_names", "choices_field", "label_map", "filters")
REQUIRED_TEMPLATE_FIELDS = ("name", "input")
OPTIONAL_TEMPLATE_FIELDS = ("choices", "choice", "continuation", "target_delimiter")
CHOICE_VARIABLES = ("choice", "choice_index")  # what a per-choice Jinja2 string sees beside the example's fields
EXAMPLE_ROLES = ("evaluation", "demonstration", "training")


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


@functools.lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def _syntax_error(source: str) -> str | None:
    """Return a one-line description of the Jinja2 syntax error in ``source``, or None if it compiles."""
    try:
        _environment().parse(source)
    except jinja2.TemplateSyntaxError as error:
        return f"{error.message} (line {error.lineno})"
    return None


def _variables(source: str) -> set[str]:
    """The names ``source`` reads from its render context (not those it sets itself)."""
    return set(jinja2.meta.find_undeclared_variables(_environment().parse(source)))


# --------------------------------------------------------------------------------------------- data classes

@dataclass(frozen=True)
class Prompt:
    """One example rendered with one template: a list of (context, continuation) pairs, one per choice.

    Ordinary prompts share one ``context`` and differ in ``choices``. A partial-scoring prompt has a context per
    choice in ``contexts`` and the same continuation in every entry of ``choices``; its ``context`` is then the
    longest of ``contexts`` (the one length checks, such as fitting demonstrations in the model's window, need).
    """

    context: str                # rendered input, no trailing whitespace
    choices: tuple[str, ...]    # continuations, each prefixed with the target delimiter, indexed by label
    label: int                  # index into ``choices``; -1 for an unlabelled example
    example_id: str             # str(example[id_field])
    target_delimiter: str = ""  # the prefix every entry of ``choices`` starts with (not counted in n_chars)
    contexts: tuple[str, ...] = ()  # partial scoring: one context per choice; () when all share ``context``

    def __post_init__(self):
        if self.contexts and len(self.contexts) != len(self.choices):
            raise ValueError(f"prompt {self.example_id!r}: {len(self.contexts)} contexts for "
                             f"{len(self.choices)} choices")

    @property
    def partial(self) -> bool:
        """Whether every choice has a context of its own (partial scoring)."""
        return bool(self.contexts)

    def pairs(self) -> tuple[tuple[str, str], ...]:
        """(context, continuation) per choice: what the scorer and training score, and demonstrations show."""
        if self.contexts:
            return tuple(zip(self.contexts, self.choices))
        return tuple((self.context, choice) for choice in self.choices)

    @property
    def n_chars(self) -> tuple[int, ...]:
        """Characters of each choice's continuation without the target delimiter (lm-eval's acc_norm length)."""
        d = self.target_delimiter
        return tuple(len(c) - len(d) if d and c.startswith(d) else len(c) for c in self.choices)


class _Problem(Exception):
    """A rendering problem; :meth:`Template.render` adds the template and example to its message."""


def _fields_hint(example: dict) -> str:
    return f"the example has fields: {', '.join(sorted(map(str, example)))}"


def _render_source(source: str, variables: dict, where: str) -> str:
    """Render one Jinja2 string; any failure becomes a one-line :class:`_Problem` naming the field."""
    try:
        return _compile(source).render(variables)
    except jinja2.UndefinedError as error:
        message = error.message or "undefined"
        name = re.search(r"'([^']+)' is undefined|has no attribute '([^']+)'", message)
        if name is not None:
            raise _Problem(f"field {name.group(1) or name.group(2)!r} is undefined (in {where}); "
                           f"{_fields_hint(variables)}") from None
        raise _Problem(f"{message} (in {where}); {_fields_hint(variables)}") from None
    except Exception as error:  # noqa: BLE001 - a template's own expression failed (e.g. str.index of no match)
        text = " ".join(str(error).split()) or "no message"
        raise _Problem(f"cannot render {where}: {type(error).__name__}: {text}") from None


def _apply_filters(text: str, filters: tuple[tuple[str, str], ...]) -> str:
    for index, (pattern, replace) in enumerate(filters):
        try:
            text = _regex(pattern).sub(replace, text)
        except (re.error, IndexError) as error:
            raise _Problem(f"filters[{index}].replace cannot be applied: {error}") from None
    return text


def _nonempty(text: str, where: str) -> str:
    if not text.strip():
        raise _Problem(f"{where} renders to an empty string (every answer needs text)")
    return text


def _label_key(value: Any) -> str:
    """How a raw label value is looked up in ``label_map``: strings as they are, anything else as ``str()``."""
    return value if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class Template:
    """A prompt template: a Jinja2 input and its answer choices (see the module docstring for the forms)."""

    name: str
    input: str
    choices: tuple[str, ...] = ()     # fixed choices, one Jinja2 string per label; () with the task's choices_field
    target_delimiter: str = " "
    choice: str | None = None         # per-element Jinja2 string for the task's choices_field (None: the element)
    continuation: str | None = None   # partial scoring: the shared continuation; ``input`` is rendered per choice

    @property
    def partial(self) -> bool:
        return self.continuation is not None

    def render(self, example: dict, label_field: str = "label", id_field: str = "idx", *,
               choices_field: str | tuple[str, ...] | None = None, label_map: dict[str, int] | None = None,
               filters: tuple[tuple[str, str], ...] = (), label_names: tuple[str, ...] = (),
               role: str = "") -> Prompt:
        """Render ``example`` into a :class:`Prompt`. Any problem (a missing or undefined field, a label outside
        the choices or not in ``label_map``, an empty answer) raises a one-line HarnessError naming the template,
        the example id and the field; ``role`` ("training", ...) qualifies the example in that message."""
        example_id = str(example[id_field]) if id_field in example else "?"
        try:
            if id_field not in example:
                raise _Problem(f"field {id_field!r} (id_field) is missing; {_fields_hint(example)}")
            texts = self._choice_texts(example, choices_field, filters, label_names)
            delimiter = self.target_delimiter
            if self.continuation is None:
                context = _apply_filters(_render_source(self.input, example, "input"), filters)
                choices, contexts = tuple(delimiter + text for text in texts), ()
            else:
                contexts = tuple(
                    _apply_filters(_render_source(self.input, {**example, "choice": text, "choice_index": i},
                                                  f"input for choice {i}"), filters)
                    for i, text in enumerate(texts))
                continuation = _nonempty(_apply_filters(
                    _render_source(self.continuation, example, "continuation"), filters), "continuation")
                choices, context = (delimiter + continuation,) * len(texts), max(contexts, key=len)
            label = _label_of(example, label_field, len(texts), label_map)
        except _Problem as problem:
            who = f"{role} example" if role else "example"
            raise HarnessError(f"template {self.name!r}, {who} {example_id!r}: {problem}") from None
        return Prompt(context=context, choices=choices, label=label, example_id=example_id,
                      target_delimiter=delimiter, contexts=contexts)

    def _choice_texts(self, example: dict, choices_field, filters, label_names) -> tuple[str, ...]:
        """The answer texts (no delimiter), filtered and checked non-empty."""
        if choices_field is None:
            return tuple(_nonempty(_apply_filters(_render_source(source, example, f"choices[{i}]"), filters),
                                   f"choices[{i}]")
                         for i, source in enumerate(self.choices))
        if isinstance(choices_field, str):
            if choices_field not in example:
                raise _Problem(f"field {choices_field!r} (choices_field) is missing; {_fields_hint(example)}")
            elements, what = example[choices_field], f"field {choices_field!r} (choices_field)"
            if not isinstance(elements, (list, tuple)) or len(elements) < 2:
                got = f"{len(elements)} element(s)" if isinstance(elements, (list, tuple)) else type(elements).__name__
                raise _Problem(f"{what} must be a list of at least two choices, got {got}")
        else:
            for name in choices_field:
                if name not in example:
                    raise _Problem(f"field {name!r} (choices_field) is missing; {_fields_hint(example)}")
            elements, what = [example[name] for name in choices_field], "choices_field"
        if label_names and len(elements) != len(label_names):
            raise _Problem(f"{what} has {len(elements)} choices but label_names lists {len(label_names)}")
        texts = []
        for i, element in enumerate(elements):
            if self.choice is None:
                if not isinstance(element, str):
                    raise _Problem(f"{what} element {i} is {type(element).__name__}, not a string; give the "
                                   f"template a 'choice' to render it")
                text = element
            else:
                text = _render_source(self.choice, {**example, "choice": element, "choice_index": i},
                                      f"choice for element {i}")
            texts.append(_nonempty(_apply_filters(text, filters), f"choice {i}"))
        return tuple(texts)

    def fingerprint(self) -> str:
        """A short sha256 of the definition (input, choices, delimiter, and choice/continuation when set); the
        name is not part of it."""
        definition = {"input": self.input, "choices": list(self.choices), "target_delimiter": self.target_delimiter}
        if self.choice is not None:
            definition["choice"] = self.choice
        if self.continuation is not None:
            definition["continuation"] = self.continuation
        blob = json.dumps(definition, sort_keys=True, ensure_ascii=False).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]


def _label_of(example: dict, label_field: str, n_choices: int, label_map: dict[str, int] | None) -> int:
    """The example's integer label (through ``label_map`` when given), checked against the number of choices
    (-1 means unlabelled)."""
    if label_field not in example:
        raise _Problem(f"field {label_field!r} (label_field) is missing; {_fields_hint(example)}")
    raw = example[label_field]
    if label_map is not None:
        key = _label_key(raw)
        if key not in label_map:
            raise _Problem(f"field {label_field!r} is {raw!r}, which label_map does not map "
                           f"(it maps {', '.join(repr(k) for k in label_map)})")
        label, shown = label_map[key], f"{raw!r} (label_map gives {label_map[key]})"
    else:
        label, shown = raw, repr(raw)
    if isinstance(label, bool) or not isinstance(label, int) or not -1 <= label < n_choices:
        hint = "; map other values with label_map" if label_map is None and not isinstance(label, int) else ""
        raise _Problem(f"field {label_field!r} is {shown}, not a choice: a label is an integer in "
                       f"[0, {n_choices}) for this example's {n_choices} choices, or -1 for unlabelled{hint}")
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

    def demonstrations(self, template: Template, examples: list[dict]) -> str:
        """The k-shot prefix: each example's context plus its correct choice (for partial scoring: the correct
        choice's context plus the shared continuation), joined by and ending with the few-shot delimiter, so that
        a k-shot context is ``prefix + prompt.context``. "" for no examples."""
        demos = []
        for example in examples:
            prompt = self.render(template, example, role="demonstration")
            if prompt.label < 0:
                raise self._unlabelled(template, prompt, "demonstration")
            context, continuation = prompt.pairs()[prompt.label]
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


def _template_from_mapping(raw: Any, index: int, default_delimiter: str, n_labels: int, per_example: bool,
                           where: str) -> Template:
    """Validate ``templates[index]``; ``per_example``: the task has a choices_field."""
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
    choices: tuple[str, ...] = ()
    choice = None
    if per_example:
        if "choices" in raw:
            raise _fail(where, f"{prefix}.choices", "cannot be used with the task's choices_field (the choices "
                                                    "come from each example); use 'choice' to format each one")
        if "choice" in raw:
            choice = _jinja(_string(raw, "choice", where, f"{prefix}.choice"), where, f"{prefix}.choice", name)
    else:
        if "choice" in raw:
            raise _fail(where, f"{prefix}.choice", "needs the task's choices_field (per-example choices); "
                                                   "fixed choices go in 'choices'")
        if "choices" not in raw:
            raise _fail(where, f"{prefix}.choices", "is missing")
        choices = _string_list(raw["choices"], where, f"{prefix}.choices")
        if len(choices) != n_labels:
            raise _fail(where, f"{prefix}.choices", f"must have one entry per label ({n_labels}, as label_names), "
                                                    f"got {len(choices)}")
        for position, item in enumerate(choices):
            _jinja(item, where, f"{prefix}.choices[{position}]", name)
    continuation = None
    if "continuation" in raw:
        continuation = _jinja(_string(raw, "continuation", where, f"{prefix}.continuation"), where,
                              f"{prefix}.continuation", name)
        if not _variables(source) & set(CHOICE_VARIABLES):
            raise _fail(where, f"{prefix}.input", "must use {{ choice }} (or choice_index): a template with a "
                                                  "'continuation' (partial scoring) renders its input once per "
                                                  "choice")
    delimiter = raw.get("target_delimiter", default_delimiter)
    if not isinstance(delimiter, str):
        raise _fail(where, f"{prefix}.target_delimiter", "must be a string")
    return Template(name=name, input=source, choices=choices, target_delimiter=delimiter, choice=choice,
                    continuation=continuation)


def _choices_field(value: Any, where: str) -> str | tuple[str, ...]:
    if isinstance(value, str) and value.strip():
        return value
    if (isinstance(value, list) and len(value) >= 2 and len(set(map(str, value))) == len(value)
            and all(isinstance(item, str) and item.strip() for item in value)):
        return tuple(value)
    raise _fail(where, "choices_field", "must be a field name (a list field, e.g. endings) or a list of at least "
                                        "two distinct field names (e.g. [choice1, choice2])")


def _label_map(value: Any, n_labels: int, where: str) -> dict[str, int]:
    if not isinstance(value, dict) or not value:
        raise _fail(where, "label_map", "must be a non-empty mapping of raw label to choice index, "
                                        "e.g. {\"1\": 0, \"2\": 1}")
    mapped: dict[str, int] = {}
    for key, index in value.items():
        if isinstance(key, (dict, list)):
            raise _fail(where, "label_map", f"keys must be label values (strings or numbers), got {key!r}")
        upper = n_labels if n_labels else None
        if (isinstance(index, bool) or not isinstance(index, int) or index < -1
                or (upper is not None and index >= upper)):
            allowed = f"in [0, {upper})" if upper is not None else ">= 0"
            raise _fail(where, f"label_map.{key}", f"must be a choice index {allowed}, or -1 for unlabelled "
                                                   f"(got {index!r})")
        if _label_key(key) in mapped:
            raise _fail(where, f"label_map.{key}", "repeats a key (keys are compared as strings)")
        mapped[_label_key(key)] = index
    return mapped


def _filters(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list):
        raise _fail(where, "filters", "must be a list of {regex: ..., replace: ...} substitutions")
    out = []
    for index, item in enumerate(value):
        field = f"filters[{index}]"
        if not isinstance(item, dict):
            raise _fail(where, field, "must be a mapping {regex: ..., replace: ...}")
        _check_keys(item, ("regex",), ("replace",), where, field + ".")
        pattern = _string(item, "regex", where, f"{field}.regex", allow_empty=True)  # "  " is a fine regex
        if not pattern:
            raise _fail(where, f"{field}.regex", "must be a non-empty regular expression")
        replace = item.get("replace", "")
        if not isinstance(replace, str):
            raise _fail(where, f"{field}.replace", "must be a string (\"\" deletes the matches)")
        try:
            compiled = re.compile(pattern)
        except re.error as error:
            raise _fail(where, f"{field}.regex", f"is not a valid regular expression: {error}") from None
        try:
            compiled.sub(replace, "")  # re parses the replacement (group references) before searching
        except (re.error, IndexError) as error:
            raise _fail(where, f"{field}.replace", f"is not a valid replacement: {error}") from None
        out.append((pattern, replace))
    return tuple(out)


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
