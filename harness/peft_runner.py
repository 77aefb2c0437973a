"""Train one PEFT adapter per training group and evaluate it on every template of the group.

A group is the specs sharing ``RunSpec.train_group`` (task, method, seed, model, preset, dtype, device, training
settings): one adapter is trained on the few-shot set of the seed, saved under ``<artifacts>/<group hash>/``, and
scored zero-shot with each spec's template. A failure anywhere in loading or training gives a ``failed`` result
for every spec of the group; a failure while scoring one template fails that spec only. Nothing is raised
(except KeyboardInterrupt).

Cost metrics (definitions of the base terms in :mod:`harness.costs`):

- ``train_flops``: ``costs.train_flops(base dims, training work, trainable params)`` over every processed token
  of every choice row (virtual tokens of prompt tuning/p-tuning included; prefix keys counted as attended keys),
  plus 3x (forward + backward) the method's own FLOPs: unmerged LoRA matmuls, IA3 scalings, and per row the
  prefix-tuning MLP, per forward call intrinsic SAID's Fastfood projections and per token its rank-1 hooks
  (training only: merged for inference); plus the per-call work of ``Overhead.per_forward`` once per forward
  call, with its backward where differentiated (:func:`harness.methods.base.train_overhead_flops`); plus, for a
  method with a ``prepare`` step (FishMask's Fisher), ``costs.train_flops(base dims, its work, total params)``:
  forward + backward with every parameter's gradient;
- ``infer_flops_per_example``: ``forward_flops(base dims, evaluation work) / n_eval`` plus, per example,
  the method's additions to that work: LoRA ``2 r (d_in + d_out)`` per token and adapted layer (scored unmerged;
  on an encoder-decoder each adapted layer only for the tokens of its stack, cross-attention K/V per encoder state
  and decoder row: :class:`harness.methods.base.Overhead`);
  IA3 one multiply per scaled element per token; prompt tuning/p-tuning the virtual tokens' own forward once per
  example plus ``4 n_heads head_dim n_layers n_virtual`` per token for attending to them; prefix tuning the
  latter attention term only; and the method's per-call work (``Overhead.per_forward``: DoRA's ``B A`` and
  weight norm, OFT's rotations, Compacter's PHM weights, p-tuning's prompt encoder while it is not in peft's
  inference mode) once per forward call, the calls being ``ceil(n_eval / batch size)`` with the batch size of
  :func:`evaluate` (``--batch-size``, default 8 examples; 1 for methods scored one row at a time). The scorer's
  real calls can differ (a second call for multi-token choices on the cached path, a CUDA token budget that puts
  more rows in a call, out-of-memory halving); the figure is the method's cost at that nominal batch, like the
  rest independent of our batching. Prefix tuning's MLP is not counted at inference (computed once when
  deployed). Sliding-window layers are charged the extra keys as full layers.
- ``infer_flops_per_example_uncached``: the same, with the evaluation work of the naive path (every choice row
  on its own, :func:`harness.scoring.uncached_work`), as the ICL runner defines it; a PEFT run has no
  demonstrations, so the difference is only the sharing of a context across its choices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from harness import costs
from harness.costs import ModelDims, Work
from harness.data import few_shot_examples, load_split
from harness.errors import HarnessError
from harness.methods import get_method, method_overhead, apply_method
from harness.methods.artifacts import load_trained, save_trained
from harness.methods.base import Overhead, per_token_flops
from harness.models import LoadedModel, load_model
from harness.scoring import metrics_from_examples, score_prompts, uncached_work
from harness.spec import RunSpec
from harness.store import RunResult
from harness.tokenizer_check import run_env
from harness.train_state import TrainState
from harness.training import train

log = logging.getLogger(__name__)


def group_hash(spec: RunSpec) -> str:
    """16 hex digits naming the adapter folder of ``spec``'s training group."""
    blob = json.dumps(spec.train_group, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameters, each tensor counted once (tied weights once)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += costs.logical_numel(p)  # a 4-bit base weight (qlora) as the matrix it holds
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def eval_forwards(n_examples: int, batch_size: int) -> int:
    """Forward calls charged to an evaluation of ``n_examples`` examples: one per ``batch_size`` examples."""
    if n_examples <= 0:
        return 0
    if batch_size < 1:
        raise HarnessError(f"evaluation batch size must be >= 1, got {batch_size}")
    return -(-n_examples // batch_size)


def eval_overhead_flops(dims: ModelDims, overhead: Overhead, work: Work, n_examples: int,
                        batch_size: int | None = None) -> int:
    """The method's FLOPs on top of ``forward_flops(dims, work)`` for an evaluation (see module docstring).
    ``batch_size``: examples per forward call, for ``overhead.per_forward`` (None: per-call work left out, the
    figure per row)."""
    extra = per_token_flops(overhead, work)  # an encoder-decoder's stacks apart (harness.methods.base.Overhead)
    if batch_size is not None:
        extra += overhead.per_forward * eval_forwards(n_examples, batch_size)
    per_key = 4 * dims.n_heads * dims.head_dim * dims.n_layers  # one more attended key, all layers, one token
    if overhead.virtual_tokens:
        virtual = Work()
        virtual.add_tokens(overhead.virtual_tokens, 0, dims.windows)
        extra += n_examples * (costs.forward_flops(dims, virtual) + overhead.per_token * overhead.virtual_tokens)
        extra += per_key * overhead.virtual_tokens * work.tokens
    if overhead.prefix_keys:
        extra += per_key * overhead.prefix_keys * work.tokens
    return extra


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _score(model, tokenizer, prompts, use_cache: bool, batch_size: int, progress: bool, one_row: bool):
    """Score; on out-of-memory halve the batch and try again (down to 1). ``one_row``: exactly one row per
    forward (no token budget that would batch more rows), for methods whose positions padding would shift."""
    extra = {"budget": None} if one_row else {}
    while True:
        try:
            return score_prompts(model, tokenizer, prompts, "", use_cache=use_cache,
                                 batch_size=1 if one_row else batch_size, progress=progress, **extra)
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            torch.cuda.empty_cache()
            log.warning("out of memory while scoring: retrying with batch size %d", batch_size)


def evaluate(model, tokenizer, info, task, spec: RunSpec, data_dir, dims: ModelDims, overhead: Overhead, *,
             batch_size: int = 8, progress: bool = False) -> tuple[dict, list]:
    """Score ``model`` zero-shot on ``spec``'s template and eval split; return (metrics, examples).

    Prompt-learning methods whose peft forward drops position ids are scored one row at a time, so left
    padding cannot shift their positions; methods with a prefix in the cache are scored without the KV cache.
    """
    start = time.perf_counter()
    examples = load_split(task, task.eval_split, data_dir)
    if spec.limit is not None:
        examples = examples[: spec.limit]
    template = task.template(spec.template)
    prompts = [task.render(template, ex) for ex in examples]
    use_cache = info.supports_kv_cache and spec.kv_cache
    one_row = not info.position_ids
    out = _score(model, tokenizer, prompts, use_cache, batch_size, progress, one_row=one_row)
    n = max(out.n_examples, 1)
    per_call = 1 if one_row else batch_size  # examples per forward call, for the method's per-call work
    cached = costs.forward_flops(dims, out.work) + eval_overhead_flops(dims, overhead, out.work, n, per_call)
    naive_work = uncached_work(out.rows, dims)
    naive = costs.forward_flops(dims, naive_work) + eval_overhead_flops(dims, overhead, naive_work, n, per_call)
    metrics = metrics_from_examples(out.examples) | {
        "infer_flops_per_example": cached / n,
        "infer_flops_per_example_uncached": naive / n,
        "eval_seconds": time.perf_counter() - start,
    }
    return metrics, out.examples


def run_peft_group(load_base: Callable[[], LoadedModel], task, specs: list[RunSpec], data_dir,
                   artifacts_dir: Path, *, batch_size: int = 8, progress: bool = False,
                   env: dict | None = None, compile: str | bool | None = "auto") -> Iterator[RunResult]:
    """Train once for the group of ``specs`` and yield one :class:`RunResult` per spec (see module docstring).
    ``compile``: whether training forwards run under ``torch.compile`` (:func:`harness.compiling.compile_mode`)."""
    specs = list(specs)
    if not specs:
        return
    first = specs[0]
    if any(s.train_group != first.train_group for s in specs):
        raise ValueError("run_peft_group: specs must share one train_group")
    env = env or {}
    start = time.perf_counter()
    settings = dict(first.train)
    is_random = False
    try:
        info = get_method(first.method)
        lm = load_base()
        is_random = lm.is_random
        env = run_env(env, getattr(lm, "tokenizer", None))
        costs.reset_peak_memory(lm.device)
        dims = ModelDims.from_model(lm.model)  # the base model's, before any adapter
        torch.manual_seed(first.seed)  # adapter initialisation (LoRA A, prompt embeddings, ...)
        model = apply_method(lm.model, first.method, settings)
        train_examples = few_shot_examples(task, first.seed, data_dir, n=settings["n_train"])
        prepare_flops = 0
        if info.prepare is not None:  # data-dependent methods (FishMask's Fisher): every gradient, fwd + bwd
            base_total = count_params(model)[1]
            prepare_work = info.prepare(model, lm.tokenizer, train_examples, task, settings, first.seed)
            prepare_flops = costs.train_flops(dims, prepare_work, base_total)
        overhead = method_overhead(model, first.method, settings)
        trainable, total = count_params(model)
        trainable_vocab = costs.trainable_vocab_params(model)
        # an interrupted training continues from its last state (harness.train_state) where the method allows
        state = TrainState(Path(artifacts_dir) / f"{group_hash(first)}.train_state.pt") if info.resumable else None
        stats = train(model, lm.tokenizer, train_examples, task, settings, first.seed, progress, method=first.method,
                      compile=compile, state=state)
        model.eval()
        folder = save_trained(model, info, Path(artifacts_dir) / group_hash(first))
    except Exception as exc:  # noqa: BLE001 - recorded; the other groups go on
        error, tb = _one_line(exc), traceback.format_exc(limit=8)
        log.warning("training %s/%s/seed %s failed: %s", first.task, first.method, first.seed, error)
        for spec in specs:
            yield RunResult(run_id=spec.run_id, config=spec.config(), status="failed", error=error, env=env,
                            metrics={"seconds": time.perf_counter() - start}, extra={"traceback": tb},
                            is_random=is_random)
        return
    yield from group_results(model, lm, info, task, specs, data_dir, dims, overhead, stats, folder, env,
                             params=(trainable, total, trainable_vocab), prepare_flops=prepare_flops,
                             batch_size=batch_size, progress=progress, is_random=is_random)
    if state is not None:  # every run of the group stored: a kill before this resumes with no step to redo
        state.remove()


def group_results(model, lm: LoadedModel, info, task, specs: list[RunSpec], data_dir, dims: ModelDims,
                  overhead: Overhead, stats, folder: Path, env: dict, *, params: tuple, prepare_flops: int = 0,
                  batch_size: int = 8, progress: bool = False, is_random: bool = False,
                  extra: dict | None = None) -> Iterator[RunResult]:
    """Score the trained ``model`` (adapter saved in ``folder``) on every spec's template and yield one result per
    spec: what :func:`run_peft_group` and the packed runner (:mod:`harness.packed_runner`) store alike.
    ``params``: (trainable, total, trainable vocabulary params) of ``model``; ``extra`` joins each run's extras."""
    trainable, total, trainable_vocab = params
    first = specs[0]
    checkpoint_bytes = costs.directory_bytes(folder)
    train_seconds = stats.seconds
    shared = {
        "trainable_params": trainable,
        "total_params": total,
        "train_flops": (costs.train_flops(dims, stats.work, trainable, *trainable_vocab) + stats.overhead_flops
                        + prepare_flops),
        "train_seconds": train_seconds,
        "checkpoint_bytes": checkpoint_bytes,
        "steps": stats.steps,
        "loss_first": stats.losses[0] if stats.losses else None,
        "loss_last": stats.losses[-1] if stats.losses else None,
        "train_tokens": stats.work.tokens,
        "train_peak_memory_bytes": stats.peak_memory_bytes,
        "micro_batch": stats.micro_batch,
        "grad_accum": stats.grad_accum,
    }
    extra = {"losses": stats.losses, "loss_components": stats.components, "overhead": dataclasses.asdict(overhead),
             "group": group_hash(first), "compiled": stats.compiled,
             "first_step_seconds": stats.step_seconds[0] if stats.step_seconds else None} | (extra or {})
    for spec in specs:
        try:
            metrics, examples = evaluate(model, lm.tokenizer, info, task, spec, data_dir, dims, overhead,
                                         batch_size=batch_size, progress=progress)
        except Exception as exc:  # noqa: BLE001
            yield RunResult(run_id=spec.run_id, config=spec.config(), status="failed", error=_one_line(exc),
                            env=env, metrics=dict(shared), extra={"traceback": traceback.format_exc(limit=8)},
                            artifact_path=str(folder), is_random=is_random)
            continue
        metrics |= shared
        metrics["seconds"] = train_seconds + metrics["eval_seconds"]
        # the training's peak too: a run resumed after its training (harness.train_state) evaluates in a new process
        metrics["peak_memory_bytes"] = max(costs.peak_memory_bytes(lm.device), stats.peak_memory_bytes)
        yield RunResult(run_id=spec.run_id, config=spec.config(), status="finished", metrics=metrics,
                        examples=examples, artifact_path=str(folder), env=env, extra=dict(extra),
                        is_random=is_random)


# --------------------------------------------------------------------------------------------- re-evaluation

def spec_from_config(config: dict) -> RunSpec:
    """Rebuild a :class:`RunSpec` from a stored ``config`` dict (lists back to tuples)."""
    fields = {f.name for f in dataclasses.fields(RunSpec)}
    kwargs = {k: v for k, v in config.items() if k in fields and k != "train"}
    train_items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in config.get("train", {}).items()))
    return RunSpec(**kwargs, train=train_items)


