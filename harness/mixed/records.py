"""The ``mixed_runs`` table of the store (schema 3 and 4, :data:`harness.store.MIXED_SCHEMA`): one row per
(mixed run, method, serving mode).

Modes: ``mixed`` (one stream, batches of rows of different tasks, every task's adapter or demonstrations loaded at
once), ``task_by_task`` (the same queries, each task's queries together, one adapter loaded at a time) and
``merged`` (LoRA, (IA)3: each task's adapter merged into a copy of the base weights, served task by task).

Columns: ``examples_per_second`` = queries / ``seconds`` (the batches' wall time; ``setup_seconds`` apart: loading
adapters, merging, encoding the per-task prefixes); ``latency_mean_s`` / ``latency_median_s`` (schema 4) /
``latency_p90_s`` per batch; ``peak_memory_bytes`` (CUDA: max allocated in that mode; CPU on Linux: the process's
peak resident set in that mode, the high-water mark reset before it through ``/proc/self/clear_refs``; elsewhere
the peak RSS so far, which never goes down); ``state_bytes`` (per-task tensors held at once: adapters, soft
prompts and prefix KV caches); ``flops_per_example`` (forward FLOPs with the method's overhead, each task's prefix
counted once: :mod:`harness.costs`); ``tasks_per_batch`` (mean distinct tasks in a batch); ``max_abs_diff``
(largest |log-prob| difference from the stored single-task runs, ``run_ids_json``).
"""

from __future__ import annotations

import json
import time

from harness.store import Store

COLUMNS = ("mixed_id", "method", "mode", "tasks", "n_tasks", "model", "device", "dtype", "batch_size", "n_examples",
           "examples_per_second", "latency_mean_s", "latency_median_s", "latency_p90_s", "seconds", "setup_seconds",
           "peak_memory_bytes", "state_bytes", "flops_per_example", "tasks_per_batch", "max_abs_diff",
           "run_ids_json", "config_json", "env_json", "created_at")
MODES = ("mixed", "task_by_task", "merged")


def write_mixed(store: Store, rows: list[dict]) -> None:
    """Write rows (dicts with :data:`COLUMNS`; ``run_ids``, ``config`` and ``env`` as Python values) in one
    transaction, replacing earlier rows of the same (mixed_id, method, mode)."""
    with store.transaction() as db:
        for row in rows:
            values = dict(row)
            values["run_ids_json"] = json.dumps(values.pop("run_ids"), sort_keys=True)
            values["config_json"] = json.dumps(values.pop("config"), sort_keys=True, default=str)
            values["env_json"] = json.dumps(values.pop("env", {}), sort_keys=True, default=str)
            values.setdefault("created_at", time.time())
            db.execute(f"INSERT OR REPLACE INTO mixed_runs ({', '.join(COLUMNS)}) VALUES "
                       f"({', '.join('?' * len(COLUMNS))})", [values.get(c) for c in COLUMNS])


def mixed_rows(store: Store) -> list[dict]:
    """Every ``mixed_runs`` row, newest run first (``run_ids``, ``config``, ``env`` parsed)."""
    with store._connect() as db:
        rows = [dict(r) for r in db.execute("SELECT * FROM mixed_runs ORDER BY created_at DESC, method, mode")]
    for r in rows:
        r["run_ids"] = json.loads(r.pop("run_ids_json"))
        r["config"] = json.loads(r.pop("config_json"))
        r["env"] = json.loads(r.pop("env_json") or "{}")
    return rows
