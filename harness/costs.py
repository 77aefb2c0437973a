"""Cost figures as pure functions: FLOPs from model dimensions and counted work; memory; checkpoint bytes.

Definitions (also in docs/metrics.md):

- ``N_body``: parameters touched per token except the embedding lookup and the output projection
  (attention and MLP weights, norms). ``d``: hidden size; ``V``: vocabulary size.
- A forward pass over one token costs ``2 * N_body`` FLOPs for the weight matrices, plus attention:
  ``4 * n_heads * head_dim * keys`` per layer (``QK^T`` and ``AV``, multiply-add = 2 FLOPs), where ``keys`` is the
  number of positions the token actually attends to: a causal token at position t attends to t + 1 keys (we count
  the causal triangle exactly, not halved-on-average), capped at the sliding window on sliding-window layers.
- The output projection costs ``2 * d * V`` per position whose logits are computed. Our scorer computes logits
  only where a log-probability is needed, so this term follows the positions actually projected.
- Training (per processed token): the forward as above; the backward for activation gradients, which is one more
  matmul per weight matmul (``2 N`` per token, output projection at its projected positions) and two per attention
  matmul (``dQ, dK`` and ``dV, dP``: twice the forward attention); and ``2 * trainable`` for weight gradients.
  Full fine-tuning therefore costs ``6 N`` per token plus attention. The weight gradient of an input embedding
  is a scatter (0 FLOPs); that of a trainable output projection is paid only at projected positions. We count the
  whole activation-gradient backward, also for adapters whose parameters sit only in late layers (an upper bound).

The scorer and trainer record their work in a :class:`Work` (tokens, attended key positions per layer type,
projected positions); :func:`forward_flops` turns it into FLOPs. Padding is never counted: the figures describe
the computation the method needs, not our batching.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import sys
from pathlib import Path

import torch


def logical_numel(p: torch.Tensor) -> int:
    """Elements a parameter stands for: a bitsandbytes 4-bit weight (``Params4bit``, qlora's base) stores two per
    byte, and its ``quant_state.shape`` is the matrix it holds; any other tensor, ``numel()``."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return math.prod(int(d) for d in shape) if shape is not None else p.numel()


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """The dimensions the FLOPs formulas need."""

    n_layers: int
    d_model: int
    n_heads: int
    head_dim: int
    vocab: int
    body_params: int  # N_body: all parameters minus input embedding and output projection
    windows: tuple[int | None, ...]  # per layer: sliding window size, or None for full attention
    total_params: int
    enc_params: int = 0  # encoder-decoder (T5): the encoder's share of body_params (0: a causal model)
    cross_kv_params: int = 0  # the decoder's cross-attention K/V weights, applied to encoder states

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "ModelDims":
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = base.config
        cfg = getattr(cfg, "text_config", cfg)
        n_layers = cfg.num_hidden_layers
        n_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        emb = weight_source(base.get_input_embeddings())[0]
        out = weight_source(base.get_output_embeddings())[0]
        seen: set[int] = set()
        total = 0
        for p in base.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += logical_numel(p)
        # peft wrappers may add parameters; count the frozen base only via ids of the embedding matrices
        body = total - emb.numel() - (0 if out is emb or out.data_ptr() == emb.data_ptr() else out.numel())
        layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * n_layers
        window = getattr(cfg, "sliding_window", None)
        windows = tuple(window if t == "sliding_attention" and window else None for t in layer_types)
        enc = cross_kv = 0
        if getattr(cfg, "is_encoder_decoder", False) and hasattr(base, "get_encoder"):
            enc = sum(p.numel() for n, p in base.get_encoder().named_parameters() if p.data_ptr() != emb.data_ptr())
            cross_kv = sum(p.numel() for n, p in base.named_parameters()
                           if "EncDecAttention." in n and n.rsplit(".", 2)[-2] in ("k", "v"))
        return cls(n_layers, cfg.hidden_size, n_heads, head_dim, emb.shape[0], body, windows, total, enc, cross_kv)


@dataclasses.dataclass
class Work:
    """Counted work of some forward passes (no padding)."""

    tokens: int = 0  # token positions passed through the body
    full_keys: int = 0  # sum over tokens of attended keys on a full-attention layer
    window_keys: dict[int, int] = dataclasses.field(default_factory=dict)  # window -> sum of min(keys, window)
    logit_positions: int = 0  # positions projected to the vocabulary
    enc_tokens: int = 0  # encoder-decoder: the part of ``tokens`` that went through the encoder
    cross_tokens: int = 0  # encoder-decoder: encoder states projected to cross-attention K/V (per decoder row)

    def add_tokens(self, n_new: int, n_cached: int, windows: tuple[int | None, ...]) -> None:
        """Record ``n_new`` tokens processed causally after ``n_cached`` tokens already in the cache."""
        if n_new <= 0:
            return
        self.tokens += n_new
        # token i (0-based among the new ones) attends to n_cached + i + 1 keys
        self.full_keys += n_new * n_cached + n_new * (n_new + 1) // 2
        for w in {w for w in windows if w}:
            self.window_keys[w] = self.window_keys.get(w, 0) + sum(
                min(n_cached + i + 1, w) for i in range(n_new))

    def add(self, other: "Work") -> None:
        self.tokens += other.tokens
        self.full_keys += other.full_keys
        self.logit_positions += other.logit_positions
        self.enc_tokens += other.enc_tokens
        self.cross_tokens += other.cross_tokens
        for w, v in other.window_keys.items():
            self.window_keys[w] = self.window_keys.get(w, 0) + v


def attention_flops(dims: ModelDims, work: Work) -> int:
    per_key = 4 * dims.n_heads * dims.head_dim
    total = 0
    for w in dims.windows:
        total += per_key * (work.window_keys.get(w, 0) if w else work.full_keys)
    return total


def matmul_flops(dims: ModelDims, work: Work) -> int:
    """FLOPs of the weight matrices: the body at every token, the output projection at projected positions.
    Encoder-decoder (T5): encoder weights x encoder tokens + decoder weights x decoder tokens, the decoder's
    cross-attention K/V weights x the encoder states they project (once per decoder row)."""
    logits = 2 * dims.d_model * dims.vocab * work.logit_positions
    if dims.enc_params:
        dec = dims.body_params - dims.enc_params
        return (2 * dims.enc_params * work.enc_tokens + 2 * (dec - dims.cross_kv_params)
                * (work.tokens - work.enc_tokens) + 2 * dims.cross_kv_params * work.cross_tokens + logits)
    return 2 * dims.body_params * work.tokens + logits


def forward_flops(dims: ModelDims, work: Work) -> int:
    """FLOPs of the forward passes described by ``work``."""
    return matmul_flops(dims, work) + attention_flops(dims, work)


def train_flops(dims: ModelDims, work: Work, trainable_params: int, trainable_input_embedding: int = 0,
                trainable_output_projection: int = 0) -> int:
    """Forward + activation-gradient backward + weight gradients (see the module docstring).

    ``trainable_params`` counts every trainable parameter once; the two optional counts say how many of them are
    the input embedding (weight gradient: a scatter, 0 FLOPs) and the output projection (weight gradient only at
    projected positions). A tied embedding counts as the output projection.
    """
    per_token = trainable_params - trainable_input_embedding - trainable_output_projection
    weight_grads = 2 * per_token * work.tokens + 2 * trainable_output_projection * work.logit_positions
    return 2 * matmul_flops(dims, work) + 3 * attention_flops(dims, work) + weight_grads


def weight_source(module: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the stored weight of ``module``, its trainable tensors).

    A plain weight is its own source, trainable or not. A weight under a ``torch.nn.utils.parametrize``
    parametrization (FishMask's sparse delta, intrinsic SAID's norms) is computed on every access: the stored
    tensor is the parametrization's frozen ``original``, and what trains are the parametrization's own parameters
    (FishMask: one value per masked entry), not the whole matrix the computed weight's ``requires_grad`` suggests.
    """
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, "weight"):
        plist = module.parametrizations["weight"]
        return plist.original, list({id(p): p for p in plist.parameters() if p.requires_grad}.values())
    weight = module.weight
    return weight, [weight] if weight.requires_grad else []


def trainable_vocab_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable input-embedding params, trainable output-projection params); tied weights count as output.

    Parametrized weights (:func:`weight_source`) count their parametrization's trainable tensors: a FishMask
    mask of 1,000 entries in the tied SmolLM2 embedding is 1,000 trainable output-projection parameters, not the
    28M of the matrix."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb, emb_trainable = weight_source(base.get_input_embeddings())
    out, out_trainable = weight_source(base.get_output_embeddings())
    tied = emb is out or emb.data_ptr() == out.data_ptr()
    n_out = sum(p.numel() for p in out_trainable)
    n_in = 0 if tied else sum(p.numel() for p in emb_trainable)
    return n_in, n_out


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA max allocated since the last reset on GPU; the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def directory_bytes(path: str | os.PathLike) -> int:
    """Bytes of all files under ``path`` (or of the file itself)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
