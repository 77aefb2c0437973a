"""Load a task's examples from local JSONL copies or from the Hugging Face Hub.

Three sources, chosen by ``data_dir`` (see :func:`resolve_data_dir`):

* embedded (the default: no ``--data-dir``, no ``HARNESS_DATA_DIR``): the SuperGLUE rte, cb, copa, wic and wsc
  splits and the T-Few few-shot subsets shipped inside the package, ``harness/builtin_data/`` (its README.md and
  NOTICE.md give provenance and licences). It is read exactly like any other local folder;
* local: ``<data_dir>/<task.name>/<task.local_files[split]>``, one JSON object per line in the Hub's
  ``super_glue`` schema (see the data folder's README);
* Hub (``--data-dir hub`` or ``HARNESS_DATA_DIR=hub``; ``data_dir`` resolves to None):
  ``datasets.load_dataset(task.hub_path, task.hub_config, split=split)``, which needs network access the first
  time (``datasets`` is imported only then).

Few-shot training sets (:func:`few_shot_examples`) are the T-Few paper's 32-shot subsets,
``<data_dir>/<task>/few_shot/<seed>_seed.jsonl``, when present; otherwise ``n`` (default 32) rows drawn from
the train split with ``random.Random(seed).sample`` (a different subset from T-Few's for the same seed).
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

from harness.errors import HarnessError, suggest
from harness.tasks import Task

DATA_DIR_ENV = "HARNESS_DATA_DIR"
FEW_SHOT_KEY = "few_shot"
DEFAULT_FEW_SHOT_SIZE = 32
HUB = "hub"  # --data-dir / HARNESS_DATA_DIR value that reads the Hugging Face Hub
BUILTIN_DATA_FOLDER = "builtin_data"  # harness/builtin_data/: the embedded default data


def builtin_data_dir() -> Path:
    """The data shipped inside the package: ``harness/builtin_data/`` (a checkout, an editable install or a wheel).

    Its files are byte-identical to the project's ``../shared/data``, so runs read from either have the same ids.
    """
    return Path(__file__).resolve().parent / BUILTIN_DATA_FOLDER


def _builtin_tasks_text() -> str:
    """The task names with embedded data, for advice ("cb, copa, rte, wic, wsc")."""
    folder = builtin_data_dir()
    names = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    return ", ".join(names) or "none found"


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """Where rows are read: a local folder, or None for the Hugging Face Hub.

    ``data_dir`` if given, else ``$HARNESS_DATA_DIR``, else the embedded folder (:func:`builtin_data_dir`). The
    string ``"hub"`` (from either) means the Hub and returns None; a ``Path("hub")`` or ``"./hub"`` is a folder.
    A folder that is named but does not exist is an error rather than a silent switch to another source.
    """
    if data_dir is not None and str(data_dir) != "":
        given, origin = data_dir, "--data-dir"
    elif os.environ.get(DATA_DIR_ENV):
        given, origin = os.environ[DATA_DIR_ENV], DATA_DIR_ENV
    else:
        return builtin_data_dir()
    if isinstance(given, str) and given == HUB:
        return None
    chosen = Path(given).expanduser()
    if not chosen.is_dir():
        raise HarnessError(f"data folder {str(chosen)!r} (from {origin}) does not exist. Pass --data-dir / set "
                           f"{DATA_DIR_ENV} to a folder holding <task>/<file>.jsonl, leave both unset to use the "
                           f"data shipped with harness ({_builtin_tasks_text()}), or give '{HUB}' to download from "
                           f"the Hugging Face Hub (online).")
    return chosen


def _fix_advice(task: Task, data_dir: Path | None = None) -> str:
    """How to point the harness at data for ``task`` (``data_dir``: the folder that lacked it, if any)."""
    example = f"{task.name}/{task.local_files.get(task.eval_split, 'validation.jsonl')}"
    hub = (f"give --data-dir {HUB} to download {task.hub_path}/{task.hub_config or ''} from the Hugging Face Hub "
           f"(online)")
    if data_dir is not None and Path(data_dir) == builtin_data_dir():
        return (f"The data shipped with harness covers {_builtin_tasks_text()} only: {hub}, or pass --data-dir / "
                f"set {DATA_DIR_ENV} to a folder holding {task.name}/<file> (e.g. {example}).")
    return (f"Pass --data-dir / set {DATA_DIR_ENV} to a folder holding {task.name}/<file> (e.g. {example}), "
            f"leave both unset to use the data shipped with harness ({_builtin_tasks_text()}), or {hub}.")


def _known_splits(task: Task) -> list[str]:
    """Split names the task defines (the few-shot pattern is not a split)."""
    return [split for split in task.local_files if split != FEW_SHOT_KEY]


def local_path(task: Task, split: str, data_dir: Path) -> Path:
    """Where the local copy of ``split`` of ``task`` lives under ``data_dir``."""
    if split not in _known_splits(task):
        raise suggest(split, _known_splits(task), f"{task.name} split")
    return Path(data_dir) / task.name / task.local_files[split]


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file (blank lines skipped); a bad line raises HarnessError naming file and line."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise HarnessError(f"{path}:{number}: not valid JSON ({error.msg}); "
                                   f"each line must be one JSON object.") from None
            if not isinstance(row, dict):
                raise HarnessError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}.")
            rows.append(row)
    return rows


def _count_lines(path: Path) -> int:
    """Number of non-blank lines in ``path`` (cheap: no JSON parsing)."""
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def _load_from_hub(task: Task, split: str) -> list[dict]:
    """``split`` of ``task`` from the Hugging Face Hub, as a list of dicts."""
    try:
        import datasets  # lazy: heavy import, and only needed online
    except ImportError:
        raise HarnessError(f"cannot load {task.name!r} from the Hub: the 'datasets' package is not installed. "
                           f"Install it (pip install datasets), or pass --data-dir / set {DATA_DIR_ENV} "
                           f"to a folder holding {task.name}/<file>, or leave both unset to use the data "
                           f"shipped with harness ({_builtin_tasks_text()}).") from None
    try:
        dataset = datasets.load_dataset(task.hub_path, task.hub_config, split=split)
    except Exception as error:  # noqa: BLE001 - any Hub failure (offline, renamed, auth) is a user error here
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise HarnessError(f"cannot load {task.hub_path!r} config {task.hub_config!r} split {split!r} from the "
                           f"Hugging Face Hub ({reason}). {_fix_advice(task)}") from None
    return [dict(row) for row in dataset]


def load_split(task: Task, split: str, data_dir: Path | None) -> list[dict]:
    """All rows of ``split`` of ``task``: from the folder ``data_dir``, or from the Hub when it is None.

    ``data_dir`` is already resolved (:func:`resolve_data_dir`): None here means the Hub, not the default."""
    if split not in _known_splits(task):
        raise suggest(split, _known_splits(task), f"{task.name} split")
    if data_dir is None:
        return _load_from_hub(task, split)
    path = local_path(task, split, data_dir)
    if not path.is_file():
        raise HarnessError(f"no {split!r} data for task {task.name!r}: looked for {path}. "
                           f"{_fix_advice(task, data_dir)}")
    return read_jsonl(path)


def few_shot_path(task: Task, seed: int, data_dir: Path | None) -> Path | None:
    """The T-Few subset file for ``seed`` (whether or not it exists), or None if the task defines none."""
    pattern = task.local_files.get(FEW_SHOT_KEY)
    if data_dir is None or pattern is None:
        return None
    return Path(data_dir) / task.name / pattern.format(seed=seed)


def few_shot_examples(task: Task, seed: int, data_dir: Path | None, n: int | None = None) -> list[dict]:
    """The few-shot training examples for data seed ``seed``.

    If ``<data_dir>/<task>/few_shot/<seed>_seed.jsonl`` exists, its rows in file order (the first ``n`` when
    ``n`` is given). Otherwise ``random.Random(seed).sample(train_rows, n)`` with ``n`` defaulting to 32:
    deterministic per seed, in sample order, but not the same subset as T-Few's file for that seed.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise HarnessError(f"number of few-shot examples must be a non-negative integer, got {n!r}.")
    path = few_shot_path(task, seed, data_dir)
    if path is not None and path.is_file():
        rows = read_jsonl(path)
        if n is not None and n > len(rows):
            raise HarnessError(f"{path} holds {len(rows)} examples but {n} were asked for; ask for at most "
                               f"{len(rows)}, or remove the file to sample {n} from the train split.")
        return rows if n is None else rows[:n]
    size = DEFAULT_FEW_SHOT_SIZE if n is None else n
    train_rows = load_split(task, task.train_split, data_dir)
    if size > len(train_rows):
        raise HarnessError(f"cannot sample {size} few-shot examples: task {task.name!r} split "
                           f"{task.train_split!r} has only {len(train_rows)} rows.")
    return random.Random(seed).sample(train_rows, size)


