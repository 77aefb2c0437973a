"""The results store: one SQLite file, one row per run, one row per evaluated example.

Guarantees:
- a run's row and its example rows are written in one transaction, so a process killed mid-run (even with
  kill -9) leaves nothing of that run, and the next invocation redoes it;
- finished runs are found by ``run_id`` (the config hash) and skipped;
- WAL mode and a generous busy timeout let several processes write one store without losing rows;
- failed runs are stored with status ``failed`` and their reason; they are retried on the next invocation.

Per choice we keep the summed log-probability, its token count and its character count, so any normalization
(per token, per character, ...) can be recomputed from the store.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

DEFAULT_STORE = Path("results") / "harness.sqlite"

# Metric columns of the runs table (all nullable). Their definitions are in docs/metrics.md.
METRIC_COLUMNS = (
    "n_eval",
    "accuracy",
    "accuracy_norm",
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
    finished_at REAL
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
    PRIMARY KEY (run_id, position)
);
CREATE INDEX IF NOT EXISTS runs_cell ON runs(task, method, model);
"""


@dataclasses.dataclass
class ExampleScore:
    """Scores of one evaluated example: per choice summed log-prob, token and character counts."""

    example_id: str
    label: int
    logprobs: list[float]
    n_tokens: list[int]
    n_chars: list[int]

    @property
    def prediction(self) -> int:
        from harness.scoring import argmax_first

        return argmax_first(self.logprobs)

    @property
    def prediction_norm(self) -> int:
        from harness.scoring import argmax_first

        return argmax_first([lp / max(n, 1) for lp, n in zip(self.logprobs, self.n_tokens)])


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


class Store:
    """A results store at ``path`` (created on first use)."""

    def __init__(self, path: str | Path = DEFAULT_STORE):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = self._connect()
        try:
            # WAL is a property of the file, so it is set once here, not on every connection. Switching to it
            # can answer "database is locked" at once, without waiting, while another process opens the same
            # new file: retry that instead of failing.
            _retry_while_locked(lambda: db.execute("PRAGMA journal_mode=WAL"))
            _retry_while_locked(lambda: db.executescript(SCHEMA))
        finally:
            db.close()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=BUSY_SECONDS, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA foreign_keys=ON")
        return db

    @property
    def folder(self) -> Path:
        """Folder for artifacts (adapters) beside the database: ``<store>.artifacts/``."""
        return self.path.with_name(self.path.stem + ".artifacts")

    def finished_ids(self) -> set[str]:
        with self._connect() as db:
            return {r[0] for r in db.execute("SELECT run_id FROM runs WHERE status='finished'")}

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
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM examples WHERE run_id=?", (result.run_id,))
            db.execute("DELETE FROM runs WHERE run_id=?", (result.run_id,))
            db.execute(f"INSERT INTO runs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
            db.executemany(
                "INSERT INTO examples VALUES (?,?,?,?,?,?,?,?,?)",
                [(result.run_id, i, ex.example_id, ex.label, ex.prediction, ex.prediction_norm,
                  json.dumps(ex.logprobs), json.dumps(ex.n_tokens), json.dumps(ex.n_chars))
                 for i, ex in enumerate(result.examples)],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            db.close()

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
            out.append({**extra, **r, "config": config, "env": env})
        return out

    def get_run(self, run_id: str) -> dict | None:
        for r in self.runs():
            if r["run_id"] == run_id or r["run_id"].startswith(run_id):
                return r
        return None

    def examples(self, run_ids: Iterable[str] | None = None) -> Iterator[dict]:
        """Per-example rows: run_id, position, example_id, label, prediction, prediction_norm, choices."""
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
                    "choices": [{"logprob": a, "n_tokens": b, "n_chars": c} for a, b, c in zip(lps, nts, ncs)],
                }
