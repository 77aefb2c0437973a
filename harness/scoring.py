"""Rank classification: the log-probability of every answer choice given its context.

Prompts are tokenized by :mod:`harness.tokenization` (lm-evaluation-harness's split of context and continuation,
each context encoded once for all its choices, all strings of a call in one tokenizer batch); its public names
(``encode_pair``, ``encode_batch``, ``split_point``, ``tokenize_prompts``, ``Row``, ...) are re-exported here. A
partial-scoring prompt (:attr:`harness.templates.Prompt.contexts`: a context per choice, one shared continuation)
is scored as one row per choice, each its own query on both paths. A NaN or infinite summed log-prob raises
HarnessError.

Two paths give the same numbers (within float noise, asserted by a test):

- **cached** (default): the shared prefix (the k demonstrations) is encoded once into a KV cache
  (:mod:`harness.kvcache`); each query's own tokens are encoded once from that state, in batches; then all its
  answer choices are scored together from the query's state. No work is repeated per choice. On CUDA and the CPU (for plain
  causal architectures) the batch attends to the ONE stored prefix through :mod:`harness.attention` instead of a
  copy of it per row.
- **naive** (``use_cache=False``): every (query, choice) row is the full token sequence, scored on its own.

Batches: rows are sorted by length (longest first) and cut into micro-batches, each padded only to its own longest
row. On the CPU a micro-batch holds ``batch_size`` rows; on CUDA it holds as many rows as a token budget chosen
from the free device memory allows (never fewer than ``batch_size``), so short cached queries go in large batches
and long naive rows in small ones. Both record their work (tokens, attended keys, projected positions) in a
:class:`harness.costs.Work`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from harness import attention
from harness import seq2seq as _seq2seq
from harness.compat import cache_kwargs, is_prompt_learning, output_cache, peft_legacy_calls
from harness.costs import ModelDims, Work
from harness.errors import HarnessError
from harness.kvcache import PrefixCache
from harness.batching import (GPU_SHARE_ENV, gpu_share, plan_batches, plan_window_batches,  # noqa: F401
                              token_budget)  # (re-exported)
from harness.choice import argmax_first  # noqa: F401  (re-exported: callers import it from here)
from harness.store import ExampleScore
from harness.templates import Prompt
from harness.tokenization import Row, _tokenize, bos_ids, encode_batch, encode_pair, split_point, tokenize_prompts

__all__ = [  # with the tokenization names re-exported from harness.tokenization
    "Row", "ScoreOutput", "argmax_first", "bos_ids", "encode_batch", "encode_pair", "metrics_from_examples",
    "gpu_share", "plan_batches", "score_cached", "score_naive", "score_prompts", "shared_prefix_len", "split_point",
    "token_budget", "tokenize_prompts", "uncached_work", "use_shared_prefix",
]


def metrics_from_examples(examples: Sequence[ExampleScore]) -> dict:
    """``accuracy`` (argmax of summed log-prob), ``accuracy_norm`` (argmax of per-token mean, T-Few) and
    ``accuracy_norm_char`` (argmax of log-prob per character of the choice without the delimiter, lm-eval's
    ``acc_norm``); docs/metrics.md. A NaN/inf log-prob raises :class:`HarnessError` naming the example."""
    n = len(examples)
    if n == 0:
        return {"n_eval": 0, "accuracy": None, "accuracy_norm": None, "accuracy_norm_char": None}
    for ex in examples:  # first, so the error names the first bad example whatever the metric
        ex.check_finite()
    acc = sum(ex.prediction == ex.label for ex in examples) / n
    acc_norm = sum(ex.prediction_norm == ex.label for ex in examples) / n
    acc_norm_char = sum(ex.prediction_norm_char == ex.label for ex in examples) / n
    return {"n_eval": n, "accuracy": acc, "accuracy_norm": acc_norm, "accuracy_norm_char": acc_norm_char}


@dataclasses.dataclass
class ScoreOutput:
    examples: list[ExampleScore]
    rows: list[Row]  # the token ids that were scored: one row per prompt, one per choice of a partial prompt
    work: Work  # everything the evaluation computed, prefix included
    prefix_tokens: int  # length of the cached prefix (0 without one)
    cache: PrefixCache | None = None  # the prefix's KV cache (cached path), for a shorter prefix to reuse
    reused_tokens: int = 0  # prefix tokens taken from a reused cache (their encoding is not in ``work``)

    @property
    def n_examples(self) -> int:
        return len(self.examples)


def _gather_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [..., V], targets [...] -> log p(target) [...] in float32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# --------------------------------------------------------------------------------------------- padding

def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, mask [B, L] with each sequence right-aligned (left padding)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        if s:
            ids[b, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[b, width - len(s):] = 1
    return ids, mask


# --------------------------------------------------------------------------------------------- naive path

@torch.no_grad()
def score_naive(model, rows: list[Row], batch_size: int, dims: ModelDims, pad_id: int, progress=False,
                budget: int | None = None) -> tuple[list[list[float]], Work]:
    """Every (row, choice) as one full sequence, left-padded; logits only at continuation positions."""
    device = next(model.parameters()).device
    seqs = [(i, j, r.context + c, len(c)) for i, r in enumerate(rows) for j, c in enumerate(r.continuations)]
    out = [[0.0] * len(r.continuations) for r in rows]
    work = Work()
    batches = plan_batches([len(s[2]) for s in seqs], batch_size, budget)  # long first: fail fast on memory
    legacy = is_prompt_learning(model)
    for idx in tqdm(batches, disable=not progress, desc="naive", leave=False):
        batch = [seqs[s] for s in idx]
        ids, mask = _left_pad([s[2] for s in batch], pad_id)  # [B, W]
        keep = max(s[3] for s in batch) + 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with peft_legacy_calls(legacy):  # peft's prefix tuning passes its prefix as past_key_values=
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                           use_cache=False, logits_to_keep=keep).logits  # [B, keep, V]
        # logits at kept positions keep-n-1 .. keep-2 predict a row's n continuation tokens (right-aligned)
        targets = torch.zeros((len(batch), keep - 1), dtype=torch.long)  # [B, keep-1]
        tmask = torch.zeros((len(batch), keep - 1))
        for b, (_, _, seq, n_cont) in enumerate(batch):
            targets[b, keep - 1 - n_cont:] = torch.tensor(seq[-n_cont:], dtype=torch.long)
            tmask[b, keep - 1 - n_cont:] = 1.0
            work.add_tokens(len(seq), 0, dims.windows)
            work.logit_positions += n_cont
        lp = _gather_logprobs(logits[:, :keep - 1], targets.to(device))  # [B, keep-1]
        for (i, j, _, _), s in zip(batch, (lp * tmask.to(device)).sum(-1).tolist()):
            out[i][j] = s
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


# --------------------------------------------------------------------------------------------- cached path

def use_shared_prefix(model) -> bool:
    """Default for the cached path: shared-prefix attention (CUDA and CPU) where the architecture allows it. On the
    CPU it replaced per-row copies of the prefix cache (benchmarks/vs_lmeval.py, docs/benchmarks.md)."""
    device = next(model.parameters()).device
    return device.type in ("cuda", "cpu") and not is_prompt_learning(model) and attention.supports(model)


@torch.no_grad()
def score_cached(model, rows: list[Row], batch_size: int, dims: ModelDims, pad_id: int, progress=False,
                 budget: int | None = None, shared: bool = False, reuse: PrefixCache | None = None,
                 ) -> tuple[list[list[float]], Work, PrefixCache, int]:
    """Prefix once; each query's own tokens once (batched); all its choices from the query's state.

    ``reuse``: a cache whose token ids begin like these rows' shared prefix (the demonstrations of a larger k):
    its head (the common token prefix) is cropped and used instead of encoding it again (the rest of this
    prefix, if any, is encoded once onto it); ``work`` then does not count the reused tokens' encoding. Returns (scores, work, the prefix cache used, prefix tokens reused)."""
    device = next(model.parameters()).device
    n_prefix = shared_prefix_len(rows)
    cache, reused = None, 0
    work = Work()
    if reuse is not None and rows:
        common = _common_prefix_len(reuse.ids, rows[0].context[:n_prefix])
        cache = reuse.head(common) if common > 0 else None
        if cache is not None:
            reused = len(cache.ids)
            if reused < n_prefix:  # the rest of this prefix (tokens that part from the reused ones): encoded once
                cache = cache.extend(model, rows[0].context[reused:n_prefix], copy_first=cache is reuse)
                work.add_tokens(n_prefix - reused, reused, dims.windows)
    if cache is None:
        cache = PrefixCache.encode(model, rows[0].context[:n_prefix] if rows else [])
        work.add_tokens(n_prefix, 0, dims.windows)
    out = [[0.0] * len(r.continuations) for r in rows]
    # a query's width with its choices; the shared prefix adds no rows' width when it is not copied per row
    widths = [len(r.context) - n_prefix + max(len(c) for c in r.continuations) for r in rows]
    if not shared:
        widths = [w + n_prefix for w in widths]
    window = min((w for w in dims.windows if w), default=None)
    if window:  # sliding-window layers (Gemma 3): batch only what lies inside the first window
        query_lens = [len(r.context) - n_prefix for r in rows]
        choice_lens = [max(len(c) for c in r.continuations) for r in rows]
        batches = plan_window_batches(query_lens, choice_lens, n_prefix, window, batch_size, budget)
    else:
        batches = plan_batches(widths, batch_size, budget)
    context = attention.shared_prefix_attention(model) if shared and n_prefix else contextlib.nullcontext()
    with context:
        for idx in tqdm(batches, disable=not progress, desc="scoring", leave=False):
            queries = [rows[i].context[n_prefix:] for i in idx]
            conts = [rows[i].continuations for i in idx]
            scores, batch_work = _score_from_cache(model, cache, queries, conts, dims, pad_id, device, shared)
            work.add(batch_work)
            for i, s in zip(idx, scores):
                out[i] = s
    return out, work, cache, reused


