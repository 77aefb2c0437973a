"""The baseline file of `harness check` (version 2): one cell per (model, task, method, template, seed, preset,
k) with its accuracies, FLOPs and per-example, per-choice log-probs, plus the float platform it was saved on;
writing (deterministic, one line per example), reading and validating it. The comparison is
:mod:`harness.report.check`."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

from harness.errors import HarnessError

VERSION = 2
READABLE_VERSIONS = (1, 2)
KEY_FIELDS = ("model", "task", "method", "template", "seed", "preset")
ACCURACY_FIELDS = ("accuracy", "accuracy_norm", "accuracy_norm_char")
FLOPS_FIELDS = ("infer_flops_per_example", "train_flops")
CELL_FIELDS_V1 = (*KEY_FIELDS, "k", "n_eval", "accuracy")
CELL_FIELDS = (*KEY_FIELDS, "k", "n_eval", *ACCURACY_FIELDS, *FLOPS_FIELDS, "examples")
LOGPROB_DECIMALS = 6
MAKE_BASELINE = "record one with `make baseline` (or `harness baseline save PATH --store STORE`)"

ExamplesOf = Callable[[str], Iterable[dict]]  # run_id -> the store's example rows (Store.examples format)

def cell_key(cell: dict) -> tuple:
    """The identity of a cell: the key fields plus ``k``, as strings (JSON round-trips ints as ints anyway)."""
    return tuple("" if cell.get(f) is None else str(cell.get(f)) for f in (*KEY_FIELDS, "k"))


def cell_name(cell: dict) -> str:
    name = "/".join("" if cell.get(f) is None else str(cell.get(f)) for f in KEY_FIELDS)
    return f"{name} k={cell.get('k')}"


def _example_entries(rows: Iterable[dict]) -> list[list]:
    """Per example ``[example_id, label, [log-prob per choice]]``, log-probs rounded to LOGPROB_DECIMALS."""
    return [[str(r["example_id"]), int(r["label"]), [round(float(c["logprob"]), LOGPROB_DECIMALS)
                                                     for c in r["choices"]]] for r in rows]


def _selected(runs) -> list[dict]:
    """The report's runs (:func:`~harness.report.tables.select_runs`) as plain dicts. Imported here: pandas loads
    when a baseline is saved or checked, not whenever the CLI starts."""
    from harness.report.tables import select_runs
    from harness.results import records

    return records(select_runs(runs))


def baseline_cells(runs: list[dict], examples_of: ExamplesOf | None = None) -> list[dict]:
    """One cell per finished, non-random run with an accuracy, sorted by key; with ``examples_of`` each cell
    carries its examples' log-probs. Two runs with one key raise :class:`HarnessError` (which one is the
    baseline?)."""
    from harness.report.tables import run_sort_key

    selected = [r for r in _selected(runs) if r.get("accuracy") is not None]
    by_key: dict[tuple, list[dict]] = defaultdict(list)
    for r in selected:
        by_key[cell_key(r)].append(r)
    for key, rs in by_key.items():
        if len(rs) > 1:
            raise HarnessError(f"the store has {len(rs)} finished runs for cell {cell_name(rs[0])} (run ids "
                               f"{', '.join(r['run_id'] for r in rs)}: another dtype, limit or input version?); "
                               "save a baseline from a store with one run per cell")
    cells = []
    for r in selected:
        cell = {f: r.get(f) for f in (*KEY_FIELDS, "k", "n_eval", *ACCURACY_FIELDS, *FLOPS_FIELDS)}
        if examples_of is not None:
            cell["examples"] = _example_entries(examples_of(r["run_id"]))
        cells.append(cell)
    return sorted(cells, key=lambda c: (cell_key(c), run_sort_key(c)))


def baseline_json(runs: list[dict], examples_of: ExamplesOf, platform: dict | None = None) -> str:
    """The version-2 baseline document: indented JSON, sorted keys, one line per example (readable diffs);
    ``platform`` (:func:`harness.environment.float_platform` of the saving machine) recorded when given."""
    cells = baseline_cells(runs, examples_of)
    compact = {}
    for i, cell in enumerate(cells):
        compact[f"@examples{i}@"] = cell["examples"]
        cell["examples"] = f"@examples{i}@"
    doc = {"version": VERSION, "logprob_decimals": LOGPROB_DECIMALS, "cells": cells}
    if platform is not None:
        doc["platform"] = platform
    text = json.dumps(doc, indent=2, sort_keys=True)
    for marker, entries in compact.items():
        body = "[]" if not entries else \
            "[\n" + ",\n".join(" " * 8 + json.dumps(e) for e in entries) + "\n" + " " * 6 + "]"
        text = text.replace(json.dumps(marker), body, 1)
    return text + "\n"


def save_baseline(runs: list[dict], path: str | Path, examples_of: ExamplesOf,
                  platform: dict | None = None) -> int:
    """Write the baseline of ``runs`` to ``path`` (JSON, deterministic); return the number of cells."""
    path = Path(path)
    text = baseline_json(runs, examples_of, platform)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return len(json.loads(text)["cells"])


def _bad_examples(entries) -> bool:
    if not isinstance(entries, list):
        return True
    return any(not (isinstance(e, list) and len(e) == 3 and isinstance(e[2], list)
                    and all(isinstance(x, (int, float)) for x in e[2])) for e in entries)


def load_baseline(path: str | Path) -> dict:
    """Read and validate a baseline file (version 1 or 2); a malformed one raises :class:`HarnessError`."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"no baseline file at {path}; write one with `baseline save {path}`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HarnessError(f"baseline {path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        raise HarnessError(f"baseline {path} is not a baseline ({{'version': {VERSION}, 'cells': [...]}})")
    version = data.get("version")
    if version not in READABLE_VERSIONS:
        raise HarnessError(f"baseline {path} has version {version!r}; this harness reads versions "
                           f"{', '.join(map(str, READABLE_VERSIONS))}: upgrade harness, or {MAKE_BASELINE}")
    if not isinstance(data.get("platform", {}), dict):
        raise HarnessError(f"baseline {path}: 'platform' must be an object (the saving machine's float platform)")
    fields = CELL_FIELDS if version == 2 else CELL_FIELDS_V1
    for cell in data["cells"]:
        missing = [f for f in fields if not isinstance(cell, dict) or f not in cell]
        if missing:
            raise HarnessError(f"baseline {path}: a cell lacks {', '.join(missing)}: {str(cell)[:200]}")
        if version == 2 and _bad_examples(cell["examples"]):
            raise HarnessError(f"baseline {path}: cell {cell_name(cell)} has malformed examples "
                               "(expected [[example_id, label, [log-prob, ...]], ...])")
    return data


def version_note(baseline: dict) -> str | None:
    """Why a version-1 baseline checks less; None for a current one."""
    if baseline.get("version") == 1:
        return ("version-1 baseline: it lacks log-probs and FLOPs, so only accuracies were compared (a tolerance of "
                f"about 17 points at n = 32); {MAKE_BASELINE} to check log-probs")
    return None
