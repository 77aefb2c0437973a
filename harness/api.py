"""The Python API behind the CLI: plan a grid of runs, skip finished ones, execute the rest, store each result.

    from harness.api import plan, run
    specs = plan(tasks=["cb"], methods=["icl", "zeroshot"], seeds=[0], limit=16)
    run(specs, store="results/harness.sqlite")

Every name (task, method, template, preset, model) and the data are checked in :func:`plan`, before any model
loads, so a typo never starts a long run. :func:`run` writes every run in its own transaction as soon as it
finishes; an interrupted invocation resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

from harness import environment, identity
from harness.compiling import refuse_graphs_on_gpu
from harness.data import few_shot_examples, few_shot_path, load_split, resolve_data_dir
from harness.demos import balanced_examples, check_noise, check_source, n_orders, parse_source_list
from harness.errors import HarnessError
from harness.executors import Executor, LocalProcessExecutor
from harness.jobs import JobContext, make_jobs
from harness.master_weights import LOW_PRECISION
from harness.methods import get_method, training_settings
from harness.models import (DEFAULT_MODEL, LoadedModel, check_model_name, check_quantize, load_model,
                            resolve_device_dtype)
from harness.batching import gpu_share
from harness.spec import RunSpec, get_preset
from harness.store import RunResult, Store
from harness.tasks import Task, load_task

log = logging.getLogger("harness")


def plan(
    tasks: Iterable[str],
    methods: Iterable[str],
    *,
    templates: str | list[str] | None = "all",
    seeds: Iterable[int] | None = None,
    k: int | Iterable[int] = 32,
    model: str = DEFAULT_MODEL,
    preset: str = "paper",
    limit: int | None = None,
    data_dir: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    kv_cache: bool = True,
    calibrate: bool = False,
    method_args: dict | None = None,
    train_overrides: dict | None = None,
    demos: str | Iterable[str] = "tfew",
    orders: int = 1,
    label_noise: float | str | None | Iterable[float | str | None] = None,
) -> list[RunSpec]:
    """Validate every name and every input, and build the grid of :class:`RunSpec`.

    Nothing here loads a model, yet every error that can be known before one loads is raised here: unknown
    names, missing or malformed data, and every template rendered on every evaluation, demonstration and
    training example the plan will use (the first failure is one line naming file, template, example and field).
    Each spec carries the fingerprints of its inputs (:mod:`harness.identity`).

    ``k``: one number of demonstrations, or several (a k-curve, e.g. ``[0, 1, 2, 4, 8, 16, 32]``): one ICL run per
    k, each its own run id exactly as if planned alone; executed together they share one prefix cache
    (:func:`harness.icl_runner.run_icl_curve`).

    ``calibrate``: in-context runs also compute ``accuracy_calibrated`` and ``accuracy_mutual_info``
    (:mod:`harness.calibration`); PEFT runs are not calibrated (their specs keep ``calibrate=False``).

    ``demos`` (``"tfew"``, ``"balanced"`` or both), ``orders`` (N: the original order and N - 1 seeded
    permutations, at most k! for each k) and ``label_noise`` (levels: None or 0 for gold labels, p in (0, 1],
    ``"random"``): every k-shot ICL run (k > 0) is planned once per combination, each its own run
    (:mod:`harness.demos`); zero-shot, k = 0 and PEFT runs keep the defaults."""
    preset_info = get_preset(preset)
    tasks, methods = list(tasks), list(methods)
    seeds = list(preset_info.seeds if seeds is None else seeds)
    if not tasks:
        raise HarnessError("no task given; see `harness tasks` for the list")
    if not methods:
        raise HarnessError("no method given; see `harness methods` for the list")
    if not seeds:
        raise HarnessError("no seed given; e.g. --seeds 0,1,32,42,1024")
    ks = [k] if isinstance(k, int) else list(dict.fromkeys(k))
    if not ks:
        raise HarnessError("no k given; e.g. --k 32 or --k 0,1,2,4,8,16,32")
    for value in ks:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise HarnessError(f"--k must be >= 0, got {value}")
    sources, noises = _variants(demos, orders, label_noise)
    infos = [get_method(m) for m in methods]
    if (sources != ["tfew"] or orders != 1 or noises != [None]) and not any(info.kind == "icl" for info in infos):
        raise HarnessError("--demos, --orders and --label-noise apply to k-shot in-context runs (method icl); "
                           f"the methods given ({', '.join(info.name for info in infos)}) include none")
    if calibrate and all(info.kind == "peft" for info in infos):
        raise HarnessError("--calibrate applies to in-context runs (methods icl, zeroshot); the methods given "
                           f"({', '.join(info.name for info in infos)}) are all PEFT methods")
    loaded = _load_tasks(tasks)
    folder = resolve_data_dir(data_dir)
    check_model_name(model)
    gpu_share()  # a malformed $HARNESS_GPU_SHARE fails here, before any model loads
    dev, dt = resolve_device_dtype(device, dtype)
    for info in infos:  # a quantized base (qlora) needs bitsandbytes (CUDA, or its CPU kernels): say so before any model loads
        check_quantize(info.quantize, dev.type, info.name, model)
    eval_limit = limit if limit is not None else preset_info.eval_limit
    settings_of = {}
    for info in infos:
        if info.kind == "peft":
            resolved = training_settings(info.name, preset, {**(train_overrides or {}),
                                                              "method_args": method_args or {}})
            settings_of[info.name] = tuple(sorted(resolved.items(), key=lambda kv: kv[0]))
    inputs = {task.name: _task_inputs(task, folder, eval_limit, seeds, infos, ks, settings_of, sources)
              for task in loaded}
    fingerprint = identity.model_fingerprint(model)  # after the data checks: a Hub id may need the network
    seq2seq_costs = identity.SEQ2SEQ_COSTS_VERSION if identity.is_encoder_decoder(model) else 0
    common = dict(model=identity.model_display_name(model), model_path=model, model_fingerprint=fingerprint,
                  preset=preset, limit=eval_limit, dtype=str(dt).removeprefix("torch."), device=dev.type,
                  kv_cache=kv_cache, scoring_version=identity.SCORING_VERSION)
    specs: list[RunSpec] = []
    for task in loaded:
        chosen = task.select_templates(templates)
        data = inputs[task.name]
        for info in infos:
            settings = settings_of.get(info.name, ())
            # zero-shot does not depend on the data seed: one run per template, stored with the first seed
            run_seeds = seeds[:1] if info.kind == "zeroshot" else seeds
            for seed in run_seeds:
                for template in chosen:
                    for run_k in (ks if info.kind == "icl" else [0]):
                        for source, noise, order in _variant_grid(info.kind == "icl" and run_k > 0, sources,
                                                                   noises, orders, run_k):
                            data_hash, train_hash = data.hashes(info, seed, run_k, settings, source)
                            specs.append(RunSpec(
                                task=task.name, method=info.name, template=template.name, seed=seed,
                                k=run_k, template_fingerprint=template.fingerprint(),
                                train=_freeze(settings), task_hash=task.fingerprint(), task_source=task.source,
                                data_hash=data_hash, train_data_hash=train_hash, data_source=data.source_text,
                                calibrate=calibrate and info.kind != "peft",
                                master_weights=info.trains_model_dtype and dt in LOW_PRECISION,
                                costs_version=info.costs_version,
                                seq2seq_costs=seq2seq_costs if info.kind == "peft" else 0,
                                optimizer_version=identity.optimizer_version(dev.type, dict(settings)),
                                demos=source, order=order, label_noise=noise, **common))
    return specs


def _variants(demos, orders, label_noise) -> tuple[list[str], list]:
    """The checked demonstration sources and label-noise levels of a plan (:mod:`harness.demos`)."""
    sources = parse_source_list(demos) if isinstance(demos, str) else [check_source(s) for s in demos]
    if not sources:
        raise HarnessError("--demos needs a source: tfew or balanced")
    if isinstance(orders, bool) or not isinstance(orders, int) or orders < 1:
        raise HarnessError(f"--orders must be an integer >= 1, got {orders!r}")
    levels = [label_noise] if label_noise is None or isinstance(label_noise, (int, float, str)) else list(label_noise)
    noises = list(dict.fromkeys(check_noise(p) or None for p in levels))  # 0 is the clean run
    if not noises:
        raise HarnessError("--label-noise needs a level: a fraction in [0, 1] or 'random'")
    return list(dict.fromkeys(sources)), noises


def _variant_grid(k_shot: bool, sources: list[str], noises: list, orders: int, k: int):
    """(demos, label_noise, order) of each run of one k-shot cell; only the defaults for other runs."""
    if not k_shot:
        return [("tfew", None, 0)]
    return [(s, p, o) for s in sources for p in noises for o in range(n_orders(k, orders))]


def _load_tasks(names: list[str]) -> list[Task]:
    """Tasks by name or path; two different files with one task name are an error (their runs would mix)."""
    loaded: dict[str, Task] = {}
    for name in names:
        task = load_task(name)
        earlier = loaded.get(task.name)
        if earlier is not None and earlier.fingerprint() != task.fingerprint():
            raise HarnessError(f"two different task files are both named {task.name!r} ({name!r} and an earlier "
                               f"--tasks entry); rename one (its 'name' field and file name)")
        loaded.setdefault(task.name, task)
    return list(loaded.values())


class _TaskInputs:
    """The example rows a task's runs read, loaded and validated once, with their fingerprints."""

    def __init__(self, task: Task, folder: Path | None, limit: int | None):
        self.task, self.folder = task, folder
        rows = load_split(task, task.eval_split, folder)
        self.eval_rows = rows if limit is None else rows[:limit]
        if not self.eval_rows:
            raise HarnessError(f"task {task.name!r}: the {task.eval_split!r} split has no rows")
        _check_examples(task, self.eval_rows, "evaluation")
        self.eval_hash = identity.rows_sha256(self.eval_rows)
        self.source = ({"kind": "local"} if folder is not None
                       else {"kind": "hub", "path": task.hub_path, "config": task.hub_config})
        self.source_text = str(folder / task.name) if folder is not None else f"hub:{task.hub_path}/{task.hub_config}"
        self._few_shot: dict[tuple, tuple[str, str]] = {}

    def few_shot(self, seed: int, n: int, role: str, source: str = "tfew") -> tuple[str, str]:
        """(rows sha256, origin) of the first ``n`` few-shot rows of ``seed`` (``source`` balanced: the ``n``
        class-balanced train rows, :func:`harness.demos.balanced_examples`), checked once per (seed, n, source)."""
        key = (seed, n) if source == "tfew" else (seed, n, source)
        if key not in self._few_shot and source != "tfew":
            rows = balanced_examples(self.task, seed, self.folder, n)
            _check_examples(self.task, rows, role)
            self._few_shot[key] = (identity.rows_sha256(rows), "balanced-train")
        if key not in self._few_shot:
            rows = few_shot_examples(self.task, seed, self.folder, n=n)
            _check_examples(self.task, rows, role)
            path = few_shot_path(self.task, seed, self.folder)
            origin = "tfew-subset" if path is not None and path.is_file() else "seeded-sample"
            self._few_shot[key] = (identity.rows_sha256(rows), origin)
        return self._few_shot[key]

    def hashes(self, info, seed: int, k: int, settings: tuple, demos: str = "tfew") -> tuple[str, str]:
        """(data_hash, train_data_hash) of one method and seed (``demos``: the ICL demonstrations' source)."""
        parts = {"source": self.source, "eval": self.eval_hash}
        train_hash = ""
        if info.kind == "icl" and k > 0:
            parts["demos"] = self.few_shot(seed, k, "demonstration", demos)
        elif info.kind == "peft":
            rows_hash = self.few_shot(seed, dict(settings)["n_train"], "training")
            train_hash = identity.data_fingerprint({"source": self.source, "train": rows_hash})
            parts["train"] = rows_hash
        return identity.data_fingerprint(parts), train_hash


