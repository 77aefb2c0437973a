"""The mixed-task scorer: one interleaved stream of queries from N tasks, scored in batches whose rows belong to
different tasks (rank classification, the same numbers as :func:`harness.scoring.score_prompts` per task).

Per task, once: its prompts are tokenized as :mod:`harness.scoring` does (``_tokenize``, the task's demonstrations
before each context), and the task's prefix (its soft prompt, if any, then the demonstrations' tokens its rows
share: :func:`known_prefix_len`, never a query's own tokens, which a server cannot know before the query comes) is
encoded with the task's own parameters into a prefix cache (one per task, shared by its rows).

Per batch of ``batch_size`` consecutive rows of the stream (arrival order, no sorting by length: a server cannot
wait for the rest of the stream): the rows' task prefixes are gathered into one cache, each right-aligned to the
batch's longest prefix and left-padded with masked zeros (``[B, H, P_max, D]`` per layer); each query's own tokens
(left-padded) are encoded after its prefix with positions counted from its own prefix length; then all answer
choices of every query from that query's state, as :func:`harness.scoring._score_from_cache`. Every forward goes
through :meth:`harness.mixed.serving.Serving.select` with the task of each of its rows.

Work (tokens, attended keys, projected positions) is counted as :mod:`harness.scoring` counts it, each task's
prefix once; per-batch wall time is kept for the latency figures.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from harness.compat import cache_kwargs, output_cache
from harness.costs import ModelDims, Work
from harness.errors import HarnessError
from harness.mixed.serving import Serving
from harness.scoring import _common_prefix_len, _left_pad, score_choices, shared_prefix_len
from harness.store import ExampleScore
from harness.templates import Prompt
from harness.tokenization import Row, _encode, _tokenize, bos_ids


@dataclasses.dataclass
class TaskQueries:
    """One task's part of the stream: its prompts and its demonstration prefix (ICL; "" otherwise)."""

    name: str
    prompts: list[Prompt]
    prefix: str = ""


@dataclasses.dataclass
class MixedOutput:
    examples: list[list[ExampleScore]]  # per task, in its prompts' order
    work: Work  # every forward, each task's prefix once
    latencies: list[float]  # wall seconds per batch (prefix encoding not included)
    tasks_per_batch: list[int]  # distinct tasks in each batch
    prefix_tokens: list[int]  # per task: soft-prompt positions + shared token prefix
    prefix_seconds: float  # encoding every task's prefix
    cache_bytes: int  # the per-task prefix caches kept while serving


def interleave(counts: list[int]) -> list[tuple[int, int]]:
    """(task, prompt) pairs round-robin over tasks: t0 p0, t1 p0, ..., t0 p1, ... (a task that runs out drops)."""
    return [(t, i) for i in range(max(counts, default=0)) for t, n in enumerate(counts) if i < n]


def known_prefix_len(tokenizer, rows: list[Row], prefix: str) -> int:
    """Tokens of a task's rows to encode once into its prefix cache: those all its rows share, but no more than the
    tokens of ``prefix`` (the demonstrations) they begin with. A server knows a task's demonstrations before its
    queries arrive, never what its queries will share (of one query, everything but its last token)."""
    if not prefix or not rows:
        return 0
    known = bos_ids(tokenizer) + _encode(tokenizer, prefix)
    return min(shared_prefix_len(rows), _common_prefix_len(known, rows[0].context))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _encode_prefix(serving: Serving, task: int, ids: list[int], soft: torch.Tensor | None):
    """Per layer (keys, values) [1, H, P, D] of the task's soft prompt + ``ids``, with its parameters; None if
    empty."""
    if not ids and soft is None:
        return None
    device = serving.device
    ids_t = torch.tensor([ids], dtype=torch.long, device=device)  # [1, n]
    if soft is not None:
        embed = serving.model.get_input_embeddings()
        inputs = {"inputs_embeds": torch.cat([soft.unsqueeze(0), embed(ids_t)], dim=1)}  # [1, V + n, d]
    else:
        inputs = {"input_ids": ids_t}
    with serving.select(torch.tensor([task])) as extra:
        out = serving.model(**inputs, use_cache=True, logits_to_keep=1, **extra)
    past = output_cache(out)
    layers = getattr(past, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(past.key_cache, past.value_cache))  # older transformers


def _batch_cache(prefixes: list, tasks: list[int], lengths: list[int]):
    """A DynamicCache [B, H, P_max, D] per layer: row b holds its task's prefix right-aligned; and the prefix
    mask [B, P_max] (1 on those positions)."""
    from transformers import DynamicCache

    B, width = len(tasks), max(lengths[t] for t in tasks)
    mask = torch.zeros((B, width), dtype=torch.long)
    cache = DynamicCache()
    if width == 0:
        return cache, mask
    rows_of: dict[int, list[int]] = {}
    for b, t in enumerate(tasks):
        rows_of.setdefault(t, []).append(b)
        mask[b, width - lengths[t]:] = 1
    ref = next(prefixes[t] for t in tasks if prefixes[t] is not None)
    for layer, (k0, v0) in enumerate(ref):
        keys = k0.new_zeros((B, k0.shape[1], width, k0.shape[3]))  # [B, H, P_max, D]
        values = v0.new_zeros((B, v0.shape[1], width, v0.shape[3]))
        for t, rows in rows_of.items():
            if prefixes[t] is None:
                continue
            k, v = prefixes[t][layer]  # [1, H, P_t, D]
            idx = torch.tensor(rows, device=keys.device)
            keys[idx, :, width - lengths[t]:] = k
            values[idx, :, width - lengths[t]:] = v
        cache.update(keys, values, layer)
    return cache, mask


