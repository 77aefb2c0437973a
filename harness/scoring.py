"""Rank classification: the log-probability of every answer choice given its context.

Tokenization follows lm-evaluation-harness so our log-likelihoods can be compared with other tools' on the same
strings: trailing whitespace of the context moves to the continuation, the whole string is encoded, and the
continuation's tokens are the tail of the whole encoding after the context's own encoding.

Two paths give the same numbers (within float noise, asserted by a test):

- **cached** (default): the shared prefix (the k demonstrations) is encoded once into a KV cache
  (:mod:`harness.kvcache`); each query's own tokens are encoded once from that state, in batches; then all its
  answer choices are scored together from the query's state. No work is repeated per choice.
- **naive** (``use_cache=False``): every (query, choice) row is the full token sequence, scored on its own.

Both record their work (tokens, attended keys, projected positions) in a :class:`harness.costs.Work`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from harness.costs import ModelDims, Work
from harness.kvcache import PrefixCache
from harness.store import ExampleScore
from harness.tasks import Prompt


def argmax_first(values: Sequence[float]) -> int:
    """Index of the largest value; ties (and NaN) break to the lowest index, deterministically."""
    best, best_i = -math.inf, 0
    for i, v in enumerate(values):
        if v > best:
            best, best_i = v, i
    return best_i


def metrics_from_examples(examples: Sequence[ExampleScore]) -> dict:
    """``accuracy`` (argmax of summed log-prob) and ``accuracy_norm`` (argmax of per-token mean)."""
    n = len(examples)
    if n == 0:
        return {"n_eval": 0, "accuracy": None, "accuracy_norm": None}
    acc = sum(ex.prediction == ex.label for ex in examples) / n
    acc_norm = sum(ex.prediction_norm == ex.label for ex in examples) / n
    return {"n_eval": n, "accuracy": acc, "accuracy_norm": acc_norm}


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def bos_ids(tokenizer) -> list[int]:
    """BOS token to prepend when the tokenizer adds one by default (Gemma); none for SmolLM2."""
    probe = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and probe and probe[0] == bos else []


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split of (context, continuation) into token ids (BOS included in context)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return bos_ids(tokenizer) + ctx, whole[len(ctx):]


@dataclasses.dataclass
class Row:
    """One query's tokens: shared context ids and one continuation per choice."""

    context: list[int]
    continuations: list[list[int]]


@dataclasses.dataclass
class ScoreOutput:
    examples: list[ExampleScore]
    rows: list[Row]  # the token ids that were scored
    work: Work  # everything the evaluation computed, prefix included
    prefix_tokens: int  # length of the cached prefix (0 without one)

    @property
    def n_examples(self) -> int:
        return len(self.examples)


def tokenize_prompts(tokenizer, prompts: Sequence[Prompt], prefix: str) -> list[Row]:
    rows = []
    for p in prompts:
        pairs = [encode_pair(tokenizer, prefix + p.context, c) for c in p.choices]
        rows.append(Row(pairs[0][0], [cont for _, cont in pairs]))
        for ctx, cont in pairs:
            if not cont:
                raise ValueError(f"empty continuation for example {p.example_id}: {p.choices}")
    return rows


def _gather_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [..., V], targets [...] -> log p(target) [...] in float32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@torch.no_grad()
def score_naive(model, rows: list[Row], batch_size: int, dims: ModelDims, pad_id: int, progress=False) -> tuple[list[list[float]], Work]:
    """Every (row, choice) as one full sequence, left-padded; logits only at continuation positions."""
    device = next(model.parameters()).device
    seqs = [(i, j, r.context + c, len(c)) for i, r in enumerate(rows) for j, c in enumerate(r.continuations)]
    order = sorted(range(len(seqs)), key=lambda s: -len(seqs[s][2]))  # long first: fail fast on memory
    out = [[0.0] * len(r.continuations) for r in rows]
    work = Work()
    for start in tqdm(range(0, len(order), batch_size), disable=not progress, desc="naive", leave=False):
        batch = [seqs[s] for s in order[start:start + batch_size]]
        width = max(len(s[2]) for s in batch)
        keep = max(s[3] for s in batch) + 1
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, (_, _, seq, _) in enumerate(batch):
            ids[b, width - len(seq):] = torch.tensor(seq)
            mask[b, width - len(seq):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                       use_cache=False, logits_to_keep=keep).logits  # [B, keep, V]
        for b, (i, j, seq, n_cont) in enumerate(batch):
            # logits at absolute positions width-n_cont-1 .. width-2 predict the continuation tokens
            lg = logits[b, keep - n_cont - 1: keep - 1]  # [n_cont, V]
            out[i][j] = float(_gather_logprobs(lg, torch.tensor(seq[-n_cont:], device=lg.device)).sum())
            work.add_tokens(len(seq), 0, dims.windows)
            work.logit_positions += n_cont
    return out, work


def shared_prefix_len(rows: list[Row]) -> int:
    """Length of the longest token prefix common to every row's context, leaving each query >= 1 token.

    This is what the cache holds: the k demonstrations plus whatever the template's contexts share. It is taken
    from the tokens of the full strings, never from the prefix text encoded alone, because BPE can tokenize
    the boundary differently (SmolLM2 encodes "\\n\\n" alone as one token but as two before a word).
    """
    if not rows:
        return 0
    first = rows[0].context
    n = min(len(r.context) for r in rows) - 1
    for r in rows[1:]:
        n = min(n, _common_prefix_len(first, r.context))
    return max(n, 0)