def _task_inputs(task: Task, folder, limit, seeds, infos, ks, settings_of, sources=("tfew",)) -> _TaskInputs:
    """Load and check every row the plan's runs of ``task`` will read (before any model loads)."""
    inputs = _TaskInputs(task, folder, limit)
    for info in infos:
        for seed in seeds:
            for k in (ks if info.kind == "icl" else ks[:1]):
                for source in (sources if info.kind == "icl" and k > 0 else ["tfew"]):
                    inputs.hashes(info, seed, k, settings_of.get(info.name, ()), source)
    return inputs


def _check_examples(task: Task, rows: list[dict], role: str) -> None:
    """Render every template of ``task`` on every row; the first failure is a one-line HarnessError."""
    checker = getattr(task, "check_examples", None)
    if checker is not None:
        checker(rows, role)
        return
    for template in task.templates:
        for row in rows:
            task.render(template, row)


def _freeze(items):
    """Make nested settings hashable (lists -> tuples, dicts -> sorted tuples)."""
    if isinstance(items, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in items.items()))
    if isinstance(items, (list, tuple)):
        return tuple(_freeze(v) for v in items)
    return items


def check_inputs(specs: list[RunSpec], data_dir: Path | None) -> None:
    """Raise :class:`HarnessError` unless the model and rows this machine reads for ``specs`` are the ones they
    were planned with (their ``model_fingerprint`` and ``data_hash``) and this code's ``SCORING_VERSION`` is
    theirs: a Ray worker calls this before it loads anything, so a node holding other weights, data or harness
    fails its runs instead of storing them under these ids."""
    fingerprints: dict[str, str] = {}
    inputs: dict[tuple, _TaskInputs] = {}
    for spec in specs:
        if spec.scoring_version != identity.SCORING_VERSION:
            raise HarnessError(f"this harness scores with SCORING_VERSION {identity.SCORING_VERSION}, the runs were "
                               f"planned with {spec.scoring_version}: install the same harness everywhere")
        if spec.optimizer_version != identity.optimizer_version(spec.device, dict(spec.train)):
            raise HarnessError(f"this harness trains {spec.method} on {spec.device} with optimizer version "
                               f"{identity.optimizer_version(spec.device, dict(spec.train))}, the runs were planned "
                               f"with {spec.optimizer_version}: install the same harness everywhere")
        if spec.load_from not in fingerprints:
            fingerprints[spec.load_from] = identity.model_fingerprint(spec.load_from)
        if spec.model_fingerprint and fingerprints[spec.load_from] != spec.model_fingerprint:
            raise HarnessError(f"model {spec.load_from!r} here has fingerprint {fingerprints[spec.load_from]}, "
                               f"the runs were planned with {spec.model_fingerprint}: give every machine the same "
                               "model files")
        if not spec.data_hash:
            continue
        key = (spec.task_source or spec.task, spec.limit)
        if key not in inputs:
            inputs[key] = _TaskInputs(spec.load_task(), data_dir, spec.limit)
        data_hash, _ = inputs[key].hashes(get_method(spec.method), spec.seed, spec.k, spec.train, spec.demos)
        if data_hash != spec.data_hash:
            raise HarnessError(f"the {spec.task} rows read here ({inputs[key].source_text}) differ from the ones "
                               f"the runs were planned with (data hash {data_hash} != {spec.data_hash}): give every "
                               "machine the same data files")


