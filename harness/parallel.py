"""Train several PEFT groups at once, one process each, on one device (``harness run --workers N``).

The process pool behind :class:`harness.executors.LocalProcessExecutor` when ``workers > 1``.

The T-Few loop on a small model keeps a GPU a few percent busy: each step is bound by the host issuing
kernels, not by the GPU (docs/benchmarks.md). Groups trained side by side in separate processes (each with its
own Python interpreter issuing kernels) share the GPU at little cost to each other. Every worker loads the base
model itself and runs :func:`harness.peft_runner.run_peft_group`; the parent writes each result to the store as
soon as its group finishes, so the store keeps one writer and an interrupted run keeps every finished group.
Results equal a serial run's: each group is seeded and independent of the others (on the CPU to float32 rounding:
a worker's matrix products run on fewer threads, so their sums may be added in another order).

Threads: each worker sets ``torch.set_num_threads(threads // workers)`` (:func:`worker_threads`), unless
``OMP_NUM_THREADS`` says otherwise. Left at torch's default, every worker would start one thread per core: ``N``
workers on a machine of ``C`` cores ran ``N x C`` busy threads, and on 2 cores two (IA)3 trainings of 6 steps took
154-159 s where one thread each took 38-61 s (docs/benchmarks.md, "Threads of --workers").
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from harness.jobs import failed_results
from harness.batching import GPU_SHARE_ENV, gpu_share
from harness.spec import RunSpec
from harness.store import RunResult


def _train_group(specs: list[RunSpec], data_dir, artifacts_dir: Path, batch_size: int, env: dict,
                 compile: str | bool | None) -> list[RunResult]:
    """Worker body: load the base model and train and evaluate one group (the serial path's code)."""
    import torch

    from harness.methods import get_method
    from harness.models import load_model
    from harness.peft_runner import run_peft_group

    env = env | {"torch_threads": torch.get_num_threads()}  # this worker's, not the parent's (_init_worker)
    first = specs[0]
    quantize = get_method(first.method).quantize
    return list(run_peft_group(lambda: load_model(first.load_from, first.device, first.dtype, quantize=quantize),
                               first.load_task(),
                               specs, data_dir, artifacts_dir, batch_size=batch_size, progress=False, env=env,
                               compile=compile))


def worker_threads(workers: int) -> int | None:
    """Torch threads of each of ``workers`` processes: this process's threads (torch's default: one per core) split
    among them, at least 1; None where ``OMP_NUM_THREADS`` is set (the user's choice, which torch follows)."""
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return None
    import torch

    return max(1, torch.get_num_threads() // workers)


def worker_failure(exc: BaseException) -> str:
    """The one-line error stored on the runs of a unit whose worker process failed: a dead process (the pool
    broke) is most often one the OS killed for memory, so the line names that and the fix."""
    if isinstance(exc, BrokenProcessPool):
        return ("a worker process died (most often killed by the OS for lack of memory): run again with fewer "
                "--workers, a smaller --pack or --train-batch-size; finished runs stay stored and a rerun redoes "
                "only these")
    return f"worker process failed: {type(exc).__name__}: {exc}".strip()


def _init_worker(share: int, threads: int | None) -> None:
    """Worker initializer: this worker shares the GPU with ``share`` processes (:func:`harness.batching.gpu_share`)
    and runs ``threads`` torch threads (None: torch's default)."""
    os.environ[GPU_SHARE_ENV] = str(share)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _train_pack(groups: list[list[RunSpec]], data_dir, artifacts_dir: Path, batch_size: int, env: dict,
                compile: str | bool | None) -> list[RunResult]:
    """Worker body of ``--pack``: one group as :func:`_train_group`, several in one packed training."""
    if len(groups) == 1:
        return _train_group(groups[0], data_dir, artifacts_dir, batch_size, env, compile)
    import torch

    from harness.models import load_model
    from harness.packed_runner import run_pack

    env = env | {"torch_threads": torch.get_num_threads()}
    first = groups[0][0]
    return list(run_pack(lambda: load_model(first.load_from, first.device, first.dtype), groups, data_dir,
                         artifacts_dir, batch_size=batch_size, progress=False, env=env, compile=compile))


def run_packs(packs: list[list[list[RunSpec]]], workers: int, data_dir, artifacts_dir: Path, *, batch_size: int,
              envs: list[dict], compile: str | bool | None = "auto") -> Iterator[RunResult]:
    """:func:`run_groups` for packs of groups (``--pack N --workers M``): each pack trains in one worker process."""
    yield from _pool(_train_pack, packs, [[s for g in pack for s in g] for pack in packs], workers, data_dir,
                     artifacts_dir, batch_size, envs, compile)


def run_groups(groups: list[list[RunSpec]], workers: int, data_dir, artifacts_dir: Path, *, batch_size: int,
               envs: list[dict], compile: str | bool | None = "auto") -> Iterator[RunResult]:
    """Yield the results of every group, trained ``workers`` at a time in spawned processes, as groups finish.

    An error inside a group is recorded by :func:`run_peft_group` itself (failed runs, the other groups go on). A
    worker process that dies (killed for memory, a crash in a kernel) breaks the pool: every group not finished by
    then is recorded failed with a one-line error, and running the command again redoes just those. On
    KeyboardInterrupt the queued groups are cancelled and the running ones stopped; finished ones stay stored.
    """
    yield from _pool(_train_group, groups, groups, workers, data_dir, artifacts_dir, batch_size, envs, compile)


def _pool(body, units: list, specs_of: list[list[RunSpec]], workers: int, data_dir, artifacts_dir: Path,
          batch_size: int, envs: list[dict], compile) -> Iterator[RunResult]:
    """Run ``body(unit, ...)`` for every unit in ``workers`` spawned processes; ``specs_of[i]``: unit i's specs."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
    share = max(workers, gpu_share())  # each worker's evaluation batches take 1/share of the free GPU memory
    threads = worker_threads(workers)
    pool = futures.ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                                       initargs=(share, threads))
    try:
        pending = {pool.submit(body, unit, data_dir, artifacts_dir, batch_size, env, compile): (group, env)
                   for unit, group, env in zip(units, specs_of, envs)}
        for done in futures.as_completed(pending):
            group, env = pending[done]
            try:
                results = done.result()
            except Exception as exc:  # noqa: BLE001 - the worker process died; its group is recorded as failed
                results = failed_results(group, worker_failure(exc), env)
            yield from results
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        # shutdown() does not stop running tasks; the executor keeps its processes in a private dict
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
        raise
    pool.shutdown(wait=True)
