"""Attention over ONE shared cached prefix plus each row's own keys, merged by log-sum-exp: no per-row prefix copy.

The cached ICL path scores a batch of queries that all follow the same demonstration prefix. Copying the prefix's
keys and values once per row (``batch_repeat_interleave``) costs ``B x`` the prefix cache in memory and bandwidth.
Instead, softmax attention over the concatenation [prefix keys ; own keys] is split exactly:

    part 1: every query of the batch against the prefix K/V, which is stored once (batch 1);
    part 2: each row's queries against its own keys (the query's and continuation's tokens), with the causal and
            padding mask;
    merge:  lse = logaddexp(lse1, lse2);  out = out1 * exp(lse1 - lse) + out2 * exp(lse2 - lse)

which is the same function as attention over the concatenation (up to float rounding). Part 1 needs no mask (every
query sees the whole prefix), so the batch's queries are folded into one long sequence of batch 1, per KV head
(grouped-query attention needs no repeat of K/V): on CUDA in half precision this is one flash-attention call that
also returns the log-sum-exp; on the CPU torch's fused CPU attention kernel, which returns it too; elsewhere (CUDA
in float32, or where a kernel refuses) an explicit computation in chunks. Part 2 is small (own keys only): fused
causal attention where rows carry no mask (flash on CUDA in half precision, the CPU kernel), else explicit in
float32.

Use: :func:`shared_prefix_attention` switches a model to this attention function for a ``with`` block, and each
forward passes ``shared_prefix=SharedPrefix(...)``. Forwards without that argument (the prefix's own encoding)
run transformers' SDPA function unchanged. Only architectures with plain causal full attention qualify
(:func:`supports`): no sliding windows, no logit soft-capping.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

ATTN_NAME = "harness_shared_prefix"
SUPPORTED_TYPES = ("llama", "qwen2", "qwen3", "mistral")
_CHUNK_BYTES = 256 * 2**20  # part 1 without flash: largest float32 score block held at once


@dataclasses.dataclass
class SharedPrefix:
    """Per layer the prefix's keys and values, batch 1: ``keys[i]``, ``values[i]`` are [1, Hkv, P, D].

    ``valid`` [B, Lq] (optional, bool): the query positions that are real tokens of right-padded rows; only those
    attend to the prefix (padding after a row's tokens is never attended to under causal attention, so its
    output does not matter): no work on padding in part 1, the real positions' numbers unchanged (bit-identical,
    each query is computed on its own by the fused kernel)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    valid: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[2]) if self.keys else 0


def supports(model) -> bool:
    """Whether ``model`` is a causal LM whose every layer is plain full attention (see the module docstring)."""
    cfg = model.config
    cfg = getattr(cfg, "text_config", cfg)
    if getattr(cfg, "model_type", None) not in SUPPORTED_TYPES:
        return False
    if getattr(cfg, "attn_logit_softcapping", None):
        return False
    types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in types):
        return False
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return False
    return not model.training