def _score_from_cache(model, cache: PrefixCache, queries: list[list[int]], conts: list[list[list[int]]],
                      dims: ModelDims, pad_id: int, device, fast: bool) -> tuple[list[list[float]], Work]:
    """``fast``: the architecture allows :mod:`harness.attention`'s paths after a prefix (shared-prefix attention;
    right-padded causal rows without a mask for one-token choices). Without a prefix (zero-shot, an adapter's
    evaluation) the queries stay left-padded with a mask: the right-padded path gives other bfloat16 numbers (the
    same run ids could not then reproduce the published runs; docs/results.md, round 20), so taking it needs a new
    ``SCORING_VERSION``."""
    work = Work()
    n_prefix = len(cache.ids)
    shared = fast and n_prefix > 0
    B = len(queries)
    # 1) queries, left-padded after the prefix: [B, Lq]
    q_ids, q_mask = _left_pad(queries, pad_id)
    for q in queries:
        work.add_tokens(len(q), n_prefix, dims.windows)
        work.logit_positions += 1
    q_pos = n_prefix + (q_mask.cumsum(-1) - 1).clamp(min=0)
    lc = max(len(c) for cs in conts for c in cs)
    extra = {"shared_prefix": cache.shared()} if shared else {}
    if shared and lc == 1:  # no own cache needed: right-padded rows, causal without a mask (flash on CUDA)
        logits = attention.last_token_logits(model, queries, n_prefix, pad_id, device, extra["shared_prefix"])
        last_logprobs = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
    else:
        if shared:  # own keys only in the cache; the prefix through the shared K/V
            from transformers import DynamicCache

            past, mask = DynamicCache(), q_mask
        else:
            past = cache.expand(B)
            mask = torch.cat([torch.ones((B, n_prefix), dtype=torch.long), q_mask], dim=1)  # [B, P+Lq]
        res = model(input_ids=q_ids.to(device), attention_mask=mask.to(device), position_ids=q_pos.to(device),
                    **cache_kwargs(past), use_cache=lc > 1, logits_to_keep=1, **extra)  # a cache only for choices
        # of several tokens: single-token choices are scored from these logits (no K/V writes, no cache copies)
        last_logprobs = torch.log_softmax(res.logits[:, -1].float(), dim=-1)  # [B, V]
        past = output_cache(res)
    # 2) every choice of every query, right-padded, from that query's state

    def forward(ids, mask_, pos, past_, owner_t):
        return model(input_ids=ids, attention_mask=mask_, position_ids=pos, **cache_kwargs(past_), use_cache=True,
                     **extra).logits

    n_ctx = [n_prefix + len(q) for q in queries]
    out = score_choices(forward, last_logprobs, past if lc > 1 else None, mask if lc > 1 else None, conts, n_ctx,
                        pad_id, device, dims, work)
    return out, work