def run(
    specs: list[RunSpec],
    *,
    store: str | Path | Store = "results/harness.sqlite",
    data_dir: str | Path | None = None,
    batch_size: int = 8,
    progress: bool = True,
    loader: Callable[[RunSpec], LoadedModel] | None = None,
    compile: str | bool | None = "auto",
    workers: int = 1,
    executor: Executor | None = None,
    pack: int = 1,
) -> list[RunResult]:
    """Execute the specs not yet finished in ``store``; return the results produced by this call.

    ``compile`` (``auto``/``off``: eager, ``on``: compiled blocks, ``model``: the whole model, ``graphs``: the
    blocks under CUDA graphs) is how PEFT training forwards run (:func:`harness.compiling.compile_mode`). ``executor`` (:mod:`harness.executors`) runs
    the jobs: by default ``LocalProcessExecutor(workers)``, where ``workers`` PEFT training groups run at once, one
    process each (:mod:`harness.parallel`); ``executors.make_executor("ray", ...)`` runs every job as a Ray task.
    Results equal a serial run's (on CPU with as many torch threads); this process alone writes the store, one
    result at a time as jobs finish. ``pack`` (local executor): up to ``pack`` training groups of one packable
    method train together in one model (:mod:`harness.packed_runner`; the same results within float32 rounding).
    None of these options is part of a run's identity."""
    if executor is None:
        executor = LocalProcessExecutor(workers, pack)
    elif workers != 1 or pack != 1:
        raise HarnessError("give either workers or an executor, not both (workers and pack go to the local "
                           "executor, which takes them itself)")
    if loader is not None and not executor.accepts_loader:
        what = ("workers > 1 load models in their own processes" if executor.name == "local"
                else f"the {executor.name} executor loads models in its workers")
        raise HarnessError(f"{what}: a custom loader cannot be used")
    db = store if isinstance(store, Store) else Store(store)
    folder = resolve_data_dir(data_dir)
    done = db.finished_ids()
    calibrated = db.finished_ids(calibrated=True) if any(s.calibrate for s in specs) else set()
    # a run stored without calibration is not finished for a spec that asks for it: it is re-run and replaced
    todo = [s for s in specs if s.run_id not in (calibrated if s.calibrate else done)]
    skipped = len(specs) - len(todo)
    if skipped:
        log.info("skipping %d finished run(s) already in %s", skipped, db.path)
    executor.check(todo)
    refuse_graphs_on_gpu(compile, [s.device for s in todo if s.train])
    load = loader or (lambda s: load_model(s.load_from, s.device, s.dtype, quantize=get_method(s.method).quantize))
    produced: list[RunResult] = []
    written: set[str] = set()
    bar = tqdm(total=len(todo), disable=not progress, desc="runs", unit="run")
    for result in _execute(todo, load, folder, db, batch_size, progress, compile, executor):
        if result.run_id in written:  # a job run twice (a retried task) must not count, nor store, twice
            log.warning("run %s: a second result was received and dropped", result.run_id)
            continue
        db.write(result)
        written.add(result.run_id)
        produced.append(result)
        bar.update(1)
        if result.status != "finished":
            log.warning("run %s failed: %s", result.run_id, result.error)
    bar.close()
    return produced


def _execute(todo: list[RunSpec], load, folder, db: Store, batch_size: int, progress: bool,
             compile: str | bool | None, executor: Executor) -> Iterator[RunResult]:
    """The results of ``todo``, as ``executor`` runs its jobs (:func:`harness.jobs.make_jobs`)."""
    env_cache: dict[str, dict] = {}

    def env_of(model: str, device) -> dict:
        """The environment of a model's runs, described once per model (describe() runs git twice)."""
        if model not in env_cache:
            env_cache[model] = environment.describe(device)
        return env_cache[model]

    ctx = JobContext(folder, db.folder / "adapters", batch_size=batch_size, compile=compile, progress=progress)
    yield from executor.execute(make_jobs(todo), ctx, load, env_of)
