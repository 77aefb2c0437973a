"""Results as pandas DataFrames, and the output formats of ``harness results``.

    import harness.results
    df = harness.results.runs("results/harness.sqlite", status="finished")
    df.groupby(["task", "method"]).accuracy.median()

:func:`runs` gives one row per run and :func:`examples` one row per evaluated example, read from a store given as
a path or a :class:`~harness.store.Store` (schema 2, :mod:`harness.store`; an older store is migrated on opening,
a missing file is an error). :func:`frame` builds the same typed runs frame from run dicts (``Store.runs()``, or a
command's fresh results); :func:`records` turns a frame back into plain Python rows for JSON. :func:`render`
writes the ``table``, ``csv``, ``json`` and ``parquet`` formats of ``harness results``.

Columns of :func:`runs`, in this order (docs/metrics.md defines every figure). Text columns have pandas' string
dtype (``str`` from pandas 3, ``object`` before); a missing value is NaN (float, text) or ``<NA>`` (Int64):

====================================  =======  ==============================================================
run_id                                text     the run's id: a hash of every input that can change its numbers
status                                text     ``finished``, ``failed`` or ``withdrawn`` (then ``error`` says why)
task, method, model, template         text     the grid cell (``model``: the name given to ``--model``)
seed                                  Int64    data seed (zero-shot runs once per template, with the first seed)
k                                     Int64    demonstrations asked for (ICL; 0 for zero-shot and trained methods)
preset                                text     ``paper`` or ``quick``
is_random                             bool     a random-init model (speed runs; reports leave them out)
n_eval                                Int64    evaluated examples
accuracy                              float64  share (0-1) right by the highest summed log-prob
accuracy_norm                         float64  ... by the highest log-prob per token (T-Few)
accuracy_norm_char                    float64  ... per character without the delimiter (lm-eval ``acc_norm``);
                                               NaN for runs migrated from schema 1
infer_flops_per_example               float64  inference FLOPs per evaluated example (ICL: cached demonstrations)
infer_flops_per_example_uncached      float64  the same without the KV cache (every query re-reads its prompt)
train_flops                           float64  FLOPs of the training (one adapter; 0 for ICL)
peak_memory_bytes                     Int64    peak device memory of the run
checkpoint_bytes                      Int64    task-specific state to keep: adapter on disk, ICL's demonstrations
trainable_params, total_params        Int64    parameters trained (0 for ICL) and of the whole model
seconds, train_seconds, eval_seconds  float64  wall time of the run and of its training and evaluation
error                                 text     why a failed run failed
artifact_path                         text     the saved adapter (trained methods)
finished_at                           float64  when the row was written (Unix time)
n_chars_with_delimiter                bool     its character counts include the delimiter (schema-1 runs)
config, env, extra                    object   dicts: the full run config, the environment, other figures
                                               (``k_used``, losses, ...)
====================================  =======  ==============================================================

Columns of :func:`examples`: ``run_id``, ``task``, ``method``, ``model``, ``template``, ``seed``, ``k`` (the
run's, as above), ``position`` (Int64, order in the run), ``example_id`` (text), ``label``, ``prediction``,
``prediction_norm``, ``prediction_norm_char`` (Int64 choice indices; ``prediction_norm_char`` is ``<NA>`` for
schema-1 runs), ``correct`` (bool: ``prediction == label``), and per choice, as lists: ``logprobs`` (summed
log-prob), ``n_tokens`` and ``n_chars`` (characters without the target delimiter).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from harness.errors import HarnessError
from harness.store import METRIC_COLUMNS, Store

INT_COLUMNS = ("seed", "k", "n_eval", "peak_memory_bytes", "checkpoint_bytes", "trainable_params", "total_params")
BOOL_COLUMNS = ("is_random", "n_chars_with_delimiter")
FLOAT_COLUMNS = (*(c for c in METRIC_COLUMNS if c not in INT_COLUMNS), "finished_at")
RUN_COLUMNS = ("run_id", "status", "task", "method", "model", "template", "seed", "k", "preset", "is_random",
               *METRIC_COLUMNS, "error", "artifact_path", "finished_at", "n_chars_with_delimiter", "config", "env",
               "extra")
EXAMPLE_COLUMNS = ("run_id", "task", "method", "model", "template", "seed", "k", "position", "example_id", "label",
                   "prediction", "prediction_norm", "prediction_norm_char", "correct", "logprobs", "n_tokens",
                   "n_chars")

# What `harness results` writes (csv, json, parquet), and the columns of its table.
RESULT_FIELDS = (
    "run_id", "task", "method", "model", "template", "seed", "k", "n_eval", "accuracy", "accuracy_norm",
    "accuracy_norm_char", "infer_flops_per_example", "infer_flops_per_example_uncached", "train_flops",
    "peak_memory_bytes", "checkpoint_bytes", "trainable_params", "seconds", "status",
)
TABLE_FIELDS = ("run_id", "task", "method", "template", "seed", "k", "n_eval", "accuracy", "accuracy_norm",
                "accuracy_norm_char", "infer_flops_per_example", "seconds", "status")
FORMATS = ("table", "csv", "json", "parquet")
RUN_CELL = ("run_id", "task", "method", "model", "template", "seed", "k")  # the run columns of examples()


def _store(store: str | Path | Store) -> Store:
    if isinstance(store, Store):
        return store
    if not Path(store).is_file():
        raise HarnessError(f"no results store at {store}; run `harness run ...` first or pass --store PATH")
    return Store(store)


def frame(rows: Iterable[dict] | pd.DataFrame) -> pd.DataFrame:
    """The runs frame (:data:`RUN_COLUMNS`, typed as in the module docstring) of run dicts as ``Store.runs()``
    gives them: a row's keys outside the columns go to its ``extra`` dict. A frame is returned as it is."""
    if isinstance(rows, pd.DataFrame):
        return rows
    known = set(RUN_COLUMNS)
    table = [{**{c: r.get(c) for c in RUN_COLUMNS if c != "extra"},
              "extra": {**(r.get("extra") or {}), **{k: v for k, v in r.items() if k not in known}}} for r in rows]
    df = pd.DataFrame.from_records(table, columns=list(RUN_COLUMNS))
    for column in ("config", "env"):
        df[column] = df[column].map(lambda d: d if isinstance(d, dict) else {})
    for column in BOOL_COLUMNS:  # a missing flag is false
        df[column] = [v is not None and v == v and bool(v) for v in df[column]]
    return df.astype({**dict.fromkeys(INT_COLUMNS, "Int64"), **dict.fromkeys(FLOAT_COLUMNS, "float64"),
                      **dict.fromkeys(BOOL_COLUMNS, bool)})


