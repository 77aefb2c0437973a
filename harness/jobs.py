"""The units of work an executor runs: batches of in-context runs and PEFT training groups.

:func:`make_jobs` cuts the runs ``harness run`` still has to do into jobs:

- ``icl``: in-context runs (zero-shot and k-shot) of one model and task, at most :data:`ICL_BATCH` of them, scored
  with one loaded model;
- ``peft``: one training group (``RunSpec.train_group``): one adapter trained, then scored with every template.

Every job is seeded and independent of the others, so the results do not depend on where or in which order jobs
run (on CPU, given the same number of torch threads: :mod:`harness.executors`). :func:`run_icl_job` and :func:`run_peft_job` are the job bodies, the same code whichever executor
(:mod:`harness.executors`) runs them; neither raises for a failed run (it is recorded ``failed``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

from harness.methods import get_method
from harness.models import LoadedModel
from harness.spec import RunSpec
from harness.store import RunResult

# In-context runs per job: small enough that a killed worker or driver loses little, large enough that loading the
# model (about 2 s for the embedded model on a CPU) is paid for several runs.
ICL_BATCH = 8


@dataclasses.dataclass(frozen=True)
class Job:
    """One unit of work: ``kind`` ``"icl"`` or ``"peft"``, and the specs it produces a result for."""

    kind: str
    specs: tuple[RunSpec, ...]

    @property
    def run_ids(self) -> list[str]:
        return [s.run_id for s in self.specs]

    def describe(self) -> str:
        """A short name for logs and errors, e.g. ``peft cb/lora/seed 0 (3 runs)``."""
        first = self.specs[0]
        what = f"{first.task}/{first.method}/seed {first.seed}" if self.kind == "peft" else f"{first.task}"
        return f"{self.kind} {what} ({len(self.specs)} run{'s' if len(self.specs) != 1 else ''})"


@dataclasses.dataclass(frozen=True)
class JobContext:
    """What every job of one ``run`` shares: where rows are read and adapters written, and run-time options that
    are not part of a run's identity."""

    data_dir: Path | None
    artifacts_dir: Path
    batch_size: int = 8
    compile: str | bool | None = "auto"
    progress: bool = False


def make_jobs(todo: list[RunSpec], icl_batch: int = ICL_BATCH) -> list[Job]:
    """The jobs of ``todo``: in-context batches first (by model and task, in plan order), then the training
    groups (in order of first appearance)."""
    in_context: dict[tuple, list[RunSpec]] = {}
    groups: dict[tuple, list[RunSpec]] = {}
    for spec in todo:
        if get_method(spec.method).kind == "peft":
            groups.setdefault(spec.train_group, []).append(spec)
        else:
            in_context.setdefault((spec.load_from, spec.task), []).append(spec)
    jobs = [Job("icl", tuple(chunk)) for specs in in_context.values() for chunk in _pack_curves(specs, icl_batch)]
    return jobs + [Job("peft", tuple(specs)) for specs in groups.values()]


def _pack_curves(specs: list[RunSpec], icl_batch: int) -> list[list[RunSpec]]:
    """Cut in-context specs into chunks of at most ``icl_batch``, never splitting a k-curve
    (:func:`harness.icl_runner.curve_key`: its runs share one prefix cache), which may alone exceed it."""
    from harness.icl_runner import curve_key

    curves: dict[tuple, list[RunSpec]] = {}
    for spec in specs:
        curves.setdefault(curve_key(spec), []).append(spec)
    chunks: list[list[RunSpec]] = []
    for curve in curves.values():
        if chunks and len(chunks[-1]) + len(curve) <= icl_batch:
            chunks[-1].extend(curve)
        else:
            chunks.append(list(curve))
    return chunks


def run_icl_job(lm: LoadedModel, job: Job, ctx: JobContext, env: dict) -> Iterator[RunResult]:
    """Score every in-context run of ``job`` with the loaded model ``lm``."""
    from harness.icl_runner import run_icl_curve

    yield from run_icl_curve(lm, list(job.specs), ctx.data_dir, batch_size=ctx.batch_size, progress=ctx.progress,
                             env=env)


def run_peft_job(load_base: Callable[[], LoadedModel], job: Job, ctx: JobContext, env: dict,
                 artifacts_dir: Path | None = None) -> Iterator[RunResult]:
    """Train the group of ``job`` once and score every template (:func:`harness.peft_runner.run_peft_group`);
    the adapter goes under ``artifacts_dir`` (default ``ctx.artifacts_dir``)."""
    from harness.peft_runner import run_peft_group

    first = job.specs[0]
    yield from run_peft_group(load_base, first.load_task(), list(job.specs), ctx.data_dir,
                              artifacts_dir or ctx.artifacts_dir, batch_size=ctx.batch_size, progress=ctx.progress,
                              env=env, compile=ctx.compile)


def failed_results(specs, error: str, env: dict) -> list[RunResult]:
    """A ``failed`` result with ``error`` (one line) for every spec: what a job that could not run leaves."""
    return [RunResult(run_id=s.run_id, config=s.config(), status="failed", error=error, env=env) for s in specs]