def register() -> None:
    """Register the attention function (and SDPA's boolean mask builder) under :data:`ATTN_NAME`; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if ATTN_NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    AttentionInterface.register(ATTN_NAME, attention_forward)


@contextlib.contextmanager
def shared_prefix_attention(model):
    """Within the block, ``model`` runs :func:`attention_forward`; its attention implementation is restored after."""
    register()
    before = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      shared_prefix: SharedPrefix | None = None, **kwargs):
    """transformers attention function: SDPA without ``shared_prefix``, else the split attention.

    query [B, H, Lq, D]; key, value [B, Hkv, Lk, D] (the rows' own keys, the current tokens last);
    attention_mask: None (causal), boolean [B, 1, Lq, Lk] (True: attend) or additive float.
    Returns ([B, Lq, H, D], None) like transformers' functions.
    """
    if shared_prefix is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if module.training and dropout:
        raise ValueError("shared-prefix attention is for inference only")
    B, H, Lq, D = query.shape
    Hkv = key.shape[1]
    G = H // Hkv
    scale = scaling if scaling is not None else D ** -0.5
    pk, pv = shared_prefix.keys[module.layer_idx], shared_prefix.values[module.layer_idx]  # [1, Hkv, P, D]
    q = query.reshape(B, Hkv, G, Lq, D)
    valid = shared_prefix.valid
    if valid is not None and tuple(valid.shape) == (B, Lq) and not bool(valid.all()):
        out1, lse1 = prefix_part_valid(q, pk, pv, scale, valid)
    else:
        out1, lse1 = prefix_part(q, pk, pv, scale)  # [B, Hkv, G, Lq, D], [B, Hkv, G, Lq] float32
    out2, lse2 = own_part(q, key, value, attention_mask, scale)
    lse = torch.logaddexp(lse1, lse2)  # [B, Hkv, G, Lq]
    out = out1.float() * torch.exp(lse1 - lse).unsqueeze(-1) + out2.float() * torch.exp(lse2 - lse).unsqueeze(-1)
    out = out.to(query.dtype).reshape(B, H, Lq, D).transpose(1, 2).contiguous()  # [B, Lq, H, D]
    return out, None


def last_token_logits(model, queries: list[list[int]], n_prefix: int, pad_id: int, device,
                      shared_prefix: SharedPrefix) -> torch.Tensor:
    """Logits [B, V] after each query's last token, the queries following the shared prefix (inside
    :func:`shared_prefix_attention`). Rows are right-padded: padding after a row's tokens is never seen by them under
    causal attention, so no mask is needed and the own part runs as causal flash attention; the final hidden states
    are gathered at each row's last token and projected. Only after a prefix: without one the scorer keeps left
    padding with a mask (the numbers the run ids stand for in bfloat16; harness/scoring.py)."""
    B, width = len(queries), max(len(q) for q in queries)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    for b, q in enumerate(queries):
        ids[b, :len(q)] = torch.tensor(q, dtype=torch.long)
    pos = (n_prefix + torch.arange(width)).expand(B, width)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if torch.device(device).type == "cpu":  # padding does not attend to the prefix (SharedPrefix.valid: bit-identical
        # numbers on the CPU's fused kernel, tests/test_fastpaths.py)
        valid = torch.arange(width).unsqueeze(0) < torch.tensor([len(q) for q in queries]).unsqueeze(1)  # [B, width]
        shared_prefix = dataclasses.replace(shared_prefix, valid=valid)
    hidden = base.get_decoder()(input_ids=ids.to(device), position_ids=pos.to(device), use_cache=False,
                                shared_prefix=shared_prefix).last_hidden_state  # [B, width, d]
    last = torch.tensor([len(q) - 1 for q in queries], device=device)
    return base.get_output_embeddings()(hidden[torch.arange(B, device=device), last])  # [B, V]


def prefix_part(q: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, scale: float):
    """Queries q [B, Hkv, G, Lq, D] against the shared prefix pk, pv [1, Hkv, P, D] (no mask).

    Returns out [B, Hkv, G, Lq, D] (q's dtype) and lse [B, Hkv, G, Lq] (float32).
    """
    B, Hkv, G, Lq, D = q.shape
    flat = q.permute(1, 0, 2, 3, 4).reshape(1, Hkv, B * G * Lq, D)  # [1, Hkv, N, D], N = B*G*Lq
    out = lse = None
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        try:
            res = torch.ops.aten._scaled_dot_product_flash_attention(flat, pk, pv, 0.0, False, False, scale=scale)
            out, lse = res[0], res[1]  # [1, Hkv, N, D], [1, Hkv, N]
            if tuple(out.shape) != tuple(flat.shape) or tuple(lse.shape) != tuple(flat.shape[:3]):
                out = lse = None
        except (RuntimeError, NotImplementedError):  # no flash kernel for this device/shape: explicit below
            out = lse = None
    elif not q.is_cuda:
        out, lse = _cpu_flash(flat, pk, pv, scale, causal=False)
    if out is None:
        out, lse = _explicit_prefix(flat[0], pk[0], pv[0], scale)
        out, lse = out.unsqueeze(0), lse.unsqueeze(0)
    out = out.reshape(Hkv, B, G, Lq, D).permute(1, 0, 2, 3, 4)
    lse = lse.float().reshape(Hkv, B, G, Lq).permute(1, 0, 2, 3)
    return out, lse


def prefix_part_valid(q: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, scale: float, valid: torch.Tensor):
    """:func:`prefix_part` for the positions ``valid`` [B, Lq] only (the rest: out 0, lse -inf, so that the merge
    takes their own part alone). Returns out [B, Hkv, G, Lq, D], lse [B, Hkv, G, Lq] (float32)."""
    B, Hkv, G, Lq, D = q.shape
    qv = q.permute(1, 0, 3, 2, 4)[:, valid]  # [Hkv, Nv, G, D], Nv = valid positions
    nv = qv.shape[1]
    sub, sub_lse = prefix_part(qv.reshape(Hkv, 1, 1, nv * G, D).transpose(0, 1), pk, pv, scale)  # as batch 1
    out = q.new_zeros((Hkv, B, Lq, G, D))
    lse = torch.full((Hkv, B, Lq, G), float("-inf"), device=q.device)
    out[:, valid] = sub.reshape(Hkv, nv, G, D).to(q.dtype)  # sub [1, Hkv, 1, Nv*G, D]
    lse[:, valid] = sub_lse.reshape(Hkv, nv, G)
    return out.permute(1, 0, 3, 2, 4), lse.permute(1, 0, 3, 2)


def _cpu_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool):
    """torch's fused CPU attention with its log-sum-exp: q [b, h, N, D], k, v [b, h, P, D] -> out [b, h, N, D],
    lse [b, h, N]; (None, None) where the kernel is unavailable (then the explicit computation runs). One pass
    over the keys per block of queries, no float32 score matrix in memory, all threads."""
    try:
        res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None, None
    out, lse = res[0], res[1]
    if tuple(out.shape) != tuple(q.shape) or tuple(lse.shape) != tuple(q.shape[:3]):
        return None, None
    return out, lse


def _explicit_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """q [Hkv, N, D], k, v [Hkv, P, D] -> out [Hkv, N, D], lse [Hkv, N], in chunks of queries."""
    Hkv, N, _ = q.shape
    P = k.shape[1]
    step = max(1, _CHUNK_BYTES // max(1, 4 * Hkv * P))
    outs, lses = [], []
    kt = k.transpose(1, 2)  # [Hkv, D, P]
    for s in range(0, N, step):
        scores = torch.matmul(q[:, s:s + step], kt).float() * scale  # [Hkv, n, P]
        lse = torch.logsumexp(scores, dim=-1)  # [Hkv, n]
        probs = torch.exp(scores - lse.unsqueeze(-1))
        outs.append(torch.matmul(probs.to(v.dtype), v))  # [Hkv, n, D]
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)


def own_part(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, scale: float):
    """Queries q [B, Hkv, G, Lq, D] against their own rows' keys [B, Hkv, Lk, D] under the causal/padding mask.

    Returns out [B, Hkv, G, Lq, D] and lse [B, Hkv, G, Lq] (float32; -inf where a query sees no own key).
    Rows are taken in chunks so that the float32 scores stay under a fixed size.
    """
    B, Hkv, G, Lq, D = q.shape
    Lk = key.shape[2]
    if attention_mask is None and Lq == Lk and (not q.is_cuda or q.dtype in (torch.float16, torch.bfloat16)):
        flash = _flash_causal(q, key, value, scale)  # rows without padding: one fused kernel
        if flash is not None:
            return flash
    step = max(1, _CHUNK_BYTES // max(1, 4 * Hkv * G * Lq * Lk))
    outs, lses = [], []
    for s in range(0, B, step):
        mask = attention_mask if attention_mask is None or attention_mask.shape[0] == 1 else attention_mask[s:s + step]
        out, lse = _own_rows(q[s:s + step], key[s:s + step], value[s:s + step], mask, scale)
        outs.append(out)
        lses.append(lse)
    return (outs[0], lses[0]) if len(outs) == 1 else (torch.cat(outs), torch.cat(lses))


def _flash_causal(q, key, value, scale: float):
    """Causal flash attention of q [B, Hkv, G, L, D] over its own K/V [B, Hkv, L, D] (heads repeated), with the
    log-sum-exp; None where the kernel is unavailable."""
    B, Hkv, G, L, D = q.shape
    k = key[:, :, None].expand(B, Hkv, G, L, D).reshape(B, Hkv * G, L, D)
    v = value[:, :, None].expand(B, Hkv, G, L, D).reshape(B, Hkv * G, L, D)
    if not q.is_cuda:
        out, lse = _cpu_flash(q.reshape(B, Hkv * G, L, D), k, v, scale, causal=True)
        if out is None:
            return None
        return out.reshape(B, Hkv, G, L, D), lse.float().reshape(B, Hkv, G, L)
    try:
        res = torch.ops.aten._scaled_dot_product_flash_attention(q.reshape(B, Hkv * G, L, D), k, v, 0.0, True,
                                                                 False, scale=scale)
    except (RuntimeError, NotImplementedError):
        return None
    out, lse = res[0], res[1]  # [B, H, L, D], [B, H, L]
    if tuple(out.shape) != (B, Hkv * G, L, D) or tuple(lse.shape) != (B, Hkv * G, L):
        return None
    return out.reshape(B, Hkv, G, L, D), lse.float().reshape(B, Hkv, G, L)


def _own_rows(q, key, value, attention_mask, scale: float):
    b, Hkv, G, Lq, D = q.shape
    Lk = key.shape[2]
    scores = torch.matmul(q.reshape(b, Hkv, G * Lq, D), key.transpose(-1, -2)).float() * scale  # [b, Hkv, G*Lq, Lk]
    scores = scores.view(b, Hkv, G, Lq, Lk)
    if attention_mask is None:  # plain causal, the queries being the last Lq of the keys
        rows = torch.arange(Lq, device=q.device).unsqueeze(1) + (Lk - Lq)
        allowed = torch.arange(Lk, device=q.device).unsqueeze(0) <= rows  # [Lq, Lk]
        scores = scores.masked_fill(~allowed, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[:, :, None, -Lq:, -Lk:], float("-inf"))  # [b, 1, 1, Lq, Lk]
    else:
        scores = scores + attention_mask[:, :, None, -Lq:, -Lk:].float()
    lse = torch.logsumexp(scores, dim=-1)  # [b, Hkv, G, Lq]
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - safe.unsqueeze(-1))  # rows with no visible key: all zeros
    out = torch.matmul(probs.to(value.dtype), value.unsqueeze(2))  # [b, Hkv, G, Lq, D]
    return out, lse
