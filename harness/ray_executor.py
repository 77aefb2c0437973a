"""``harness run --executor ray``: every job is a Ray task; results stream back to the one store writer.

Each job (:mod:`harness.jobs`: a batch of in-context runs of one model and task, or one PEFT training group) is a
Ray task asking for ``cpus_per_run`` CPUs and, for runs planned on CUDA, ``gpus_per_run`` GPUs (default 1; a
fraction such as 0.25 packs four small trainings on one GPU; Ray does not split the GPU's memory, the runs must
fit side by side). The driver collects finished tasks with ``ray.wait`` and yields their results to
:func:`harness.api.run`, which writes them, so the store stays on the driver with one writer.

Fault tolerance:

- a task whose worker process or node dies is re-queued by Ray (``max_retries``, default :data:`MAX_RETRIES`);
  a task returns its results once, and ``api.run`` keeps the first result of a run id (the store replaces a
  run's row anyway), so a retry never duplicates rows. After the last retry its runs are stored ``failed``;
- a job raising (a model that cannot load, inputs that differ from the driver's) is not retried: its runs are
  stored ``failed`` with the one-line error, and the other jobs go on;
- when the driver dies, its tasks die with it (Ray ties a task to its owner); finished runs are in the store and
  the same command, run again, skips them by run id.

Each task checks, before it loads anything, that its node reads the driver's inputs: the model's fingerprint and
every run's data hash (:func:`harness.api.check_inputs`), so a node with other weights or data fails its runs
instead of storing them under the driver's run ids. The data folder travels as the driver's path (the embedded
data as "the package's own", the Hub as the Hub), so every node needs the same files at the same path. A task
on another node than the driver's trains into a temporary folder and sends the adapter's files back with its
results; the driver writes them under the store's artifacts folder (a task on the driver's node writes there
itself). Run environments are described on the node that ran them (``env.executor = "ray"``, ``env.ray_node``).

A task runs torch with ``cpus_per_run`` threads (rounded down, at least 1). On CPU that is a numerics setting:
float32 sums depend on the thread count, so a task's numbers equal bit for bit a serial run's with as many threads
(``OMP_NUM_THREADS=1 harness run ...`` for the default of 1), and differ from a run on more threads by about 1e-5
in log-prob (well inside ``harness check``'s default 1e-4).

Ray is imported only when a Ray executor runs (``pip install 'harness[ray]'``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from harness.data import builtin_data_dir
from harness.errors import HarnessError
from harness.jobs import Job, JobContext, failed_results, run_icl_job, run_peft_job
from harness.spec import RunSpec
from harness.store import RunResult

log = logging.getLogger("harness")

MAX_RETRIES = 3  # a task whose worker or node dies runs again, at most this many times
BUILTIN, HUB = "builtin", "hub"  # data locations that do not name a folder of the driver


@dataclasses.dataclass(frozen=True)
class RemoteContext:
    """What a task needs besides its job: a :class:`JobContext` whose paths are the driver's."""

    data: str  # BUILTIN, HUB, or the driver's data folder
    artifacts_dir: str  # the driver's
    batch_size: int
    compile: str | bool | None
    driver_node: str  # the Ray node id of the driver
    cpus: float  # CPUs each task asked for: its torch threads
    ship_artifacts: bool | None  # None: send the adapter back when the task runs on another node
    env: dict  # recorded with every run, beside the node's own description


def data_location(folder: Path | None) -> str:
    """How a data folder travels to a task: the embedded data and the Hub by name, a folder by its path."""
    if folder is None:
        return HUB
    return BUILTIN if Path(folder).resolve() == builtin_data_dir().resolve() else str(folder)


def worker_data_dir(location: str) -> Path | None:
    """The folder a task reads: the package's own embedded data, the Hub (None) or the driver's path."""
    if location == HUB:
        return None
    if location == BUILTIN:
        return builtin_data_dir()
    folder = Path(location)
    if not folder.is_dir():
        raise HarnessError(f"data folder {location} (the driver's --data-dir) does not exist on Ray node "
                           f"{_node_name()}: give every node the same files at the same path (or use the data "
                           "shipped with harness)")
    return folder