def runs(store: str | Path | Store, status: str | None = None, include_random: bool = True) -> pd.DataFrame:
    """One row per run of ``store`` (only ``status`` runs when given; random-init models unless
    ``include_random`` is false), ordered by task, method, model, template, seed, k; columns: module docstring."""
    return frame(_store(store).runs(status=status, include_random=include_random))


def examples(store: str | Path | Store, run_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per evaluated example (of ``run_ids`` only when given), ordered by run id and position, with its
    run's task, method, model, template, seed and k; columns: module docstring."""
    db = _store(store)
    lists = {"logprobs": "logprob", "n_tokens": "n_tokens", "n_chars": "n_chars"}  # column: key of each choice
    rows = [{**r, **{column: [c[key] for c in r["choices"]] for column, key in lists.items()}}
            for r in db.examples(run_ids)]
    df = pd.DataFrame.from_records(rows, columns=[c for c in EXAMPLE_COLUMNS if c not in (*RUN_CELL[1:], "correct")])
    df = df.astype(dict.fromkeys(("position", "label", "prediction", "prediction_norm", "prediction_norm_char"),
                                 "Int64"))
    df["correct"] = (df["prediction"] == df["label"]).fillna(False).astype(bool)
    return df.merge(frame(db.runs())[list(RUN_CELL)], on="run_id", how="left")[list(EXAMPLE_COLUMNS)]


def _plain(value):
    """A cell as plain Python for JSON: NaN and ``<NA>`` become None, numpy scalars Python numbers."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") and not isinstance(value, (dict, list, str)) else value


def records(df: pd.DataFrame) -> list[dict]:
    """The frame's rows as dicts of plain Python values (None where a value is missing)."""
    return [{k: _plain(v) for k, v in row.items()} for row in df.to_dict("records")]


def fmt_cell(value) -> str:
    """A number for the terminal: 4 decimals without trailing zeros below 1e4, else 4 significant digits
    (``2.224e+10``); a missing value is ``-``."""
    value = _plain(value)
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e4 or value == 0 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def text_table(df: pd.DataFrame) -> str:
    """The terminal table of ``harness results`` and ``harness run``: :data:`TABLE_FIELDS`, left-aligned."""
    cells = [[fmt_cell(v) for v in row] for row in df.reindex(columns=list(TABLE_FIELDS)).itertuples(index=False)]
    # The header goes in as the first row: tabulate would pad a header two characters wider than its column.
    return tabulate([TABLE_FIELDS, *cells], tablefmt="plain", stralign="left", disable_numparse=True) + "\n"


def render(df: pd.DataFrame, fmt: str, out: str | Path | None = None) -> str | None:
    """Write the runs of ``df`` in ``fmt`` (:data:`FORMATS`) to the file ``out``, or return the text when
    ``out`` is None. csv, json and parquet carry :data:`RESULT_FIELDS`; parquet needs ``out`` and pyarrow."""
    if fmt not in FORMATS:
        raise HarnessError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    df = df.reindex(columns=list(RESULT_FIELDS))
    if fmt == "parquet":
        if out is None:
            raise HarnessError("--format parquet writes a binary file: pass --out FILE")
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise HarnessError("--format parquet needs pyarrow: pip install pyarrow (or pip install "
                               "'harness[parquet]')") from None
        df.to_parquet(out, index=False)
        return None
    if fmt == "table":
        text = text_table(df)
    elif fmt == "csv":  # CRLF line ends, as the csv module writes them
        buf = io.StringIO()
        df.to_csv(buf, index=False, lineterminator="\r\n")
        text = buf.getvalue()
    else:
        text = json.dumps(records(df), indent=2) + "\n"
    if out is None:
        return text
    Path(out).write_text(text, newline="")
    return None
