"""Where the jobs of ``harness run`` execute: one interface, a local and a Ray implementation.

:func:`harness.api.run` skips the runs already finished in the store, cuts the others into jobs
(:func:`harness.jobs.make_jobs`) and hands them to an :class:`Executor`, which yields one
:class:`~harness.store.RunResult` per run as jobs finish. Only ``api.run``, in the driver process, writes the store
(one writer; each run in its own transaction), so an interrupted command keeps every result received so far and
the next one skips them by run id, whichever executor ran them.

- :class:`LocalProcessExecutor` (``--workers N``, the default ``--executor local``): in-context jobs in this process
  with one loaded model per model; PEFT groups in this process too (``workers == 1``, the serial path, which alone
  accepts a custom model loader) or ``workers`` at a time in spawned processes (:mod:`harness.parallel`); with
  ``--pack N``, up to N groups of one packable method train together in one model (:mod:`harness.packed_runner`).
- :class:`~harness.ray_executor.RayExecutor` (``--executor ray``): every job is a Ray task with a resource request
  (``--cpus-per-run``, ``--gpus-per-run``), on a local Ray instance or a cluster (``--ray-address``); a task whose
  worker or node dies is retried.

Results do not depend on the executor: jobs are seeded and independent (tests/test_parallel.py,
tests/test_executor_ray.py compare the stored numbers). On CPU, float32 sums do depend on the number of torch
threads: the local executor's processes use torch's default (every core), a Ray task ``--cpus-per-run`` threads,
and only runs with the same thread count agree bit for bit (others within about 1e-5 in log-prob). Ray is an optional dependency (``pip install
'harness[ray]'``); nothing here imports it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from typing import Protocol

from harness import parallel
from harness.errors import HarnessError
from harness.jobs import Job, JobContext, run_icl_job, run_peft_job
from harness.models import LoadedModel, resolve_device_dtype
from harness.spec import RunSpec
from harness.store import RunResult

EXECUTORS = ("local", "ray")
RAY_INSTALL = "pip install 'harness[ray]'"

Loader = Callable[[RunSpec], LoadedModel]
EnvOf = Callable[[str, object], dict]  # (model display name, torch device) -> the environment description


class Executor(Protocol):
    """Runs jobs and yields their results as they finish (never writes the store)."""

    name: str
    accepts_loader: bool  # whether a custom ``loader`` (api.run) can be used: models load in this process

    def check(self, specs: list[RunSpec]) -> None:
        """Raise :class:`HarnessError` when ``specs`` cannot run here (before any model loads)."""

    def execute(self, jobs: list[Job], ctx: JobContext, load: Loader, env_of: EnvOf) -> Iterator[RunResult]:
        """Yield one result per spec of every job (in any order)."""


class LocalProcessExecutor:
    """This machine: serially in this process, or PEFT groups ``workers`` at a time in spawned processes."""

    name = "local"

    def __init__(self, workers: int = 1, pack: int = 1):
        if workers < 1:
            raise HarnessError(f"--workers must be >= 1, got {workers}")
        check_pack(pack)
        self.workers = workers
        self.pack = pack

    @property
    def accepts_loader(self) -> bool:
        return self.workers == 1

    def check(self, specs: list[RunSpec]) -> None:
        return None

    def execute(self, jobs: list[Job], ctx: JobContext, load: Loader, env_of: EnvOf) -> Iterator[RunResult]:
        lm, loaded_from = None, None
        for job in (j for j in jobs if j.kind == "icl"):  # one loaded model for all in-context runs of a model
            first = job.specs[0]  # a job's runs share their model
            if lm is None or loaded_from != first.load_from:
                lm = None  # the previous model is freed before the next one loads
                lm, loaded_from = load(first), first.load_from
            yield from run_icl_job(lm, job, ctx, env_of(first.model, lm.device))
        del lm
        trained = [j for j in jobs if j.kind == "peft"]
        if not trained:
            return
        if self.pack > 1:
            yield from self._execute_packs(trained, ctx, load, env_of)
            return
        if self.workers > 1:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the in-context model's memory, for the workers
            groups = [list(j.specs) for j in trained]
            envs = [env_of(g[0].model, resolve_device_dtype(g[0].device)[0]) | {"workers": self.workers}
                    for g in groups]
            yield from parallel.run_groups(groups, self.workers, ctx.data_dir, ctx.artifacts_dir,
                                           batch_size=ctx.batch_size, envs=envs, compile=ctx.compile)
            return
        for job in trained:
            first = job.specs[0]
            yield from run_peft_job(lambda: load(first), job, ctx,
                                    env_of(first.model, resolve_device_dtype(first.device)[0]))


    def _execute_packs(self, trained: list[Job], ctx: JobContext, load: Loader, env_of: EnvOf) -> Iterator[RunResult]:
        """``--pack N``: up to N groups of one packable method per training (:mod:`harness.packed_runner`), the
        packs in this process (``workers == 1``) or ``workers`` at a time in spawned processes."""
        from harness.packed_runner import make_packs

        packs = [[list(j.specs) for j in pack] for pack in make_packs(trained, self.pack)]
        envs = [env_of(p[0][0].model, resolve_device_dtype(p[0][0].device)[0])
                | ({"workers": self.workers} if self.workers > 1 else {}) for p in packs]
        if self.workers > 1:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            yield from parallel.run_packs(packs, self.workers, ctx.data_dir, ctx.artifacts_dir,
                                          batch_size=ctx.batch_size, envs=envs, compile=ctx.compile)
            return
        from harness.packed_runner import run_pack

        for pack, env in zip(packs, envs):
            first = pack[0][0]
            if len(pack) == 1:
                yield from run_peft_job(lambda: load(first), Job("peft", tuple(pack[0])), ctx, env)
            else:
                yield from run_pack(lambda: load(first), pack, ctx.data_dir, ctx.artifacts_dir,
                                    batch_size=ctx.batch_size, progress=ctx.progress, env=env, compile=ctx.compile)


def check_pack(pack) -> None:
    """``--pack N``: an integer >= 1 (one-line :class:`HarnessError` otherwise)."""
    if isinstance(pack, bool) or not isinstance(pack, int) or pack < 1:
        raise HarnessError(f"--pack must be an integer >= 1, got {pack!r}")


def ray_available() -> bool:
    """Whether ``import ray`` would work (without importing it)."""
    return importlib.util.find_spec("ray") is not None


def make_executor(kind: str = "local", *, workers: int | None = None, ray_address: str | None = None,
                  gpus_per_run: float | None = None, cpus_per_run: float | None = None, pack: int = 1) -> Executor:
    """The executor the ``harness run`` options ask for, every option checked (one-line :class:`HarnessError`).

    ``workers``: local: PEFT groups at once (default 1); Ray without an address: the size of the local Ray
    instance, in runs (``num_cpus = workers * cpus_per_run``; default: every CPU). ``ray_address``: ``auto`` or
    ``HOST:PORT`` of a running cluster. ``gpus_per_run``/``cpus_per_run``: each Ray task's resource request.
    ``pack``: local: training groups of one packable method trained N at a time in one model
    (:mod:`harness.packed_runner`); the Ray executor does not pack."""
    if kind not in EXECUTORS:
        raise HarnessError(f"unknown --executor {kind!r}; use {' or '.join(EXECUTORS)}")
    if workers is not None and workers < 1:
        raise HarnessError(f"--workers must be >= 1, got {workers}")
    check_pack(pack)
    if kind != "local" and pack > 1:
        raise HarnessError("--pack needs --executor local (Ray tasks train one group each)")
    if kind == "local":
        for given, option in ((ray_address, "--ray-address"), (gpus_per_run, "--gpus-per-run"),
                              (cpus_per_run, "--cpus-per-run")):
            if given is not None:
                raise HarnessError(f"{option} needs --executor ray (the local executor's option is --workers N)")
        return LocalProcessExecutor(workers or 1, pack)
    if gpus_per_run is not None and (gpus_per_run <= 0 or (gpus_per_run > 1 and gpus_per_run != int(gpus_per_run))):
        raise HarnessError(f"--gpus-per-run must be a fraction in (0, 1] or a whole number of GPUs, got {gpus_per_run}")
    if cpus_per_run is not None and cpus_per_run <= 0:
        raise HarnessError(f"--cpus-per-run must be > 0, got {cpus_per_run}")
    if ray_address is not None and not ray_address.strip():
        raise HarnessError("--ray-address is empty; give auto or HOST:PORT, or leave it out for a local Ray instance")
    if ray_address and workers is not None:
        raise HarnessError("--workers sizes a local Ray instance; with --ray-address the cluster's resources decide "
                           "how many runs go at once (see --cpus-per-run, --gpus-per-run)")
    if not ray_available():
        raise HarnessError(f"--executor ray needs Ray, which is not installed: {RAY_INSTALL}")
    from harness.ray_executor import RayExecutor

    return RayExecutor(address=ray_address, gpus_per_run=gpus_per_run, cpus_per_run=cpus_per_run or 1.0,
                       local_runs=workers)
