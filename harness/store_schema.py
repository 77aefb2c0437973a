"""The results store's schema: the tables of a new store (:data:`SCHEMA`, at :data:`SCHEMA_VERSION`) and the
migrations that bring an older store up to it (:data:`MIGRATIONS`, applied by :func:`open_schema` in one
transaction). Split out of :mod:`harness.store`, which re-exports the public names.

Schema versions (``PRAGMA user_version``; a file of schema 1 has 0 there, it predates the number):

1. runs and examples as written up to commit c1cbb64.
2. ``runs.accuracy_norm_char`` (per-character normalized accuracy, lm-eval's ``acc_norm``),
   ``runs.n_chars_with_delimiter`` (1: the run's per-choice ``n_chars`` include the target delimiter, so
   per-character figures are not computed for it) and ``examples.prediction_norm_char``. Migrating a schema-1
   store marks its runs ``n_chars_with_delimiter = 1`` and leaves their per-character figures NULL: schema-1
   code always counted the delimiter, and the store does not record which delimiter a template had (a custom
   task's may not be ``" "``), so subtracting it would be a guess. The one exception is a run whose config says
   ``scoring_version >= 2`` (its scorer already left the delimiter out): its figures are computed from its
   stored per-choice numbers. Nothing else is changed; every run and example row keeps its values.
3. the ``mixed_runs`` table (issue 16, ``harness mixed``): one row per (mixed run, method, serving mode) with the
   throughput, latency, memory and FLOPs of serving several tasks' queries in mixed batches, task by task, or from
   merged weights (:mod:`harness.mixed.records`). Migrating adds the empty table; no other row changes.
4. ``mixed_runs.latency_median_s`` (the median batch latency, beside the mean and the 90th percentile).
   Migrating adds the column (NULL in rows written before); no other row changes.

Opening a store migrates it to :data:`SCHEMA_VERSION` in one transaction (all steps or none), so a crash
mid-migration leaves the old schema intact. A store of a NEWER schema than this code knows is refused with a
:class:`~harness.errors.HarnessError` (upgrade harness to read it); it is never modified.
"""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

from harness.choice import argmax_first, norm_char_scores
from harness.errors import HarnessError

# Metric columns of the runs table (all nullable). Their definitions are in docs/metrics.md.
METRIC_COLUMNS = (
    "n_eval",
    "accuracy",
    "accuracy_norm",
    "accuracy_norm_char",
    "infer_flops_per_example",
    "infer_flops_per_example_uncached",
    "train_flops",
    "peak_memory_bytes",
    "checkpoint_bytes",
    "trainable_params",
    "total_params",
    "seconds",
    "train_seconds",
    "eval_seconds",
)

SCHEMA_VERSION = 4

# The tables of a new store, at SCHEMA_VERSION. An older store gets the same columns through MIGRATIONS.
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    task TEXT, method TEXT, model TEXT, template TEXT, seed INTEGER, k INTEGER, preset TEXT,
    is_random INTEGER DEFAULT 0,
    {", ".join(f"{c} REAL" for c in METRIC_COLUMNS)},
    error TEXT,
    artifact_path TEXT,
    config_json TEXT NOT NULL,
    env_json TEXT,
    extra_json TEXT,
    finished_at REAL,
    n_chars_with_delimiter INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS examples (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    example_id TEXT NOT NULL,
    label INTEGER NOT NULL,
    prediction INTEGER NOT NULL,
    prediction_norm INTEGER NOT NULL,
    logprobs_json TEXT NOT NULL,
    n_tokens_json TEXT NOT NULL,
    n_chars_json TEXT NOT NULL,
    prediction_norm_char INTEGER,
    PRIMARY KEY (run_id, position)
);
CREATE INDEX IF NOT EXISTS runs_cell ON runs(task, method, model);
""" + "\n{};\n"  # the mixed_runs table, below

# Schema 3: serving figures of ``harness mixed`` (columns described in harness.mixed.records); schema 4 adds
# latency_median_s (MIXED_COLUMNS_4), in a new store's table as in a migrated one.
MIXED_COLUMNS_4 = ("latency_median_s REAL",)
MIXED_SCHEMA = """
CREATE TABLE IF NOT EXISTS mixed_runs (
    mixed_id TEXT NOT NULL, method TEXT NOT NULL, mode TEXT NOT NULL,
    tasks TEXT NOT NULL, n_tasks INTEGER NOT NULL, model TEXT, device TEXT, dtype TEXT,
    batch_size INTEGER NOT NULL, n_examples INTEGER NOT NULL,
    examples_per_second REAL, latency_mean_s REAL, latency_p90_s REAL, seconds REAL, setup_seconds REAL,
    peak_memory_bytes INTEGER, state_bytes INTEGER, flops_per_example REAL, tasks_per_batch REAL,
    max_abs_diff REAL, run_ids_json TEXT NOT NULL, config_json TEXT NOT NULL, env_json TEXT, created_at REAL,
    PRIMARY KEY (mixed_id, method, mode)
)"""
SCHEMA = SCHEMA.format(MIXED_SCHEMA.strip()) + "".join(f"ALTER TABLE mixed_runs ADD COLUMN {c};\n"
                                                       for c in MIXED_COLUMNS_4)


def _table_exists(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None


def schema_version(db: sqlite3.Connection) -> int:
    """The schema version of an open store: ``PRAGMA user_version``; a store with tables but 0 there is 1;
    a file without tables is 0 (new)."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version == 0 and _table_exists(db, "runs"):
        return 1
    return version


