"""The results store: one SQLite file, one row per run, one row per evaluated example.

Guarantees:
- a run's row and its example rows are written in one transaction, so a process killed mid-run (even with
  kill -9) leaves nothing of that run, and the next invocation redoes it;
- finished runs are found by ``run_id`` (the config hash) and skipped;
- WAL mode and a generous busy timeout let several processes write one store without losing rows;
- failed runs are stored with status ``failed`` and their reason; they are retried on the next invocation;
- runs found wrong after the fact are marked ``withdrawn`` with the reason (``benchmarks/withdraw_runs.py``): kept, never
  reported, and never matched by a new plan (a fix that changes numbers changes the run ids).
- a ``finished`` run never holds a NaN or infinite log-prob (:meth:`ExampleScore.check_finite`).

Per choice we keep the summed log-probability, its token count and its character count, so any normalization
(per token, per character, ...) can be recomputed from the store. The character count EXCLUDES the target
delimiter (the ``" "`` before an answer), as lm-evaluation-harness counts it for ``acc_norm``; stores of schema 1
counted it in, and their runs are marked (``n_chars_with_delimiter``, see below).

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

import contextlib
import dataclasses
import json
import math
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from harness.choice import argmax_first, non_finite_message
from harness.errors import HarnessError

DEFAULT_STORE = Path("results") / "harness.sqlite"

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


@dataclasses.dataclass
class ExampleScore:
    """Scores of one evaluated example: per choice summed log-prob, token and character counts.

    ``n_chars`` counts the characters of the choice WITHOUT the target delimiter (lm-eval's ``len(choice)``).
    Every prediction raises :class:`~harness.errors.HarnessError` naming the example and the choice when a
    log-prob is NaN or infinite (an overflow in low precision, a broken model): such a run must fail, not finish.
    """

    example_id: str
    label: int
    logprobs: list[float]
    n_tokens: list[int]
    n_chars: list[int]

    def check_finite(self) -> None:
        """Raise :class:`HarnessError` naming the example and the first choice whose log-prob is NaN or inf."""
        for i, lp in enumerate(self.logprobs):
            if not math.isfinite(lp):
                raise HarnessError(non_finite_message(self.example_id, i, lp))

    @property
    def prediction(self) -> int:
        """argmax of the summed log-prob."""
        return argmax_first(self.logprobs, example_id=self.example_id)

    @property
    def prediction_norm(self) -> int:
        """argmax of the per-token mean log-prob (T-Few)."""

        self.check_finite()
        return argmax_first([lp / max(n, 1) for lp, n in zip(self.logprobs, self.n_tokens)],
                            example_id=self.example_id)

    @property
    def prediction_norm_char(self) -> int:
        """argmax of the log-prob per character of the choice without the delimiter (lm-eval ``acc_norm``)."""

        self.check_finite()
        return argmax_first(norm_char_scores(self.logprobs, self.n_chars), example_id=self.example_id)


def norm_char_scores(logprobs: list[float], n_chars: list[int]) -> list[float]:
    """``logprob / n_chars`` per choice (an empty choice counts as one character, as per token)."""
    return [lp / max(n, 1) for lp, n in zip(logprobs, n_chars)]


@dataclasses.dataclass
class RunResult:
    """Everything one run produced, ready to be written in one transaction."""

    run_id: str
    config: dict
    status: str  # "finished" | "failed"
    metrics: dict = dataclasses.field(default_factory=dict)
    examples: list[ExampleScore] = dataclasses.field(default_factory=list)
    error: str | None = None
    artifact_path: str | None = None
    env: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)
    is_random: bool = False


BUSY_SECONDS = 120  # how long a writer waits for another process's transaction before giving up


def _retry_while_locked(operation, seconds: float = BUSY_SECONDS):
    """Run ``operation()``, retrying for up to ``seconds`` while SQLite says the database is locked or busy."""
    deadline = time.monotonic() + seconds
    delay = 0.01
    while True:
        try:
            return operation()
        except sqlite3.OperationalError as err:
            if not ("locked" in str(err) or "busy" in str(err)) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


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


def _too_new(path: Path, version: int) -> HarnessError:
    return HarnessError(f"results store {path} has schema version {version}, newer than this harness knows "
                        f"({SCHEMA_VERSION}); upgrade harness (git pull && make setup) to read it")


def _open_schema(db: sqlite3.Connection, path: Path) -> None:
    """Create a new store's tables or migrate an old store, in one IMMEDIATE transaction (all or nothing)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        version = schema_version(db)  # again inside the transaction: another process may have migrated it
        if version > SCHEMA_VERSION:
            raise _too_new(path, version)
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


def _predictions(ex: ExampleScore) -> tuple[int, int, int]:
    """(prediction, prediction_norm, prediction_norm_char); -1 for each when a score is not finite (only a failed
    run can get here with one: :meth:`Store.write` refuses it in a finished run)."""
    try:
        return ex.prediction, ex.prediction_norm, ex.prediction_norm_char
    except HarnessError:
        return -1, -1, -1


class Store:
    """A results store at ``path`` (created on first use; an older schema is migrated on opening)."""

    def __init__(self, path: str | Path = DEFAULT_STORE):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = self._connect()
        try:
            version = _retry_while_locked(lambda: schema_version(db))
            if version > SCHEMA_VERSION:  # refused before anything (even the journal mode) is written
                raise _too_new(self.path, version)
            # WAL is a property of the file, so it is set once here, not on every connection. Switching to it
            # can answer "database is locked" at once, without waiting, while another process opens the same
            # new file: retry that instead of failing.
            _retry_while_locked(lambda: db.execute("PRAGMA journal_mode=WAL"))
            if version != SCHEMA_VERSION:  # a current store is not locked for writing just to be opened
                _retry_while_locked(lambda: _open_schema(db, self.path))
        finally:
            db.close()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=BUSY_SECONDS, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA foreign_keys=ON")
        return db

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A connection inside one IMMEDIATE transaction: committed when the block ends, rolled back (and the
        exception raised again) when it raises."""
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    @property
    def folder(self) -> Path:
        """Folder for artifacts (adapters) beside the database: ``<store>.artifacts/``."""
        return self.path.with_name(self.path.stem + ".artifacts")

    def finished_ids(self, calibrated: bool = False) -> set[str]:
        """Ids of finished runs; ``calibrated``: only those run with ``calibrate`` (their calibrated figures)."""
        sql = "SELECT run_id FROM runs WHERE status='finished'"
        if calibrated:
            sql += " AND json_extract(config_json, '$.calibrate') = 1"
        with self._connect() as db:
            return {r[0] for r in db.execute(sql)}

    def write(self, result: RunResult) -> None:
        """Write one run and its examples atomically, replacing any earlier (failed) attempt."""
        cfg = result.config
        metrics = {c: result.metrics.get(c) for c in METRIC_COLUMNS}
        extra = {k: v for k, v in result.metrics.items() if k not in METRIC_COLUMNS} | result.extra
        row = {
            "run_id": result.run_id, "status": result.status, "task": cfg.get("task"), "method": cfg.get("method"),
            "model": cfg.get("model"), "template": cfg.get("template"), "seed": cfg.get("seed"), "k": cfg.get("k"),
            "preset": cfg.get("preset"), "is_random": int(result.is_random), **metrics, "error": result.error,
            "artifact_path": result.artifact_path, "config_json": json.dumps(cfg, sort_keys=True, default=str),
            "env_json": json.dumps(result.env, sort_keys=True, default=str),
            "extra_json": json.dumps(extra, sort_keys=True, default=str), "finished_at": time.time(),
        }
        if result.status == "finished":  # a finished run never holds a NaN/inf score: this raises HarnessError
            for ex in result.examples:
                ex.check_finite()
        with self.transaction() as db:
            db.execute("DELETE FROM examples WHERE run_id=?", (result.run_id,))
            db.execute("DELETE FROM runs WHERE run_id=?", (result.run_id,))
            db.execute(f"INSERT INTO runs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
            rows = [(result.run_id, i, ex.example_id, ex.label, *_predictions(ex), json.dumps(ex.logprobs),
                     json.dumps(ex.n_tokens), json.dumps(ex.n_chars)) for i, ex in enumerate(result.examples)]
            db.executemany(
                "INSERT INTO examples (run_id, position, example_id, label, prediction, prediction_norm, "
                "prediction_norm_char, logprobs_json, n_tokens_json, n_chars_json) VALUES (?,?,?,?,?,?,?,?,?,?)",
                rows,
            )

    def runs(self, status: str | None = None, include_random: bool = True) -> list[dict]:
        """Runs as flat dicts: columns plus ``config`` (dict), ``env`` and ``extra`` fields merged in."""
        sql = "SELECT * FROM runs"
        where, args = [], []
        if status:
            where.append("status=?")
            args.append(status)
        if not include_random:
            where.append("is_random=0")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY task, method, model, template, seed, k, run_id"
        with self._connect() as db:
            rows = [dict(r) for r in db.execute(sql, args)]
        out = []
        for r in rows:
            config = json.loads(r.pop("config_json"))
            env = json.loads(r.pop("env_json") or "{}")
            extra = json.loads(r.pop("extra_json") or "{}")
            for key in ("n_eval", "trainable_params", "total_params", "checkpoint_bytes", "peak_memory_bytes"):
                if r.get(key) is not None:
                    r[key] = int(r[key])
            r["is_random"] = bool(r["is_random"])
            r["n_chars_with_delimiter"] = bool(r["n_chars_with_delimiter"])
            out.append({**extra, **r, "config": config, "env": env})
        return out

    def get_run(self, run_id: str) -> dict | None:
        for r in self.runs():
            if r["run_id"] == run_id or r["run_id"].startswith(run_id):
                return r
        return None

    def examples(self, run_ids: Iterable[str] | None = None) -> Iterator[dict]:
        """Per-example rows: run_id, position, example_id, label, prediction, prediction_norm,
        prediction_norm_char (None for runs migrated from schema 1) and choices (logprob, n_tokens, n_chars)."""
        sql = "SELECT * FROM examples"
        args: list = []
        if run_ids is not None:
            ids = list(run_ids)
            sql += f" WHERE run_id IN ({', '.join('?' * len(ids))})"
            args = ids
        sql += " ORDER BY run_id, position"
        with self._connect() as db:
            for r in db.execute(sql, args):
                lps, nts, ncs = (json.loads(r[c]) for c in ("logprobs_json", "n_tokens_json", "n_chars_json"))
                yield {
                    "run_id": r["run_id"], "position": r["position"], "example_id": r["example_id"],
                    "label": r["label"], "prediction": r["prediction"], "prediction_norm": r["prediction_norm"],
                    "prediction_norm_char": r["prediction_norm_char"],
                    "choices": [{"logprob": a, "n_tokens": b, "n_chars": c} for a, b, c in zip(lps, nts, ncs)],
                }
