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