@torch.no_grad()
def score_cached(model, rows: list[Row], batch_size: int, dims: ModelDims, pad_id: int,
                 progress=False) -> tuple[list[list[float]], Work, int]:
    """Prefix once; each query's own tokens once (batched); all its choices from the query's state."""
    device = next(model.parameters()).device
    n_prefix = shared_prefix_len(rows)
    cache = PrefixCache.encode(model, rows[0].context[:n_prefix] if rows else [])
    work = Work()
    work.add_tokens(n_prefix, 0, dims.windows)
    out = [[0.0] * len(r.continuations) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].context))
    for start in tqdm(range(0, len(order), batch_size), disable=not progress, desc="scoring", leave=False):
        idx = order[start:start + batch_size]
        queries = [rows[i].context[n_prefix:] for i in idx]
        conts = [rows[i].continuations for i in idx]
        scores, batch_work = _score_from_cache(model, cache, queries, conts, dims, pad_id, device)
        work.add(batch_work)
        for i, s in zip(idx, scores):
            out[i] = s
    return out, work, n_prefix


def _score_from_cache(model, cache: PrefixCache, queries: list[list[int]], conts: list[list[list[int]]],
                      dims: ModelDims, pad_id: int, device) -> tuple[list[list[float]], Work]:
    work = Work()
    n_prefix = len(cache.ids)
    B = len(queries)
    # 1) queries, left-padded after the prefix: [B, Lq]
    lq = max(len(q) for q in queries)
    q_ids = torch.full((B, lq), pad_id, dtype=torch.long)
    q_mask = torch.zeros((B, lq), dtype=torch.long)
    for b, q in enumerate(queries):
        q_ids[b, lq - len(q):] = torch.tensor(q, dtype=torch.long)
        q_mask[b, lq - len(q):] = 1
        work.add_tokens(len(q), n_prefix, dims.windows)
        work.logit_positions += 1
    q_pos = n_prefix + (q_mask.cumsum(-1) - 1).clamp(min=0)
    past = cache.expand(B)
    prefix_mask = torch.ones((B, n_prefix), dtype=torch.long)
    mask = torch.cat([prefix_mask, q_mask], dim=1)
    if lq > 0:
        res = model(input_ids=q_ids.to(device), attention_mask=mask.to(device), position_ids=q_pos.to(device),
                    past_key_values=past, use_cache=True, logits_to_keep=1)
        last_logprobs = torch.log_softmax(res.logits[:, -1].float(), dim=-1)  # [B, V]
        past = res.past_key_values
    else:  # unreachable: shared_prefix_len leaves every query at least one token
        raise AssertionError("empty query")
    # 2) every choice of every query, right-padded, from that query's state: [R, Lc]
    owners = [b for b, cs in enumerate(conts) for _ in cs]
    flat = [c for cs in conts for c in cs]
    R, lc = len(flat), max(len(c) for c in flat)
    c_ids = torch.full((R, lc), pad_id, dtype=torch.long)
    c_mask = torch.zeros((R, lc), dtype=torch.long)
    for r, c in enumerate(flat):
        c_ids[r, :len(c)] = torch.tensor(c, dtype=torch.long)
        c_mask[r, :len(c)] = 1
    owner_t = torch.tensor(owners, dtype=torch.long)
    n_ctx = torch.tensor([n_prefix + len(queries[b]) for b in owners])
    c_pos = n_ctx.unsqueeze(1) + torch.arange(lc).unsqueeze(0)
    first = _gather_logprobs(last_logprobs[owner_t.to(last_logprobs.device)],
                             torch.tensor([c[0] for c in flat], device=last_logprobs.device))  # [R]
    sums = first.clone()
    if lc > 1:
        past.batch_select_indices(owner_t.to(device))
        full_mask = torch.cat([mask[owner_t], c_mask], dim=1)
        logits = model(input_ids=c_ids[:, :-1].to(device), attention_mask=full_mask[:, :-1].to(device),
                       position_ids=c_pos[:, :-1].to(device), past_key_values=past, use_cache=True).logits  # [R, lc-1, V]
        lp = _gather_logprobs(logits, c_ids[:, 1:].to(device))  # [R, lc-1]
        sums = sums + (lp * c_mask[:, 1:].to(device)).sum(-1)
    for r, c in enumerate(flat):
        # the last continuation token needs no forward of its own
        work.add_tokens(len(c) - 1, int(n_ctx[r]), dims.windows)
        work.logit_positions += len(c) - 1
    out: list[list[float]] = [[] for _ in range(B)]
    for r, b in enumerate(owners):
        out[b].append(float(sums[r]))
    return out, work


def score_prompts(model, tokenizer, prompts: Sequence[Prompt], prefix: str = "", *, use_cache: bool = True,
                  batch_size: int = 8, progress: bool = False) -> ScoreOutput:
    """Score every choice of every prompt, with ``prefix`` (demonstrations) before each context."""
    dims = ModelDims.from_model(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = tokenize_prompts(tokenizer, prompts, prefix)
    if use_cache:
        scores, work, n_prefix = score_cached(model, rows, batch_size, dims, pad_id, progress)
    else:
        scores, work = score_naive(model, rows, batch_size, dims, pad_id, progress)
        n_prefix = 0
    examples = [
        ExampleScore(p.example_id, p.label, s, [len(c) for c in r.continuations], [len(c) for c in p.choices])
        for p, r, s in zip(prompts, rows, scores)
    ]
    return ScoreOutput(examples, rows, work, n_prefix)


def uncached_work(rows: list[Row], dims: ModelDims) -> Work:
    """The work the naive path would do on these rows (for ``infer_flops_per_example_uncached``)."""
    work = Work()
    for r in rows:
        for c in r.continuations:
            work.add_tokens(len(r.context) + len(c), 0, dims.windows)
            work.logit_positions += len(c)
    return work
