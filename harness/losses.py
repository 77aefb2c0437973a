"""The T-Few losses and the differentiable choice log-probabilities they are computed from (Liu et al. 2022,
arXiv 2205.05638, sec. 3.2-3.3): ``lm`` L_LM, ``ul`` L_UL, ``ln`` L_LN over ``token_logprobs`` [B, C, T], and
:func:`choice_logprobs`, which scores every answer choice of a batch of prompts with the same tokens as
evaluation. Split out of :mod:`harness.training` (which re-exports these names): the loop there, the packed loop
of :mod:`harness.packed` and FishMask's Fisher pass share them.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F

from harness.compat import is_prompt_learning, peft_legacy_calls
from harness.costs import ModelDims, Work
from harness.errors import HarnessError
from harness.methods.base import Overhead
from harness.scoring import encode_pair

# --------------------------------------------------------------------------------------------- losses
# token_logprobs [B, C, T]: log p of each continuation token of each choice (0 where masked);
# token_mask [B, C, T] bool: real tokens (a choice that does not exist has no tokens); labels [B] long.

def lm_terms(token_logprobs: torch.Tensor, token_mask: torch.Tensor,
             labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L_LM per token: ``-log p`` of the correct choices' tokens and their mask, ([B, T], [B, T]): the loss is
    the first's sum over the second's (a batch: :func:`lm_loss`; per packed group: :mod:`harness.packed_losses`)."""
    rows = torch.arange(labels.shape[0], device=labels.device)
    lp = token_logprobs[rows, labels]  # [B, T]
    m = token_mask[rows, labels].to(lp.dtype)  # [B, T]
    return -(lp * m), m


