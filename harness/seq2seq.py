"""Rank classification with encoder-decoder models (T5, T0, Flan-T5), as in the T-Few code.

The encoder reads the prompt (for ICL: the demonstrations and the query: the same token row a causal model
reads, :func:`harness.tokenization._tokenize`); the decoder scores each answer choice by teacher forcing: its
input is the decoder start token followed by the choice's tokens but the last, its targets the choice's tokens;
a choice's score is the sum of its tokens' log-probs (``accuracy_norm`` divides by the token count as for causal
models). No end-of-sequence token is appended to the prompt or the choice (T-Few's T5 tokenizer appends ``</s>``
to both; the harness's rows are shared with causal models, which have none).

Two paths give the same log-probs (fp32: within 1e-4, asserted by tests/test_seq2seq.py):

- **shared encoder** (default, ``use_cache=True``): the encoder runs ONCE per query; its output is expanded to
  the query's choices (an index_select, no copy of the work), which go through the decoder together.
- **naive** (``use_cache=False``): every (query, choice) pair re-encodes its prompt.

What cannot be cached: the encoder is bidirectional, so a demonstration prefix's states depend on the query that
follows it; nothing of the k demonstrations is reused across queries (docs/metrics.md). Work is recorded per
token: encoder tokens attend to all ``L`` prompt tokens, decoder tokens to their causal predecessors plus ``L``
prompt tokens (cross-attention).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from harness.costs import ModelDims, Work
from harness.tokenization import Row


def start_id(model) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    sid = getattr(cfg, "decoder_start_token_id", None)
    return int(sid if sid is not None else (cfg.pad_token_id or 0))


def _right_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(max(len(s) for s in seqs), 1)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[b, :len(s)] = 1
    return ids, mask


def decoder_tensors(choices: Sequence[Sequence[int]], start: int, pad_id: int):
    """decoder input ids (start + choice[:-1]), targets (choice), target mask: each [R, Lc]."""
    targets, mask = _right_pad(choices, pad_id)
    dec_in = torch.full_like(targets, pad_id)
    dec_in[:, 0] = start
    dec_in[:, 1:] = targets[:, :-1]
    dec_in[:, 1:][mask[:, 1:] == 0] = pad_id
    return dec_in, targets, mask


def token_logprobs(model, enc_ids, enc_mask, owners, choices, start: int, pad_id: int):
    """Per-token log-probs [R, Lc] (zero at padding) and the token mask [R, Lc] of each choice given its owner's
    prompt; the encoder runs once per prompt row (``owners`` maps each choice to a row of ``enc_ids``), except
    under peft prompt learning, whose virtual tokens enter through the full forward (once per choice).
    Differentiable."""
    from harness.compat import is_prompt_learning, peft_legacy_calls

    device = next(model.parameters()).device
    owner_t = torch.tensor(owners, dtype=torch.long, device=device)
    enc_ids, enc_mask = enc_ids.to(device), enc_mask.to(device)
    dec_in, targets, tmask = decoder_tensors(choices, start, pad_id)
    dec = {"decoder_input_ids": dec_in.to(device), "decoder_attention_mask": tmask.to(device), "use_cache": False}
    if is_prompt_learning(model):
        with peft_legacy_calls():  # peft's prefix tuning passes its prefix as past_key_values=
            logits = model(input_ids=enc_ids.index_select(0, owner_t),
                           attention_mask=enc_mask.index_select(0, owner_t), **dec).logits
    else:
        encoder_outputs = model.get_encoder()(input_ids=enc_ids, attention_mask=enc_mask)
        hidden = encoder_outputs[0].index_select(0, owner_t)  # [R, L, d]: each choice's prompt states
        logits = model(encoder_outputs=(hidden,), attention_mask=enc_mask.index_select(0, owner_t),
                       **dec).logits  # [R, Lc, V]
    tmask = tmask.to(device)
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.to(device).unsqueeze(-1)).squeeze(-1)
    return lp * tmask, tmask.bool()


def choice_logprobs(model, enc_ids, enc_mask, owners, choices, start: int, pad_id: int):
    """Summed log-prob [R] of each choice (:func:`token_logprobs`)."""
    lp, _ = token_logprobs(model, enc_ids, enc_mask, owners, choices, start, pad_id)
    return lp.sum(-1)


def train_choice_logprobs(model, tokenizer, prompts, encode, max_length, overhead):
    """:func:`harness.training.choice_logprobs`'s fields for an encoder-decoder: token_logprobs [B, C, T],
    token_mask [B, C, T], labels [B], work, rows; the same quantities, so L_LM, L_UL and L_LN (T-Few) apply
    unchanged (L_LM = the cross-entropy of the gold choice given the prompt, as T5's ``labels=`` loss)."""
    from harness.errors import HarnessError

    from harness.compat import is_prompt_learning

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    per_choice = is_prompt_learning(model)  # peft's prompt learning re-encodes the prompt for every choice
    contexts, owners, choices, slots = [], [], [], []
    work = Work()
    for b, p in enumerate(prompts):
        if p.label < 0:
            raise HarnessError(f"training example {p.example_id!r} has no label")
        for c, (context, choice) in enumerate(p.pairs()):
            ctx, cont = encode(context, choice)
            if not cont:
                raise HarnessError(f"example {p.example_id!r}: choice {choice!r} encodes to no tokens")
            if max_length is not None and len(ctx) > max_length:
                ctx = ctx[-max_length:]
            new_prompt = not contexts or contexts[-1] != ctx or slots[-1][0] != b
            if new_prompt:
                contexts.append(ctx)
            if new_prompt or per_choice:
                record_work(work, overhead.virtual_tokens + len(ctx), 0, encode=True)
            owners.append(len(contexts) - 1)
            choices.append(cont)
            slots.append((b, c))
            record_work(work, overhead.virtual_tokens + len(ctx), len(cont), encode=False)
    enc_ids, enc_mask = _right_pad(contexts, pad_id)
    lp, mask = token_logprobs(model, enc_ids, enc_mask, owners, choices, start_id(model), pad_id)
    B, C, T = len(prompts), max(len(p.choices) for p in prompts), lp.shape[1]
    bi = torch.tensor([b for b, _ in slots], device=device)
    ci = torch.tensor([c for _, c in slots], device=device)
    token_lp = lp.new_zeros((B, C, T)).index_put((bi, ci), lp)
    token_mask = torch.zeros((B, C, T), dtype=torch.bool, device=device)
    token_mask[bi, ci] = mask
    labels = torch.tensor([p.label for p in prompts], dtype=torch.long, device=device)
    return token_lp, token_mask, labels, work, len(slots)


def record_work(work: Work, n_ctx: int, n_choice: int, encode: bool) -> None:
    """Add to ``work`` the encoding of an ``n_ctx``-token prompt (``encode``) or the decoding of an
    ``n_choice``-token continuation against it (self-attention, cross-attention, logits at every position)."""
    if encode:  # bidirectional: every prompt token attends to all n_ctx
        work.tokens += n_ctx
        work.enc_tokens += n_ctx
        work.full_keys += n_ctx * n_ctx
        return
    work.cross_tokens += n_ctx  # the cross-attention K/V of the prompt's states, once per decoder row
    work.tokens += n_choice  # decoder: causal self-attention plus cross-attention to the prompt
    work.full_keys += n_choice * (n_choice + 1) // 2 + n_choice * n_ctx
    work.logit_positions += n_choice


@torch.no_grad()
def score_seq2seq(model, rows: list[Row], batch_size: int, dims: ModelDims, pad_id: int, progress=False,
                  shared: bool = True) -> tuple[list[list[float]], Work]:
    """Log-prob of every choice of every row: ``shared`` (encoder once per row) or naive (once per choice). Under
    peft's prompt learning the encoder runs once per choice either way (:func:`token_logprobs`): so recorded."""
    from harness.compat import is_prompt_learning

    start = start_id(model)
    per_choice = is_prompt_learning(model)
    work = Work()
    out = [[0.0] * len(r.continuations) for r in rows]
    if shared:
        units = [(i, None) for i in range(len(rows))]
    else:
        units = [(i, j) for i, r in enumerate(rows) for j in range(len(r.continuations))]
    order = sorted(range(len(units)), key=lambda u: -len(rows[units[u][0]].context))
    for at in tqdm(range(0, len(order), batch_size), disable=not progress, desc="seq2seq", leave=False):
        batch = [units[u] for u in order[at:at + batch_size]]
        enc_ids, enc_mask = _right_pad([rows[i].context for i, _ in batch], pad_id)
        owners, choices, slots = [], [], []
        for b, (i, j) in enumerate(batch):
            js = range(len(rows[i].continuations)) if j is None else [j]
            for jj in js:
                c = rows[i].continuations[jj]
                owners.append(b)
                choices.append(c)
                slots.append((i, jj))
                if j is not None or jj == 0 or per_choice:
                    record_work(work, len(rows[i].context), 0, encode=True)
                record_work(work, len(rows[i].context), len(c), encode=False)
        sums = choice_logprobs(model, enc_ids, enc_mask, owners, choices, start, pad_id)
        for (i, jj), s in zip(slots, sums.tolist()):
            out[i][jj] = s
    return out, work