def eval_saved(load_base: Callable[[], LoadedModel], run: dict, task, data_dir, *, batch_size: int = 8,
               progress: bool = False, env: dict | None = None) -> RunResult:
    """Reload the adapter saved by ``run`` (a stored run dict with ``config`` and ``artifact_path``) onto a fresh
    base and re-score its template; raises :class:`HarnessError` when there is nothing to reload."""
    config = run["config"]
    info = get_method(config["method"])
    if info.kind != "peft":
        raise HarnessError(f"run {run['run_id']} is {info.kind}: there is no adapter to reload")
    path = run.get("artifact_path")
    if not path:
        raise HarnessError(f"run {run['run_id']} has no saved adapter (status {run.get('status')})")
    spec = spec_from_config(config)
    settings = dict(config.get("train", {}))
    lm = load_base()
    costs.reset_peak_memory(lm.device)
    dims = ModelDims.from_model(lm.model)
    model = lm.model
    if info.artifact == "tensors":  # hand-written methods: re-apply (freezing, maybe wrapping), then load the tensors
        model = apply_method(model, config["method"], settings)
    model = load_trained(model, info, path)
    overhead = method_overhead(model, config["method"], settings)
    metrics, examples = evaluate(model, lm.tokenizer, info, task, spec, data_dir, dims, overhead,
                                 batch_size=batch_size, progress=progress)
    metrics["checkpoint_bytes"] = costs.directory_bytes(path)
    metrics["peak_memory_bytes"] = costs.peak_memory_bytes(lm.device)
    return RunResult(run_id=run["run_id"], config=config, status="finished", metrics=metrics, examples=examples,
                     artifact_path=str(path), env=run_env(env, getattr(lm, "tokenizer", None)),
                     is_random=lm.is_random)