@torch.no_grad()
def _score_batch(serving: Serving, prefixes, lengths, tasks: list[int], queries: list[list[int]],
                 conts: list[list[list[int]]], dims: ModelDims, pad_id: int, work: Work) -> list[list[float]]:
    device = serving.device
    B = len(queries)
    past, p_mask = _batch_cache(prefixes, tasks, lengths)
    q_ids, q_mask = _left_pad(queries, pad_id)  # [B, Lq]
    p_len = torch.tensor([lengths[t] for t in tasks]).unsqueeze(1)  # [B, 1]
    q_pos = p_len + (q_mask.cumsum(-1) - 1).clamp(min=0)  # [B, Lq]
    mask = torch.cat([p_mask, q_mask], dim=1)  # [B, P_max + Lq]
    for b, q in enumerate(queries):
        work.add_tokens(len(q), lengths[tasks[b]], dims.windows)
        work.logit_positions += 1
    task_t = torch.tensor(tasks, dtype=torch.long)
    with serving.select(task_t) as extra:
        res = serving.model(input_ids=q_ids.to(device), attention_mask=mask.to(device), position_ids=q_pos.to(device),
                            **cache_kwargs(past), use_cache=True, logits_to_keep=1, **extra)
    last = torch.log_softmax(res.logits[:, -1].float(), dim=-1)  # [B, V]

    def forward(ids, mask_, pos, past, owners):
        with serving.select(task_t[owners]) as extra:
            return serving.model(input_ids=ids, attention_mask=mask_, position_ids=pos, **cache_kwargs(past),
                                 use_cache=True, **extra).logits

    n_ctx = [lengths[tasks[b]] + len(queries[b]) for b in range(B)]
    out = score_choices(forward, last, output_cache(res), mask, conts, n_ctx, pad_id, device, dims, work)
    return out


def score_mixed(serving: Serving, tokenizer, tasks: list[TaskQueries], batch_size: int, dims: ModelDims,
                order: list[tuple[int, int]] | None = None) -> MixedOutput:
    """Score every prompt of every task in one stream (``order``: (task, prompt) pairs, default
    :func:`interleave`), ``batch_size`` rows per batch; task i is served with ``serving``'s task i."""
    if any(dims.windows):
        raise HarnessError("mixed batches: sliding-window attention layers are not supported (their cache would "
                           "roll over at different points per row)")
    if len(tasks) > serving.n_tasks:
        raise HarnessError(f"{len(tasks)} tasks but the serving holds {serving.n_tasks}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    work = Work()
    device = serving.device
    rows_per_task: list[list[Row]] = []
    rows_of_prompt: list[list[list[int]]] = []  # per task, per prompt: its row indices
    prefixes, lengths, n_shared = [], [], []
    _sync(device)
    start = time.perf_counter()
    for t, tq in enumerate(tasks):
        rows, owners = _tokenize(tokenizer, tq.prompts, tq.prefix)
        by_prompt: list[list[int]] = [[] for _ in tq.prompts]
        for r, i in enumerate(owners):
            by_prompt[i].append(r)
        n = known_prefix_len(tokenizer, rows, tq.prefix)
        soft = serving.soft_prompt(t)
        prefixes.append(_encode_prefix(serving, t, rows[0].context[:n] if rows else [], soft))
        lengths.append(n + (0 if soft is None else soft.shape[0]))
        work.add_tokens(lengths[-1], 0, dims.windows)
        rows_per_task.append(rows)
        rows_of_prompt.append(by_prompt)
        n_shared.append(n)
    _sync(device)
    prefix_seconds = time.perf_counter() - start
    stream = [(t, r) for t, i in (order or interleave([len(tq.prompts) for tq in tasks]))
              for r in rows_of_prompt[t][i]]
    scores: list[list[list[float]]] = [[[] for _ in rows] for rows in rows_per_task]
    latencies, mixes = [], []
    for s in range(0, len(stream), batch_size):
        batch = stream[s:s + batch_size]
        b_tasks = [t for t, _ in batch]
        queries = [rows_per_task[t][r].context[n_shared[t]:] for t, r in batch]
        conts = [rows_per_task[t][r].continuations for t, r in batch]
        _sync(device)
        t0 = time.perf_counter()
        out = _score_batch(serving, prefixes, lengths, b_tasks, queries, conts, dims, pad_id, work)
        _sync(device)
        latencies.append(time.perf_counter() - t0)
        mixes.append(len(set(b_tasks)))
        for (t, r), sc in zip(batch, out):
            scores[t][r] = sc
    examples = []
    for t, tq in enumerate(tasks):
        task_examples = []
        for i, p in enumerate(tq.prompts):
            lps = [x for r in rows_of_prompt[t][i] for x in scores[t][r]]
            nts = [len(c) for r in rows_of_prompt[t][i] for c in rows_per_task[t][r].continuations]
            for j, v in enumerate(lps):
                if not math.isfinite(v):
                    raise HarnessError(f"task {tq.name}, example {p.example_id!r}, choice {j}: non-finite "
                                       f"log-probability {v}")
            task_examples.append(ExampleScore(p.example_id, p.label, lps, nts, list(p.n_chars)))
        examples.append(task_examples)
    cache_bytes = sum(k.numel() * k.element_size() * 2 for pre in prefixes if pre for k, _ in pre)
    return MixedOutput(examples, work, latencies, mixes, lengths, prefix_seconds, cache_bytes)
