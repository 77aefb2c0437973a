"""Prompt templates: the Jinja2 format of a task file's ``templates`` and the rendering of examples into prompts.

Each template is a Jinja2 ``input`` plus its answer choices, all rendered with the example's fields under
``StrictUndefined`` (a missing field is an error, not an empty string), in a sandboxed environment. Templates may
use the harness filter ``lower_first`` (lower-case the first letter unless the first word is "I" or an acronym).
The README's "Tasks are data" section documents every field with worked examples; in short:

- fixed choices: a template's ``choices`` lists one Jinja2 string per label (the task's ``label_names``);
- per-example choices: the task's ``choices_field`` names a list field (``endings``, HellaSwag) or a list of
  fields (``[choice1, choice2]``, COPA); a template's optional ``choice`` is a Jinja2 string rendered once per
  element with ``choice`` (the element) and ``choice_index`` (0-based) beside the example's fields;
- partial scoring (lm-evaluation-harness's Winogrande method): a template with a ``continuation`` renders its
  ``input`` once per choice (with ``choice``), and every choice is scored by the log-probability of the one
  shared continuation given that choice's context (:attr:`Prompt.contexts`);
- the task's ``label_map`` maps raw label values (strings, 1-based numbers) to choice indices; its ``filters``
  are regular expression substitutions applied to every rendered string (HellaSwag's clean-up).

Conventions, as in lm-evaluation-harness: a rendered ``context`` never ends in whitespace; every choice starts
with the template's ``target_delimiter`` (default: the task's; it belongs to the continuation that is scored).

:func:`_template_from_mapping` validates one entry of a task file's ``templates`` list; the task itself, its
loading and its k-shot demonstrations are in :mod:`harness.tasks` (which imports this module, never the reverse).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.meta
import jinja2.sandbox

from harness.errors import HarnessError
from harness.task_fields import _check_keys, _fail, _label_key, _string, _string_list

TEMPLATE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]+$")
REQUIRED_TEMPLATE_FIELDS = ("name", "input")
OPTIONAL_TEMPLATE_FIELDS = ("choices", "choice", "continuation", "target_delimiter")
CHOICE_VARIABLES = ("choice", "choice_index")  # what a per-choice Jinja2 string sees beside the example's fields


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


# --------------------------------------------------------------------------------------------- template files

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