def _node_name() -> str:
    import platform

    return platform.node()


_ENV_CACHE: dict[str, dict] = {}


def _node_env(device: str) -> dict:
    """This node's environment description (git and package versions once per worker process and device)."""
    import torch

    if device not in _ENV_CACHE:
        from harness import environment

        _ENV_CACHE[device] = environment.describe(torch.device(device))
    return _ENV_CACHE[device] | {"torch_threads": torch.get_num_threads()}


def _pack(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def harness_job(job: Job, rctx: RemoteContext) -> tuple[list[RunResult], dict[str, dict[str, bytes]]]:
    """The Ray task: check the inputs, run ``job``; return its results and (when shipped) its adapters' files
    by folder name. Runs on a Ray worker; raises only for errors that concern the whole job."""
    import ray
    import torch

    from harness.api import check_inputs
    from harness.methods import get_method
    from harness.models import load_model

    torch.set_num_threads(max(1, int(rctx.cpus)))  # what the task asked for (Ray reuses worker processes)
    folder = worker_data_dir(rctx.data)
    check_inputs(list(job.specs), folder)
    first = job.specs[0]
    env = _node_env(first.device) | rctx.env | {"ray_node": _node_name()}
    ctx = JobContext(folder, Path(rctx.artifacts_dir), batch_size=rctx.batch_size, compile=rctx.compile)
    load = lambda: load_model(first.load_from, first.device, first.dtype,  # noqa: E731
                              quantize=get_method(first.method).quantize)
    if job.kind == "icl":
        return list(run_icl_job(load(), job, ctx, env)), {}
    ship = rctx.ship_artifacts
    if ship is None:
        ship = ray.get_runtime_context().get_node_id() != rctx.driver_node
    if not ship:
        return list(run_peft_job(load, job, ctx, env)), {}
    scratch = Path(tempfile.mkdtemp(prefix="harness-ray-"))
    try:
        results = list(run_peft_job(load, job, ctx, env, artifacts_dir=scratch))
        files = {p.name: _pack(p) for p in scratch.iterdir() if p.is_dir() and not p.name.startswith(".")}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results, files


def _unpack(files: dict[str, bytes], target: Path) -> None:
    """Write a shipped adapter folder to ``target`` (a temporary folder renamed into place, as a save does)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        for name, data in files.items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".strip()


class RayExecutor:
    """Jobs as Ray tasks on a local Ray instance (``address`` None) or a running cluster (``auto``, ``HOST:PORT``).

    ``local_runs``: the size of a local instance in runs (``num_cpus = local_runs * cpus_per_run``; default every
    CPU); not used when connecting to a cluster or when Ray is already initialised in this process (then that
    instance is used, and left running). ``ship_artifacts``: force (True) or forbid (False) sending adapters back
    to the driver; default: only from other nodes."""

    name = "ray"
    accepts_loader = False

    def __init__(self, address: str | None = None, gpus_per_run: float | None = None, cpus_per_run: float = 1.0,
                 local_runs: int | None = None, max_retries: int = MAX_RETRIES, ship_artifacts: bool | None = None):
        self.address, self.gpus_per_run, self.cpus_per_run = address, gpus_per_run, cpus_per_run
        self.local_runs, self.max_retries, self.ship_artifacts = local_runs, max_retries, ship_artifacts

    def _gpus(self, spec: RunSpec) -> float:
        return (self.gpus_per_run or 1.0) if spec.device.startswith("cuda") else 0.0

    def check(self, specs: list[RunSpec]) -> None:
        if self.gpus_per_run is not None and specs and not any(s.device.startswith("cuda") for s in specs):
            raise HarnessError(f"--gpus-per-run {self.gpus_per_run}: the runs are planned on {specs[0].device}; "
                               "give --device cuda to run them on GPUs")

    def _connect(self, ray) -> bool:
        """Start or join Ray; True when this call did (and so must shut it down)."""
        if ray.is_initialized():
            return False
        quiet = logging.WARNING if log.isEnabledFor(logging.DEBUG) else logging.ERROR
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        try:
            if address:
                ray.init(address=address, logging_level=quiet)
            else:
                cpus = None if self.local_runs is None else self.local_runs * self.cpus_per_run
                ray.init(num_cpus=cpus, include_dashboard=False, logging_level=quiet)
        except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError, ...
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise HarnessError(f"cannot start or join {where}: {_one_line(exc)}") from None
        return True

    def _check_resources(self, ray, specs: list[RunSpec]) -> None:
        """Refuse a request no node can ever satisfy (Ray would wait for it forever)."""
        gpus = max((self._gpus(s) for s in specs), default=0.0)
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if not any(r.get("CPU", 0) >= self.cpus_per_run and r.get("GPU", 0) >= gpus for r in nodes):
            have = "; ".join(f"CPU {r.get('CPU', 0):g}, GPU {r.get('GPU', 0):g}" for r in nodes) or "no node"
            raise HarnessError(f"no Ray node has {self.cpus_per_run:g} CPU(s) and {gpus:g} GPU(s) for one run "
                               f"({have}); lower --cpus-per-run / --gpus-per-run or add nodes")

    def execute(self, jobs: list[Job], ctx: JobContext, load, env_of) -> Iterator[RunResult]:
        if not jobs:
            return
        import ray

        started = self._connect(ray)
        pending: dict = {}
        try:
            self._check_resources(ray, [s for j in jobs for s in j.specs])
            rctx = RemoteContext(
                data=data_location(ctx.data_dir), artifacts_dir=str(Path(ctx.artifacts_dir).resolve()),
                batch_size=ctx.batch_size, compile=ctx.compile, driver_node=ray.get_runtime_context().get_node_id(),
                cpus=self.cpus_per_run, ship_artifacts=self.ship_artifacts,
                env={"executor": "ray", "ray_address": self.address or "local", "cpus_per_run": self.cpus_per_run,
                     "gpus_per_run": self.gpus_per_run})
            task = ray.remote(harness_job)
            for job in jobs:
                ref = task.options(num_cpus=self.cpus_per_run, num_gpus=self._gpus(job.specs[0]),
                                   max_retries=self.max_retries).remote(job, rctx)
                pending[ref] = job
            log.info("%d Ray task(s) submitted (%s)", len(jobs), rctx.env["ray_address"])
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
                for ref in ready:
                    job = pending.pop(ref)
                    yield from self._collect(ray, ref, job, rctx)
        except BaseException:
            for ref in pending:  # the driver stops: so do its tasks (finished results are stored already)
                ray.cancel(ref, force=True)
            raise
        finally:
            if started:
                ray.shutdown()

    def _collect(self, ray, ref, job: Job, rctx: RemoteContext) -> list[RunResult]:
        """The results of a finished task; failed results for every run of a task that raised or kept dying."""
        env, adapters = rctx.env, Path(rctx.artifacts_dir)
        try:
            results, files = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # the job raised: not retried
            cause = getattr(exc, "cause", None) or exc
            log.debug("%s raised:\n%s", job.describe(), exc)
            return failed_results(job.specs, f"Ray task failed: {_one_line(cause)}", env)
        except ray.exceptions.RayError as exc:  # the worker or node died on every attempt, or the task was lost
            return failed_results(job.specs, f"Ray task lost after {self.max_retries} retries: {_one_line(exc)}",
                                  env)
        for name, content in files.items():  # adapters trained on another node
            _unpack(content, adapters / name)
        for result in results:
            if result.artifact_path and Path(result.artifact_path).name in files:
                result.artifact_path = str(adapters / Path(result.artifact_path).name)
        missing = [s for s in job.specs if s.run_id not in {r.run_id for r in results}]
        return results + failed_results(missing, "Ray task returned no result for this run", env)

