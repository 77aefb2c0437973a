"""The results store: one SQLite file, one row per run, one row per evaluated example.

Guarantees:
- a run's row and its example rows are written in one transaction, so a process killed mid-run (even with
  kill -9) leaves nothing of that run, and the next invocation redoes it;
- finished runs are found by ``run_id`` (the config hash) and skipped;
- WAL mode and a generous busy timeout let several processes write one store without losing rows;
- failed runs are stored with status ``failed`` and their reason; they are retried on the next invocation;
- runs found wrong after the fact are marked ``withdrawn`` with the reason (``benchmarks/withdraw_runs.py``): kept, never
  reported, and never matched by a new plan when the fix changes the run ids; when the fix restores the numbers
  those ids stand for (a code tree that scored differently, ``--commit``), a re-run replaces them.
- a ``finished`` run never holds a NaN or infinite log-prob (:meth:`ExampleScore.check_finite`).

Per choice we keep the summed log-probability, its token count and its character count, so any normalization
(per token, per character, ...) can be recomputed from the store. The character count EXCLUDES the target
delimiter (the ``" "`` before an answer), as lm-evaluation-harness counts it for ``acc_norm``; stores of schema 1
counted it in, and their runs are marked (``n_chars_with_delimiter``, see below).

Schema versions and migrations: :mod:`harness.store_schema`.
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

from harness.choice import argmax_first, non_finite_message, norm_char_scores  # noqa: F401  (re-exported)
from harness.errors import HarnessError
from harness.store_schema import (METRIC_COLUMNS, MIGRATIONS, MIXED_SCHEMA, SCHEMA_VERSION,  # noqa: F401  (re-exported)
                                    open_schema, schema_version, too_new_error)

DEFAULT_STORE = Path("results") / "harness.sqlite"



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
                raise too_new_error(self.path, version)
            # WAL is a property of the file, so it is set once here, not on every connection. Switching to it
            # can answer "database is locked" at once, without waiting, while another process opens the same
            # new file: retry that instead of failing.
            _retry_while_locked(lambda: db.execute("PRAGMA journal_mode=WAL"))
            if version != SCHEMA_VERSION:  # a current store is not locked for writing just to be opened
                _retry_while_locked(lambda: open_schema(db, self.path))
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