def score_choices(forward, last_logprobs: torch.Tensor, past, mask: torch.Tensor | None, conts: list[list[list[int]]],
                  n_ctx: list[int], pad_id: int, device, dims: ModelDims, work: Work) -> list[list[float]]:
    """Summed log-prob of every choice of every query from that query's state: the first token from
    ``last_logprobs`` [B, V], the rest through one forward of all choices, right-padded, [R, Lc], after their
    query's cache ``past`` (rows selected per choice) with ``mask`` [B, P] (the query's attention mask so far).

    ``forward(input_ids, attention_mask, position_ids, past, owners)`` runs the model (``owners`` [R]: the query
    of each choice row) and returns logits; ``n_ctx[b]``: query b's context length (positions continue there).
    The choices' work is added to ``work`` (the last token of a choice needs no forward of its own)."""
    owners = [b for b, cs in enumerate(conts) for _ in cs]
    flat = [c for cs in conts for c in cs]
    R, lc = len(flat), max(len(c) for c in flat)
    c_ids = torch.full((R, lc), pad_id, dtype=torch.long)
    c_mask = torch.zeros((R, lc), dtype=torch.long)
    for r, c in enumerate(flat):
        c_ids[r, :len(c)] = torch.tensor(c, dtype=torch.long)
        c_mask[r, :len(c)] = 1
    owner_t = torch.tensor(owners, dtype=torch.long)
    ctx = [n_ctx[b] for b in owners]
    sums = _gather_logprobs(last_logprobs[owner_t.to(device)],
                            torch.tensor([c[0] for c in flat], device=device))  # [R]
    if lc > 1:
        c_pos = torch.tensor(ctx).unsqueeze(1) + torch.arange(lc).unsqueeze(0)  # [R, Lc]
        past.batch_select_indices(owner_t.to(device))
        full_mask = torch.cat([mask[owner_t], c_mask], dim=1)  # [R, P + Lc]
        logits = forward(c_ids[:, :-1].to(device), full_mask[:, :-1].to(device), c_pos[:, :-1].to(device), past,
                         owner_t)  # [R, Lc-1, V]
        lp = _gather_logprobs(logits, c_ids[:, 1:].to(device))  # [R, Lc-1]
        sums = sums + (lp * c_mask[:, 1:].to(device)).sum(-1)
    for r, c in enumerate(flat):
        work.add_tokens(len(c) - 1, ctx[r], dims.windows)
        work.logit_positions += len(c) - 1
    out: list[list[float]] = [[] for _ in conts]
    for b, v in zip(owners, sums.tolist()):
        out[b].append(v)
    return out


