"""``harness run --pack N``: cut the PEFT training groups into packs and run each pack as one packed training.

:func:`make_packs` puts up to N groups of one packable method (:data:`harness.packed.PACKABLE`) that share the
model, device, dtype and training settings (seeds and tasks may differ) into one pack; groups that cannot be packed
(another method, LoRA with dropout) stay alone, with one logged note per reason; the groups of a pack on an
encoder-decoder model are trained one at a time (:func:`harness.peft_runner.run_peft_group`), also with a note.
:func:`run_pack` loads the base model once, trains every group's adapter in one packed training
(:func:`harness.packed.train_packed`), then for each group copies its tensors into the peft model, saves the adapter
where its unpacked run would (``<artifacts>/<group hash>/``, the same files) and scores every template with the
same evaluation (:func:`harness.peft_runner.group_results`). Run ids do not change: packing is, like
``--workers``, not part of a run's identity; the runs record ``pack`` (the pack's size) in their environment and
extras. Metrics are the group's own (its losses, tokens, FLOPs) except the shared wall time and peak memory:
``train_seconds`` is the group's share (the pack's training time / N).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from harness import costs
from harness.costs import ModelDims
from harness.data import few_shot_examples
from harness.jobs import Job
from harness.models import LoadedModel
from harness.spec import RunSpec
from harness.store import RunResult
from harness.tokenizer_check import run_env

log = logging.getLogger("harness")


def pack_key(spec: RunSpec) -> tuple:
    """Groups with equal keys can share a pack: one method, model, device, dtype and training settings."""
    return (spec.method, spec.load_from, spec.device, spec.dtype, spec.master_weights, spec.train)


def make_packs(jobs: list[Job], size: int) -> list[list[Job]]:
    """The ``peft`` jobs cut into packs of at most ``size`` packable groups (in order of first appearance); an
    unpackable group is a pack of one (a note is logged once per reason)."""
    from harness.packed import pack_refusal

    if size < 1:
        raise ValueError(f"pack size must be >= 1, got {size}")
    packs: list[list[Job]] = []
    open_packs: dict[tuple, list[Job]] = {}
    noted: set[str] = set()
    for job in jobs:
        first = job.specs[0]
        reason = pack_refusal(first.method, dict(first.train)) if size > 1 else "--pack 1"
        if reason is not None:
            if size > 1 and reason not in noted:
                noted.add(reason)
                log.info("not packed: %s; those groups train one at a time", reason)
            packs.append([job])
            continue
        key = pack_key(first)
        current = open_packs.get(key)
        if current is None or len(current) >= size:
            current = open_packs[key] = []
            packs.append(current)
        current.append(job)
    return packs


def run_pack(load_base: Callable[[], LoadedModel], groups: list[list[RunSpec]], data_dir, artifacts_dir: Path, *,
             batch_size: int = 8, progress: bool = False, env: dict | None = None,
             compile: str | bool | None = "auto") -> Iterator[RunResult]:
    """Train ``groups`` (of one :func:`pack_key`) in one packed training and yield one result per spec (module
    docstring). A failure before or during training fails every group; a group that diverges fails alone."""
    from harness.methods import apply_method, get_method, method_overhead
    from harness.methods.artifacts import save_trained
    from harness.packed import PackedAdapters, PackMember, group_initial_tensors, train_packed
    from harness.models import is_seq2seq
    from harness.peft_runner import _one_line, count_params, group_hash, group_results, run_peft_group
    from harness.training import TrainingDiverged

    groups = [list(g) for g in groups if g]
    if not groups:
        return
    first = groups[0][0]
    if any(pack_key(g[0]) != pack_key(first) for g in groups):
        raise ValueError("run_pack: groups must share one pack_key")
    env = (env or {}) | {"pack": len(groups)}
    start = time.perf_counter()
    settings = dict(first.train)
    is_random = False
    try:
        info = get_method(first.method)
        lm = load_base()
        is_random = lm.is_random
        env = run_env(env, getattr(lm, "tokenizer", None))
        seq2seq = is_seq2seq(lm.model)
        if not seq2seq:
            costs.reset_peak_memory(lm.device)
            dims = ModelDims.from_model(lm.model)
            tasks = [g[0].load_task() for g in groups]
            members = [PackMember(task, few_shot_examples(task, g[0].seed, data_dir, n=settings["n_train"]),
                                  g[0].seed) for task, g in zip(tasks, groups)]
            initial = [group_initial_tensors(lm.model, first.method, settings, m.seed) for m in members]
            torch.manual_seed(first.seed)
            model = apply_method(lm.model, first.method, settings)
            overhead = method_overhead(model, first.method, settings)
            trainable, total = count_params(model)
            trainable_vocab = costs.trainable_vocab_params(model)
            packed = PackedAdapters(model, initial)
            outcomes = train_packed(model, lm.tokenizer, packed, members, settings, method=first.method,
                                    progress=progress, compile=compile)
            model.eval()
    except Exception as exc:  # noqa: BLE001 - recorded; the other packs go on
        error, tb = _one_line(exc), traceback.format_exc(limit=8)
        log.warning("packed training of %d %s group(s) failed: %s", len(groups), first.method, error)
        for group in groups:
            for spec in group:
                yield RunResult(run_id=spec.run_id, config=spec.config(), status="failed", error=error, env=env,
                                metrics={"seconds": time.perf_counter() - start}, extra={"traceback": tb},
                                is_random=is_random)
        return
    if seq2seq:
        del lm
        log.info("not packed: %s is an encoder-decoder model; its groups train one at a time", first.model)
        for group in groups:
            yield from run_peft_group(load_base, group[0].load_task(), group, data_dir, artifacts_dir,
                                      batch_size=batch_size, progress=progress, env=env)
        return
    for g, (group, task, outcome) in enumerate(zip(groups, tasks, outcomes)):
        try:
            if isinstance(outcome, Exception):
                raise outcome
            packed.load_group(g)
            folder = save_trained(model, info, Path(artifacts_dir) / group_hash(group[0]))
        except Exception as exc:  # noqa: BLE001 - this group fails, the pack's others go on
            error = _one_line(exc)
            if not isinstance(exc, TrainingDiverged):
                log.warning("packed group %s/seed %s failed: %s", group[0].task, group[0].seed, error)
            for spec in group:
                yield RunResult(run_id=spec.run_id, config=spec.config(), status="failed", error=error, env=env,
                                metrics={"seconds": time.perf_counter() - start}, is_random=is_random)
            continue
        yield from group_results(model, lm, info, task, group, data_dir, dims, overhead, outcome, folder, env,
                                 params=(trainable, total, trainable_vocab), batch_size=batch_size,
                                 progress=progress, is_random=is_random, extra={"pack": len(groups)})
