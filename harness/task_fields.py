"""Checks on the fields of a parsed task YAML (see :mod:`harness.tasks`), shared by the task and template loaders.

Every check returns the field's value, normalised (a tuple for a list, a dict keyed by strings for ``label_map``),
or raises a one-line :class:`harness.errors.HarnessError` of the form ``<file>: field '<name>' <requirement>``
(an unknown key gets a did-you-mean suggestion). ``where`` is the file as shown to the user; ``field`` is the
dotted path of the value in the file (``templates[0].choices``, ``filters[1].regex``).
"""

from __future__ import annotations

import re
from typing import Any

from harness.errors import HarnessError, suggest


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


def _label_key(value: Any) -> str:
    """How a raw label value is looked up in ``label_map``: strings as they are, anything else as ``str()``."""
    return value if isinstance(value, str) else str(value)


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