def score_prompts(model, tokenizer, prompts: Sequence[Prompt], prefix: str = "", *, use_cache: bool = True,
                  batch_size: int = 8, progress: bool = False, budget: int | None | str = "auto",
                  shared_prefix: bool | None = None, reuse: PrefixCache | None = None) -> ScoreOutput:
    """Score every choice of every prompt, with ``prefix`` (demonstrations) before each context.

    ``budget``: padded tokens per micro-batch ("auto": from free memory on CUDA, none on the CPU; None: exactly
    ``batch_size`` rows; always so for peft prompt learning). ``shared_prefix``: attend to one stored prefix instead of per-row copies (None: on CUDA
    and the CPU where the architecture allows it). On CUDA out-of-memory the budget is halved and scoring restarts.
    ``reuse``: the prefix cache of a longer prefix this one is the head of (:func:`score_cached`; cached path only).
    """
    dims = ModelDims.from_model(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows, owners = _tokenize(tokenizer, prompts, prefix)
    device = next(model.parameters()).device
    # prompt learning is scored with exactly batch_size rows (its callers ask for one row: padding shifts positions)
    if budget == "auto":  # (prompt learning: no budget, exactly batch_size rows; "auto" is not a number)
        tokens = None if is_prompt_learning(model) else token_budget(model, dims, device)
    else:
        tokens = budget
    shared = use_shared_prefix(model) if shared_prefix is None else shared_prefix
    from harness.models import is_seq2seq

    cache, reused = None, 0
    while True:
        try:
            if is_seq2seq(model):  # T5 family: encoder once per query (use_cache) or per choice (naive)
                scores, work = _seq2seq.score_seq2seq(model, rows, batch_size, dims, pad_id, progress, use_cache)
                n_prefix = 0
            elif use_cache:
                scores, work, cache, reused = score_cached(model, rows, batch_size, dims, pad_id, progress, tokens,
                                                           shared, reuse)
                n_prefix = len(cache.ids)
            else:
                scores, work = score_naive(model, rows, batch_size, dims, pad_id, progress, tokens)
                n_prefix = 0
            break
        except torch.OutOfMemoryError:
            if tokens is None or tokens <= 1024 or device.type != "cuda":
                raise
            tokens //= 2
            torch.cuda.empty_cache()
    logprobs: list[list[float]] = [[] for _ in prompts]
    n_tokens: list[list[int]] = [[] for _ in prompts]
    for i, row, row_scores in zip(owners, rows, scores):  # a partial-scoring prompt's rows, in choice order
        logprobs[i].extend(row_scores)
        n_tokens[i].extend(len(c) for c in row.continuations)
    for p, values in zip(prompts, logprobs):
        for j, value in enumerate(values):
            if not math.isfinite(value):
                raise HarnessError(
                    f"example {p.example_id!r}, choice {j} ({p.choices[j].strip()[:40]!r}): the summed "
                    f"log-probability is {value}; the model gave non-finite log-probabilities (try float32 "
                    f"or bfloat16 instead of float16, or check the weights)")
    # n_chars: the choice's characters without the target delimiter (the shared continuation's, partial)
    examples = [ExampleScore(p.example_id, p.label, lp, nt, list(p.n_chars))
                for p, lp, nt in zip(prompts, logprobs, n_tokens)]
    return ScoreOutput(examples, rows, work, n_prefix, cache, reused)


def uncached_work(rows: list[Row], dims: ModelDims) -> Work:
    """The work the naive path would do on these rows (for ``infer_flops_per_example_uncached``)."""
    work = Work()
    if dims.enc_params:  # encoder-decoder: the prompt re-encoded for every choice (harness.seq2seq)
        for r in rows:
            for c in r.continuations:
                _seq2seq.record_work(work, len(r.context), 0, encode=True)
                _seq2seq.record_work(work, len(r.context), len(c), encode=False)
        return work
    for r in rows:
        for c in r.continuations:
            work.add_tokens(len(r.context) + len(c), 0, dims.windows)
            work.logit_positions += len(c)
    return work