def lm_loss(token_logprobs: torch.Tensor, token_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_LM: mean negative log-likelihood over every token of the correct choices of the batch."""
    nll, m = lm_terms(token_logprobs, token_mask, labels)
    return nll.sum() / m.sum().clamp(min=1)


def unlikelihood_terms(token_logprobs: torch.Tensor, token_mask: torch.Tensor, labels: torch.Tensor,
                       eps: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """L_UL per token: ``-log(1 - p + eps)`` on the wrong choices' tokens and their mask, ([B, C, T], [B, C, T])."""
    wrong = token_mask.clone()  # [B, C, T]
    wrong[torch.arange(labels.shape[0], device=labels.device), labels] = False
    w = wrong.to(token_logprobs.dtype)
    term = -torch.log((1.0 + eps) - token_logprobs.exp())  # [B, C, T]
    return term * w, w


def unlikelihood_loss(token_logprobs: torch.Tensor, token_mask: torch.Tensor, labels: torch.Tensor,
                      eps: float = 1e-2) -> torch.Tensor:
    """L_UL: ``-log(1 - p(token) + eps)`` averaged over every token of every wrong choice of the batch
    (T-Few's ``eps = 0.01`` keeps the log finite as p -> 1)."""
    terms, w = unlikelihood_terms(token_logprobs, token_mask, labels, eps)
    return terms.sum() / w.sum().clamp(min=1)


def length_normalized_scores(token_logprobs: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """L_LN's logits: each choice's mean token log-prob, [B, C] (-inf for a choice with no token)."""
    m = token_mask.to(token_logprobs.dtype)
    n = m.sum(-1)  # [B, C]
    scores = (token_logprobs * m).sum(-1) / n.clamp(min=1)  # [B, C]
    return scores.masked_fill(n == 0, float("-inf"))


def length_normalized_loss(token_logprobs: torch.Tensor, token_mask: torch.Tensor,
                           labels: torch.Tensor) -> torch.Tensor:
    """L_LN: cross-entropy of ``softmax_c(mean_t log p)`` with the label, averaged over the batch."""
    return F.cross_entropy(length_normalized_scores(token_logprobs, token_mask), labels)


LOSS_FUNCTIONS = {"lm": lm_loss, "ul": unlikelihood_loss, "ln": length_normalized_loss}


# --------------------------------------------------------------------------------------------- scoring

@dataclasses.dataclass
class ChoiceLogprobs:
    token_logprobs: torch.Tensor  # [B, C, T] float32, differentiable
    token_mask: torch.Tensor  # [B, C, T] bool
    labels: torch.Tensor  # [B] long
    work: Work  # tokens processed (virtual tokens included), no padding
    rows: int  # forward rows (one per choice)


def training_forward(model, **kwargs):
    """The model call of every training forward (:func:`choice_logprobs`, and ``benchmarks/train_throughput.py``'s
    synthetic kinds): ``use_cache=False``, so no KV-cache object enters the decoder layers.

    With a cache (transformers' default in training mode too), a compiled block's graph is guarded on its layer's
    cache entry (``cache.layers[i]``): dynamo traces one graph per layer, and past 8 layers the blocks hit its
    recompile limit and run eagerly (issue 14; ``tests/test_compile_recompiles.py``). Without one, every block
    reuses the same graph for every sequence length.
    """
    with peft_legacy_calls(is_prompt_learning(model)):  # peft's prefix tuning passes its prefix as past_key_values=
        return model(**kwargs, use_cache=False)


@contextlib.contextmanager
def _head_on_positions(model, pos: torch.Tensor):
    """While open, the output embedding (LM head) of ``model`` sees only the hidden states at ``pos`` [R, T] of
    each row: its input [R, W, d] becomes [R, T, d] (gathered, differentiable), so the logits are [R, T, V]. What
    the model does after the head (e.g. logit soft-capping) is elementwise and unchanged."""
    head = model.get_output_embeddings()
    if head is None:
        raise HarnessError(f"{type(model).__name__} has no output embedding to score positions with")

    def gather(module, args):
        hidden = args[0]  # [R, W, d]
        index = pos.unsqueeze(-1).expand(*pos.shape, hidden.shape[-1])  # [R, T, d]
        return (hidden.gather(1, index), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def choice_logprobs(model, tokenizer, prompts, *, max_length: int | None = None, right_pad: bool = False,
                    dims: ModelDims | None = None, overhead: Overhead | None = None,
                    encode=None, logit_index: bool = False, causal_only: bool = False,
                    width_multiple: int = 1) -> ChoiceLogprobs:
    """Differentiable per-token log-probabilities of every choice of every prompt given its context.

    One row per (prompt, choice): ``context + continuation`` tokens from :func:`encode_pair` (the pairs of
    :meth:`harness.templates.Prompt.pairs`, so partial scoring trains as it is scored), padded to a batch
    (left-padded with explicit position ids; right-padded when ``right_pad``, for peft prompt learning, which
    drops position ids); logits only from the first position that predicts a continuation token. A context is
    cut from the left when a row exceeds ``max_length``. ``encode(context, choice)`` replaces
    ``encode_pair(tokenizer, context, choice)`` (training passes a memo of it: a few-shot set has few prompts).
    ``logit_index`` (right padding of a model without virtual tokens): logits only at each row's own scored
    positions: a pre-hook on the output embedding gathers those hidden states ``[R, T, d]`` before the head, so the
    logits are ``[R, T, V]`` (:func:`_head_on_positions`). A shared index of every row's positions would give each
    row the union ``[R, U, V]``, quadratic in the rows: 85 GB for a pack of five Gemma 3 groups on cb (V = 262,144;
    docs/benchmarks.md (d), round 7).
    ``causal_only`` (with ``logit_index``): no attention mask; right padding sits after every real token, so causal
    attention alone keeps it out of every scored position (exact), and SDPA may take its unmasked kernels.
    ``width_multiple``: the padded width rounded up to a multiple of it (not past ``max_length``), so that the
    forwards see few distinct shapes (CUDA graphs record one per shape: :func:`harness.compiling.width_multiple`);
    the extra columns are padding like any other, and the counted work stays the rows' own tokens.
    """
    from harness.models import is_seq2seq

    if is_seq2seq(model):  # T5 family (issue 17): the encoder reads the context, the decoder the choice
        from harness.seq2seq import train_choice_logprobs

        encode = encode or (lambda context, choice: encode_pair(tokenizer, context, choice))
        return ChoiceLogprobs(*train_choice_logprobs(model, tokenizer, prompts, encode, max_length,
                                                     overhead or Overhead()))
    if causal_only and not logit_index:
        raise HarnessError("causal_only needs right padding without virtual tokens (logit_index)")
    device = next(model.parameters()).device
    # every host-to-device copy before the forward: a copy from pageable memory synchronizes the stream on CUDA,
    # and after the forward was queued it would hold the host until the forward finished
    batch = encode_rows(tokenizer, prompts, max_length=max_length, right_pad=right_pad, dims=dims,
                        overhead=overhead, encode=encode, logit_index=logit_index,
                        width_multiple=width_multiple).to(device)
    return logprobs_of_rows(model, batch, right_pad=right_pad, logit_index=logit_index, causal_only=causal_only)


@dataclasses.dataclass
class RowBatch:
    """The tensors of one training forward, one row per (prompt, choice) (:func:`encode_rows`); R rows of W
    tokens, T scored positions per row, B prompts of at most C choices."""
    ids: torch.Tensor  # [R, W] long
    mask: torch.Tensor  # [R, W] long, 1 on real tokens
    pos: torch.Tensor  # [R, T] long: positions whose logits are scored (absolute, or columns of the kept tail)
    tgt: torch.Tensor  # [R, T] long: the continuation tokens they predict
    valid: torch.Tensor  # [R, T] bool
    bi: torch.Tensor  # [R] long: prompt of each row
    ci: torch.Tensor  # [R] long: choice of each row
    labels: torch.Tensor  # [B] long
    keep: int  # logits_to_keep (0: every position reaches the head, whose pre-hook gathers ``pos``)
    n_choices: int  # C
    work: Work

    def to(self, device) -> RowBatch:
        tensors = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **tensors)


def encode_rows(tokenizer, prompts, *, max_length: int | None = None, right_pad: bool = False,
                dims: ModelDims | None = None, overhead: Overhead | None = None, encode=None,
                logit_index: bool = False, width_multiple: int = 1, width: int | None = None,
                positions: int | None = None) -> RowBatch:
    """The host tensors of :func:`choice_logprobs`'s forward (its docstring says how rows are built and padded).
    ``width`` / ``positions``: at least this many tokens per row / scored positions per row (padding; a captured
    step needs one shape every step: ``benchmarks/captured_pack.py``)."""
    overhead = overhead or Overhead()
    encode = encode or (lambda context, choice: encode_pair(tokenizer, context, choice))
    windows = dims.windows if dims is not None else ()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = []  # (example, choice, context ids, continuation ids)
    for b, p in enumerate(prompts):
        if p.label < 0:
            raise HarnessError(f"training example {p.example_id!r} has no label")
        for c, (context, choice) in enumerate(p.pairs()):  # partial scoring: a context per choice
            ctx, cont = encode(context, choice)
            if not cont:
                raise HarnessError(f"example {p.example_id!r}: choice {choice!r} encodes to no tokens")
            if max_length is not None and len(ctx) + len(cont) > max_length:
                ctx = ctx[-max(max_length - len(cont), 1):]
            rows.append((b, c, ctx, cont))
    W = max(max(len(ctx) + len(cont) for _, _, ctx, cont in rows), width or 0)
    if width_multiple > 1:
        rounded = -(-W // width_multiple) * width_multiple
        W = max(W, min(rounded, max_length)) if max_length is not None else rounded
    ids_rows, mask_rows = [], []  # [R][W] each, built on the host and copied once
    first = []  # per row: absolute position whose logits predict the first continuation token
    work = Work()
    for _, _, ctx, cont in rows:
        seq = ctx + cont
        pad = W - len(seq)
        off = 0 if right_pad else pad
        ids_rows.append(seq + [pad_id] * pad if right_pad else [pad_id] * pad + seq)
        mask_rows.append([1] * len(seq) + [0] * pad if right_pad else [0] * pad + [1] * len(seq))
        first.append(off + len(ctx) - 1)
        work.add_tokens(overhead.virtual_tokens + len(seq), overhead.prefix_keys, windows)
        work.logit_positions += len(cont)
    T = max(max(len(cont) for *_, cont in rows), positions or 0)
    keep = 0 if logit_index else W - min(first)  # 0: every position reaches the head's pre-hook, which gathers
    pos_rows, tgt_rows, valid_rows = [], [], []  # [R][T] each
    for r, (_, _, _, cont) in enumerate(rows):
        n = len(cont)
        if logit_index:  # absolute positions (padding slots repeat the row's first position; masked below)
            pos_rows.append([first[r] + j for j in range(n)] + [first[r]] * (T - n))
        else:  # columns of the kept tail
            pos_rows.append([first[r] + j - (W - keep) for j in range(n)] + [0] * (T - n))
        tgt_rows.append(cont + [0] * (T - n))
        valid_rows.append([True] * n + [False] * (T - n))
    return RowBatch(ids=torch.tensor(ids_rows, dtype=torch.long), mask=torch.tensor(mask_rows, dtype=torch.long),
                    pos=torch.tensor(pos_rows, dtype=torch.long), tgt=torch.tensor(tgt_rows, dtype=torch.long),
                    valid=torch.tensor(valid_rows, dtype=torch.bool),
                    bi=torch.tensor([b for b, *_ in rows], dtype=torch.long),
                    ci=torch.tensor([c for _, c, *_ in rows], dtype=torch.long),
                    labels=torch.tensor([p.label for p in prompts], dtype=torch.long), keep=keep,
                    n_choices=max(len(p.choices) for p in prompts), work=work)


def logprobs_of_rows(model, batch: RowBatch, *, right_pad: bool = False, logit_index: bool = False,
                     causal_only: bool = False) -> ChoiceLogprobs:
    """The forward of :func:`choice_logprobs` over ``batch`` (on the model's device): no host work, no
    host-device copy, no read, so it can run inside a CUDA graph capture when every tensor is a static buffer."""
    R, T = batch.pos.shape
    keep = batch.keep
    kwargs = {"input_ids": batch.ids, "logits_to_keep": keep}
    if not causal_only:
        kwargs["attention_mask"] = batch.mask
    if not right_pad:
        kwargs["position_ids"] = (batch.mask.cumsum(-1) - 1).clamp(min=0)
    if logit_index:
        with _head_on_positions(model, batch.pos):
            picked = training_forward(model, **kwargs).logits  # [R, T, V]
    else:
        logits = training_forward(model, **kwargs).logits[:, -keep:]  # [R, keep, V]
        picked = logits.gather(1, batch.pos.unsqueeze(-1).expand(R, T, logits.shape[-1]))  # [R, T, V]
    lp = torch.log_softmax(picked.float(), dim=-1).gather(-1, batch.tgt.unsqueeze(-1)).squeeze(-1)  # [R, T]
    lp = lp * batch.valid
    B, C = batch.labels.shape[0], batch.n_choices
    token_logprobs = lp.new_zeros((B, C, T))
    token_mask = torch.zeros((B, C, T), dtype=torch.bool, device=lp.device)
    token_logprobs = token_logprobs.index_put((batch.bi, batch.ci), lp)
    token_mask[batch.bi, batch.ci] = batch.valid
    return ChoiceLogprobs(token_logprobs, token_mask, batch.labels, batch.work, R)
