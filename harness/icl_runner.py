"""In-context learning runs: zero-shot (k = 0) and k-shot with the demonstrations cached once.

For a spec (task, template, seed, k): the first k examples of the seed's few-shot subset (or k class-balanced train
rows, ``--demos balanced``) become the demonstrations, with their labels (or noisy ones, ``--label-noise``) and in
their order (or a seeded permutation, ``--orders``: :mod:`harness.demos`), rendered with the same template and
joined by the task's delimiter; every validation example is
scored with that prefix by :func:`harness.scoring.score_prompts`. When the longest prompt would not fit the
model's context, k is reduced (with a warning and ``k_used`` stored beside the requested k).
"""

from __future__ import annotations

import logging
import time
import traceback

import torch

from harness import costs
from harness.data import load_split
from harness.demos import arrange, select_examples
from harness.models import LoadedModel
from harness.scoring import encode_pair, metrics_from_examples, score_prompts, uncached_work
from harness.spec import RunSpec
from harness.tokenizer_check import run_env
from harness.store import RunResult
from harness.tasks import Task

log = logging.getLogger("harness")


def context_limit(lm: LoadedModel) -> int:
    cfg = lm.model.config
    cfg = getattr(cfg, "text_config", cfg)
    return int(getattr(cfg, "max_position_embeddings", 2048))