def _few_shot_seeds(task: Task, data_dir: Path) -> list[int]:
    """Seeds with a T-Few subset file under ``data_dir``, sorted."""
    pattern = task.local_files.get(FEW_SHOT_KEY)
    if pattern is None:
        return []
    template_path = Path(data_dir) / task.name / pattern
    folder = template_path.parent
    if "{seed}" in str(folder) or not folder.is_dir():
        return []
    before, _, after = template_path.name.partition("{seed}")
    matcher = re.compile(re.escape(before) + r"(\d+)" + re.escape(after) + r"$")
    seeds = [int(match.group(1)) for p in folder.iterdir() if (match := matcher.match(p.name))]
    return sorted(seeds)


def data_status(task: Task, data_dir: Path | None) -> dict:
    """What data is available for ``task``, cheaply (counts lines; never downloads).

    Returns ``{"found", "source", "counts", "few_shot_seeds", "missing"}``: ``source`` is "local" when every
    split file exists under ``data_dir``, "missing" when some do not (``missing`` lists the paths looked
    for), and "hub" when ``data_dir`` is None (``found`` is then False: nothing local, it would be downloaded).
    The embedded folder is a local folder here ("local").
    """
    if data_dir is None:
        return {"found": False, "source": "hub", "counts": {}, "few_shot_seeds": [], "missing": []}
    counts, missing = {}, []
    for split in _known_splits(task):
        path = local_path(task, split, data_dir)
        if path.is_file():
            counts[split] = _count_lines(path)
        else:
            missing.append(str(path))
    found = not missing
    return {"found": found, "source": "local" if found else "missing", "counts": counts,
            "few_shot_seeds": _few_shot_seeds(task, data_dir), "missing": missing}