def eval_saved_command(db, run: dict, data_dir, batch_size: int = 8) -> str:
    """``harness eval --run``: re-score a stored PEFT run from its adapter and compare with the stored scores."""
    from harness.data import resolve_data_dir

    config = run["config"]
    folder = resolve_data_dir(data_dir)
    spec = spec_from_config(config)
    result = eval_saved(lambda: load_model(spec.load_from, config.get("device", "auto"), config.get("dtype", "auto"),
                                          quantize=get_method(spec.method).quantize),
                        run, spec.load_task(), folder, batch_size=batch_size)
    stored = {e["example_id"]: [c["logprob"] for c in e["choices"]] for e in db.examples([run["run_id"]])}
    diffs = [abs(a - b) for ex in result.examples if ex.example_id in stored
             for a, b in zip(ex.logprobs, stored[ex.example_id])]
    worst = max(diffs) if diffs else float("nan")
    return (f"run {run['run_id']}: re-scored {result.metrics['n_eval']} examples from {result.artifact_path}: "
            f"accuracy {result.metrics['accuracy']:.4f} (stored {run.get('accuracy')}), "
            f"accuracy_norm {result.metrics['accuracy_norm']:.4f} (stored {run.get('accuracy_norm')}), "
            f"max |log-prob difference| {worst:.3g} over {len(diffs)} choices")