def _migrate_1_to_2(db: sqlite3.Connection) -> None:
    """Add the per-character columns; mark schema-1 runs as counting the delimiter (see the module docstring)."""
    db.execute("ALTER TABLE runs ADD COLUMN accuracy_norm_char REAL")
    db.execute("ALTER TABLE runs ADD COLUMN n_chars_with_delimiter INTEGER NOT NULL DEFAULT 0")
    db.execute("ALTER TABLE examples ADD COLUMN prediction_norm_char INTEGER")
    for run_id, config_json, status in db.execute("SELECT run_id, config_json, status FROM runs").fetchall():
        try:
            scoring_version = int(json.loads(config_json).get("scoring_version") or 1)
        except (ValueError, TypeError, AttributeError):
            scoring_version = 1
        if scoring_version < 2:
            db.execute("UPDATE runs SET n_chars_with_delimiter=1 WHERE run_id=?", (run_id,))
            continue
        rows = db.execute("SELECT position, label, logprobs_json, n_chars_json FROM examples WHERE run_id=?",
                          (run_id,)).fetchall()
        correct = 0
        for position, label, lps_json, ncs_json in rows:
            lps, ncs = json.loads(lps_json), json.loads(ncs_json)
            if not all(math.isfinite(x) for x in lps):
                continue  # a finished run never has these; a failed one keeps NULL
            pred = argmax_first(norm_char_scores(lps, ncs))
            correct += pred == label
            db.execute("UPDATE examples SET prediction_norm_char=? WHERE run_id=? AND position=?",
                       (pred, run_id, position))
        if status == "finished" and rows:
            db.execute("UPDATE runs SET accuracy_norm_char=? WHERE run_id=?", (correct / len(rows), run_id))


def _migrate_2_to_3(db: sqlite3.Connection) -> None:
    """Add the (empty) ``mixed_runs`` table."""
    db.execute(MIXED_SCHEMA)


def _migrate_3_to_4(db: sqlite3.Connection) -> None:
    """Add ``mixed_runs.latency_median_s``."""
    for column in MIXED_COLUMNS_4:
        db.execute(f"ALTER TABLE mixed_runs ADD COLUMN {column}")


# MIGRATIONS[v] takes a store from schema v to v + 1, inside the caller's transaction.
MIGRATIONS = {1: _migrate_1_to_2, 2: _migrate_2_to_3, 3: _migrate_3_to_4}
assert sorted(MIGRATIONS) == list(range(1, SCHEMA_VERSION))


def too_new_error(path: Path, version: int) -> HarnessError:
    return HarnessError(f"results store {path} has schema version {version}, newer than this harness knows "
                        f"({SCHEMA_VERSION}); upgrade harness (git pull && make setup) to read it")


def open_schema(db: sqlite3.Connection, path: Path) -> None:
    """Create a new store's tables or migrate an old store, in one IMMEDIATE transaction (all or nothing)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        version = schema_version(db)  # again inside the transaction: another process may have migrated it
        if version > SCHEMA_VERSION:
            raise too_new_error(path, version)
        if version == 0:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
        else:
            for v in range(version, SCHEMA_VERSION):
                MIGRATIONS[v](db)
        if version != SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
