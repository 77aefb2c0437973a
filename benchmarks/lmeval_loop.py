"""A per-request log-likelihood loop in the style of lm-evaluation-harness (``HFLM._loglikelihood_tokens``).

The baseline the harness's cached path is measured against. As lm-evaluation-harness (v0.4) does with
``--batch_size N`` for a causal model: every (context, continuation) request is tokenized on its own (the same
split as :func:`harness.scoring.encode_pair`), scored as its own sequence ``(context + continuation)[:-1]``,
requests are sorted longest first, batched N at a time and right-padded with zeros (no attention mask: causal
attention keeps padding after the tokens out), the model returns logits at every position, ``log_softmax`` runs
over the whole vocabulary at every position in the model's dtype, and each request's continuation log-probs are
gathered and summed on the host one request at a time. lm-evaluation-harness's optional one-token-continuation
logits cache (which would share one forward between the choices of a prompt) is not reproduced: the issue asks
for each pair as its own sequence.

Encoder-decoder models (T5 family) go through :func:`seq2seq_loglikelihoods`, as lm-evaluation-harness's ``hf``
backend runs ``AutoModelForSeq2SeqLM``: every request's context is its own encoder row (right-padded with zeros,
with an attention mask), the continuation its decoder labels (right-padded with zeros; the model shifts them
right behind the decoder start token), so the prompt is encoded once per choice; logits and ``log_softmax`` over
the whole vocabulary at every decoder position. Tokens are the harness's rows (no end-of-sequence token after the
context, as :mod:`harness.seq2seq` scores), so the log-probs are comparable with the harness's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from harness.scoring import encode_pair
from harness.tasks import Prompt


@torch.no_grad()
def loglikelihoods(model, tokenizer, prompts: Sequence[Prompt], prefix: str, batch_size: int = 8,
                   max_length: int | None = None) -> list[list[float]]:
    """Summed log-probability of every choice of every prompt (with ``prefix`` before each context)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return seq2seq_loglikelihoods(model, tokenizer, prompts, prefix, batch_size)
    device = next(model.parameters()).device
    if max_length is None:
        max_length = int(getattr(model.config, "max_position_embeddings", 2048))
    requests = []  # (prompt index, choice index, context ids, continuation ids)
    for i, p in enumerate(prompts):
        for j, choice in enumerate(p.choices):
            ctx, cont = encode_pair(tokenizer, prefix + p.context, choice)
            requests.append((i, j, ctx, cont))
    requests.sort(key=lambda r: (-len(r[2] + r[3]), tuple(r[2] + r[3])))
    out = [[0.0] * len(p.choices) for p in prompts]
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        inps = [torch.tensor((ctx + cont)[-(max_length + 1):][:-1], dtype=torch.long, device=device)
                for _, _, ctx, cont in chunk]
        width = max(len(x) for x in inps)
        batch = torch.stack([F.pad(x, (0, width - len(x)), value=0) for x in inps])  # [B, width], right-padded
        multi_logits = F.log_softmax(model(batch).logits, dim=-1)  # [B, width, V], model dtype
        for (i, j, _, cont), logits, inp in zip(chunk, multi_logits, inps):
            n = len(cont)
            sel = logits[len(inp) - n:len(inp)].unsqueeze(0)  # [1, n, V]
            cont_t = torch.tensor(cont, dtype=torch.long, device=device).unsqueeze(0)
            _greedy = bool((sel.argmax(dim=-1) == cont_t).all())  # lm-eval computes it; kept for equal work
            out[i][j] = float(torch.gather(sel, 2, cont_t.unsqueeze(-1)).squeeze(-1).sum())
    return out


@torch.no_grad()
def seq2seq_loglikelihoods(model, tokenizer, prompts: Sequence[Prompt], prefix: str,
                           batch_size: int = 8) -> list[list[float]]:
    """:func:`loglikelihoods` for an encoder-decoder: the prompt re-encoded for every choice (module docstring)."""
    from harness.tokenization import _tokenize

    device = next(model.parameters()).device
    requests = []  # (prompt index, choice index, context ids, continuation ids)
    rows, owners = _tokenize(tokenizer, prompts, prefix)  # partial scoring: one row per choice
    seen = [0] * len(prompts)
    for i, row in zip(owners, rows):
        for cont in row.continuations:
            requests.append((i, seen[i], row.context, cont))
            seen[i] += 1
    requests.sort(key=lambda r: (-len(r[2]), tuple(r[2])))
    out = [[0.0] * len(p.choices) for p in prompts]
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        width = max(len(ctx) for _, _, ctx, _ in chunk)
        n_cont = max(len(cont) for _, _, _, cont in chunk)
        inps = torch.zeros((len(chunk), width), dtype=torch.long)  # [B, width], right-padded
        mask = torch.zeros_like(inps)
        labels = torch.zeros((len(chunk), n_cont), dtype=torch.long)  # [B, n_cont], right-padded
        for b, (_, _, ctx, cont) in enumerate(chunk):
            inps[b, :len(ctx)] = torch.tensor(ctx)
            mask[b, :len(ctx)] = 1
            labels[b, :len(cont)] = torch.tensor(cont)
        logits = model(input_ids=inps.to(device), attention_mask=mask.to(device), labels=labels.to(device)).logits
        multi_logits = F.log_softmax(logits, dim=-1)  # [B, n_cont, V], model dtype
        for (i, j, _, cont), lp in zip(chunk, multi_logits):
            sel = lp[:len(cont)].unsqueeze(0)  # [1, n, V]
            cont_t = torch.tensor(cont, dtype=torch.long, device=device).unsqueeze(0)
            _greedy = bool((sel.argmax(dim=-1) == cont_t).all())  # lm-eval computes it; kept for equal work
            out[i][j] = float(torch.gather(sel, 2, cont_t.unsqueeze(-1)).squeeze(-1).sum())
    return out
