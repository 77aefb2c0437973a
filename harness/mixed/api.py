"""``harness mixed`` in Python: :func:`run_mixed` serves the queries of finished runs in the store in mixed-task
batches, task by task and (LoRA, (IA)3) from merged weights, and stores one ``mixed_runs`` row per method and mode.

The runs are chosen and checked by :func:`harness.mixed.plan.plan_mixed` before any model loads, then served by
:func:`harness.mixed.execute.execute_plans`. The queries of a task are the first ``limit`` (default: all) of the
examples its run evaluated, on the run's model, dtype and device (``device`` overrides the device);
``max_abs_diff`` compares each mode's log-probs with the run's stored ones (float32 on the run's device: the
equality check, expected <= :data:`harness.mixed.execute.EQUALITY_TOLERANCE` for ``mixed``).
"""

from __future__ import annotations

from pathlib import Path

from harness.errors import HarnessError
from harness.mixed.execute import execute_plans
from harness.mixed.plan import plan_mixed
from harness.store import Store


def run_mixed(store: str | Path, methods: list[str], tasks: list[str], *, seed: int | None = None,
              template: str | None = None, limit: int | None = None, batch_size: int = 8, device: str | None = None,
              data_dir=None, progress: bool = False) -> list[dict]:
    """Serve the chosen runs' queries in every mode of each method, write and return the ``mixed_runs`` rows."""
    if batch_size < 1:
        raise HarnessError("--batch-size must be >= 1")
    if limit is not None and limit < 1:
        raise HarnessError("--limit must be >= 1")
    if not Path(store).is_file():
        raise HarnessError(f"no results store at {store}; run `harness run ...` first or pass --store PATH")
    db = Store(store)
    plans = plan_mixed(db, methods, tasks, seed, template)
    return execute_plans(db, plans, limit=limit, batch_size=batch_size, device=device, data_dir=data_dir,
                         progress=progress)