def fit_demonstrations(lm: LoadedModel, task: Task, template, demos: list[dict], prompts,
                       labels: list[int] | None = None) -> tuple[str, int]:
    """The demonstration prefix with as many of ``demos`` (shown with ``labels`` when given) as fit the model's
    context for every prompt."""
    limit = context_limit(lm)
    longest = max(prompts, key=lambda p: len(p.context) + max(len(c) for c in p.choices))
    k = len(demos)
    while True:
        prefix = task.demonstrations(template, demos[:k], None if labels is None else labels[:k])
        ctx, cont = encode_pair(lm.tokenizer, prefix + longest.context, max(longest.choices, key=len))
        if len(ctx) + len(cont) <= limit or k == 0:
            return prefix, k
        k = max(0, k - max(1, k // 8))


def run_prefix(lm: LoadedModel, spec: RunSpec, task: Task, template, prompts, data_dir) -> tuple[str, int]:
    """(the demonstration prefix of ``spec``, k used): its demonstrations (source, order, label noise) fitted to
    the model's context for every one of ``prompts`` (the run's evaluated prompts)."""
    rows = select_examples(task, spec.seed, data_dir, spec.k, spec.demos)
    demos, labels = arrange(task, template, rows, seed=spec.seed, order=spec.order, label_noise=spec.label_noise)
    return fit_demonstrations(lm, task, template, demos, prompts, labels)


def run_icl(lm: LoadedModel, spec: RunSpec, data_dir, *, batch_size: int = 8, progress: bool = False,
            env: dict | None = None) -> RunResult:
    """One in-context run; any exception becomes a ``failed`` result (KeyboardInterrupt propagates)."""
    return next(iter(run_icl_curve(lm, [spec], data_dir, batch_size=batch_size, progress=progress, env=env)))


def curve_key(spec: RunSpec) -> tuple:
    """Runs with one key differ only in k: their demonstrations are heads of one list (a k-curve)."""
    return (spec.load_from, spec.task, spec.method, spec.template, spec.seed, spec.model_fingerprint, spec.dtype,
            spec.device, spec.kv_cache, spec.limit, spec.task_hash, spec.preset, spec.demos, spec.order,
            spec.label_noise)


def run_icl_curve(lm: LoadedModel, specs: list[RunSpec], data_dir, *, batch_size: int = 8, progress: bool = False,
                  env: dict | None = None):
    """Yield one result per spec, largest k first; specs of one :func:`curve_key` share the prefix's KV cache.

    The largest k's demonstration prefix is encoded once; a smaller k whose prompt tokens begin with the same
    token ids (its demonstrations are the first k of the larger list, drawn for k alone and compared) uses the
    head of that cache, cropped (:meth:`harness.kvcache.PrefixCache.head`). Only literally equal token ids are
    reused, so each run scores what it would alone; where they differ (a seeded sample that is not
    prefix-stable, a prefix reduced to fit the context) the differing part is encoded for that run. FLOPs:
    ``infer_flops_per_example`` is what the run costs alone (the reused prefix counted as if encoded);
    ``infer_flops_per_example_shared`` (extra) what this run computed (docs/metrics.md)."""
    env = run_env(env, getattr(lm, "tokenizer", None))
    groups: dict[tuple, list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault(curve_key(spec), []).append(spec)
    for group in groups.values():
        reuse = None  # the largest prefix's cache so far (cached path only); dropped after its group
        for spec in sorted(group, key=lambda s: -s.k):
            result, prefix_cache = _run_one(lm, spec, data_dir, batch_size, progress, env, reuse)
            if reuse is None and prefix_cache is not None and prefix_cache.past is not None and len(group) > 1:
                reuse = prefix_cache
            yield result


def _run_one(lm: LoadedModel, spec: RunSpec, data_dir, batch_size: int, progress: bool, env: dict | None,
             reuse) -> tuple[RunResult, object]:
    start = time.perf_counter()
    base = RunResult(run_id=spec.run_id, config=spec.config(), status="failed", env=env or {},
                     is_random=lm.is_random)
    prefix_cache = None
    try:
        task = spec.load_task()
        template = task.template(spec.template)
        examples = load_split(task, task.eval_split, data_dir)
        if spec.limit is not None:
            examples = examples[: spec.limit]
        prompts = [task.render(template, ex) for ex in examples]
        prefix, k_used = run_prefix(lm, spec, task, template, prompts, data_dir)
        if k_used < spec.k:
            log.warning("%s/%s/%s: k reduced from %d to %d to fit the model's context of %d tokens",
                        spec.task, spec.template, spec.seed, spec.k, k_used, context_limit(lm))
        costs.reset_peak_memory(lm.device)
        out = _score_with_backoff(lm, prompts, prefix, spec.kv_cache, batch_size, progress, reuse)
        prefix_cache = out.cache
        accuracy = metrics_from_examples(out.examples)  # first: a non-finite score fails the run here
        dims = costs.ModelDims.from_model(lm.model)
        n = max(out.n_examples, 1)
        alone = costs.Work()
        alone.add_tokens(out.reused_tokens, 0, dims.windows)  # the reused prefix, as if encoded for this run
        alone.add(out.work)
        metrics = accuracy | {
            "infer_flops_per_example": costs.forward_flops(dims, alone) / n,
            "infer_flops_per_example_uncached": costs.forward_flops(dims, uncached_work(out.rows, dims)) / n,
            "train_flops": 0,
            "peak_memory_bytes": costs.peak_memory_bytes(lm.device),
            # what a user must keep to reproduce the predictions: the demonstrations' text (UTF-8)
            "checkpoint_bytes": len(prefix.encode("utf-8")),
            "trainable_params": 0,
            "total_params": dims.total_params,
            "train_seconds": 0.0,
            "k_used": k_used,
            "prefix_tokens": out.prefix_tokens,
        }
        if spec.calibrate:
            from harness.calibration import calibrate

            calibration = calibrate(lm, task, template, examples, prompts, prefix, out, use_cache=spec.kv_cache,
                                    batch_size=batch_size)
            base.extra = {"calibration": calibration.pop("calibration")}
            metrics |= calibration
        if reuse is not None:  # part of a k-curve: what this run computed itself, the shared prefix not counted
            metrics["prefix_reused_tokens"] = out.reused_tokens
            metrics["infer_flops_per_example_shared"] = costs.forward_flops(dims, out.work) / n
        metrics["eval_seconds"] = metrics["seconds"] = time.perf_counter() - start
        base.status, base.metrics, base.examples = "finished", metrics, out.examples
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # recorded, and the other runs go on
        base.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        base.extra = {"traceback": traceback.format_exc(limit=8)}
        base.metrics = {"seconds": time.perf_counter() - start}
    return base, prefix_cache


def _score_with_backoff(lm: LoadedModel, prompts, prefix: str, use_cache: bool, batch_size: int, progress: bool,
                        reuse=None):
    """Score; on out-of-memory halve the batch and try again (down to 1)."""
    while True:
        try:
            return score_prompts(lm.model, lm.tokenizer, prompts, prefix, use_cache=use_cache,
                                 batch_size=batch_size, progress=progress, reuse=reuse)
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            if lm.device.type == "cuda":
                torch.cuda.empty_cache()
            log.warning("out of memory: retrying with batch size %d", batch_size)
