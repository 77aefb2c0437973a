"""Bottleneck adapters written by hand, shared by ``adapter``, ``adapter_pfeiffer``, ``compacter`` and ``mam``.

AdapterHub's ``adapters`` package (1.3.0, the newest) was measured against the harness's environment and does not
import: it pins ``transformers~=4.57.6`` and imports ``HfFolder``, which ``huggingface_hub`` 1.x removed
(``ImportError: cannot import name 'HfFolder' from 'huggingface_hub'``); the harness runs transformers 5.x. So the
adapters are written here:

- :class:`BottleneckArgs`: the config fields every bottleneck method shares (reduction factor, nonlinearity,
  initialisation), validated;
- a bottleneck ``y + up(f(down(y)))`` (Houlsby et al. 2019, arXiv 1902.00751, section 2.1 and figure 2) or,
  for ``compacter``, the same with PHM layers (Karimi Mahabadi et al. 2021, arXiv 2106.04647) in place of
  ``down``/``up``;
- a parallel adapter ``sublayer(x) + s * up(f(down(x)))`` for ``mam`` (He et al. 2022, arXiv 2110.04366);
- :func:`add_adapters`: placement. A transformer layer (:func:`decoder_layers`) is a module with an attention
  child (``self_attn`` in llama/gemma/qwen/mistral, ``attn`` in gpt2) and an ``mlp`` child, or a T5 block (T5, T0,
  Flan-T5, mT5: ``layer[0].SelfAttention`` and ``layer[-1].DenseReluDense``, in the encoder and the decoder; the
  decoder's cross-attention gets no adapter, as in Houlsby's and AdapterHub's default placement); the adapter is
  a child of the layer (``adapter_attn`` / ``adapter_ffn``, so its tensors have stable names for the ``tensors``
  artifact) and is applied by a forward hook on the sublayer, to the sublayer's output before the residual
  addition (Houlsby's position). The base model's own modules are not replaced.

This module imports no torch at import time (the method registry imports it); the torch modules are built on
first use by :func:`_torch_classes`.
"""

from __future__ import annotations

import dataclasses
import functools

from harness.errors import HarnessError
from harness.methods.base import TrainConfig, check, is_int, is_number

NONLINEARITIES = ("relu", "gelu", "silu", "tanh")
ATTENTION_NAMES = ("self_attn", "attn")
PLACES = ("attn", "ffn")


@dataclasses.dataclass
class BottleneckArgs(TrainConfig):
    """Shared bottleneck settings. ``reduction``: bottleneck width ``m = hidden_size // reduction`` (rounded up
    at least 1; Compacter rounds it up to a multiple of ``n``); ``size``: an explicit ``m`` instead; ``nonlinearity``;
    ``init_std``: std of the normal initialisation of the down-projection (Houlsby section 3.6: near-identity,
    weights drawn with std 1e-2); ``zero_up``: the up-projection starts at exactly zero so the adapted model is
    the base model at step 0 (false: std ``init_std`` as in Houlsby, nearly the identity).

    Training defaults: T-Few's adapter configs (r-three/t-few ``configs/adapter.json``, ``compacter_pp.json``):
    lr 3e-3 with the shared Adafactor defaults of :class:`TrainConfig`."""

    reduction: int = 16
    size: int | None = None
    nonlinearity: str = "relu"
    init_std: float = 1e-2
    zero_up: bool = True
    lr: float = 3e-3

    def __post_init__(self):
        super().__post_init__()
        check(is_int(self.reduction) and self.reduction >= 1,
              f"reduction must be a positive integer, got {self.reduction!r}")
        check(self.size is None or (is_int(self.size) and self.size >= 1),
              f"size must be a positive integer or none, got {self.size!r}")
        check(self.nonlinearity in NONLINEARITIES,
              f"nonlinearity must be one of {', '.join(NONLINEARITIES)}, got {self.nonlinearity!r}")
        check(is_number(self.init_std) and self.init_std >= 0, f"init_std must be >= 0, got {self.init_std!r}")
        check(isinstance(self.zero_up, bool), f"zero_up must be true or false, got {self.zero_up!r}")

    def width(self, hidden: int) -> int:
        return self.size if self.size is not None else max(1, hidden // self.reduction)


# ------------------------------------------------------------------------------------------- placement

def decoder_layers(model) -> list:
    """(name, layer, attention sublayer, feed-forward sublayer) of every transformer layer (module docstring)."""
    out = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        attn = next((children[n] for n in ATTENTION_NAMES if n in children), None)
        if attn is not None and "mlp" in children:
            out.append((name, module, attn, children["mlp"]))
            continue
        sub = children.get("layer")  # T5Block: layer = [self-attention, (cross-attention,) feed-forward]
        if sub is not None and len(sub) >= 2 and hasattr(sub[0], "SelfAttention") and hasattr(sub[-1], "DenseReluDense"):
            out.append((name, module, sub[0].SelfAttention, sub[-1].DenseReluDense))
    return out


def projection(attention, name: str):
    """The ``name`` projection (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``) of an attention module: llama-style
    names, or T5's ``q``/``k``/``v``/``o``; None where it has neither."""
    found = getattr(attention, name, None)
    return found if found is not None else getattr(attention, name.removesuffix("_proj"), None)


def hidden_size(model) -> int:
    config = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if is_int(value):
            return value
    raise HarnessError(f"cannot tell the hidden size of {type(model).__name__}")


def count_sites(model, places, method: str) -> int:
    layers = decoder_layers(model)
    if not layers:
        raise HarnessError(f"{method}: no transformer layers found in {type(model).__name__} (expected modules with "
                           "a self_attn/attn child and an mlp child: llama, gemma, qwen, mistral, gpt2-style models; "
                           "or T5 blocks)")
    return len(layers) * len(places)


def site_items(model, places, method: str, per_site: int) -> list[tuple[str, int]]:
    """(layer name, FLOPs per token of its ``places`` adapters at ``per_site`` each) of every layer, for
    :func:`harness.methods.base.per_token_overhead` (an encoder-decoder's layers split by stack)."""
    count_sites(model, places, method)
    return [(name, per_site * len(places)) for name, *_ in decoder_layers(model)]


def add_adapters(model, cfg: BottleneckArgs, places, method: str, phm: int | None = None,
                 parallel: float | None = None, gated: bool = False):
    """Freeze ``model`` and add one trainable adapter at each of ``places`` (``attn``, ``ffn``) of every decoder
    layer; ``phm``: use PHM layers with that ``n`` (Compacter); ``parallel``: a parallel adapter with that scale
    instead (He et al. 2022: ``sublayer(x) + s * up(f(down(x)))`` from the sublayer's input). Returns ``model``."""
    classes = _torch_classes()
    count_sites(model, places, method)
    d = hidden_size(model)
    m = cfg.width(d)
    param = next(model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer, attn, ffn in decoder_layers(model):
        for place in places:
            name = f"adapter_{place}"
            check(not hasattr(layer, name), f"{method}: the model already has adapters (apply a method once)")
            if parallel is not None:
                module = classes["Parallel"](d, m, cfg.nonlinearity, cfg.init_std, cfg.zero_up, parallel)
            elif gated:
                module = classes["GatedBottleneck"](d, m, cfg.nonlinearity, cfg.init_std, cfg.zero_up)
            elif phm:
                module = classes["PHMBottleneck"](d, m, phm, cfg.nonlinearity, cfg.zero_up)
            else:
                module = classes["Bottleneck"](d, m, cfg.nonlinearity, cfg.init_std, cfg.zero_up)
            module.to(device=param.device, dtype=param.dtype)
            layer.add_module(name, module)
            sub = attn if place == "attn" else ffn
            sub.register_forward_hook(functools.partial(_parallel_hook if parallel is not None else _apply_hook,
                                                        module))
    assert all(p.requires_grad for n, p in model.named_parameters() if ".adapter_" in n)
    return model


def add_gated_lora(model, targets, r: int, alpha: float, method: str):
    """A gated LoRA (trainable) beside each ``targets`` projection (``q_proj``/``v_proj`` Linears, T5's ``q``/``v``)
    of every layer's self-attention, applied by a forward hook on the projection; the base stays as it is."""
    classes = _torch_classes()
    param = next(model.parameters())
    for _, layer, attn, _ in decoder_layers(model):
        for t in targets:
            proj = projection(attn, t)
            check(proj is not None and type(proj).__name__ == "Linear",
                  f"{method}: no Linear {t} in {type(attn).__name__} (gated LoRA needs q_proj/v_proj or T5's q/v "
                  "Linears, not gpt2's fused c_attn)")
            module = classes["GatedLora"](proj.in_features, proj.out_features, r, alpha)
            module.to(device=param.device, dtype=param.dtype)
            layer.add_module(f"adapter_lora_{t}", module)
            proj.register_forward_hook(functools.partial(_lora_hook, module))
    return model


def _lora_hook(lora, _module, args, output):
    return output + lora(args[0])


def _apply_hook(adapter, _module, _args, output):
    if isinstance(output, tuple):
        return (adapter(output[0]),) + tuple(output[1:])
    return adapter(output)


def _parallel_hook(adapter, _module, args, output):
    x = args[0]
    if isinstance(output, tuple):
        return (output[0] + adapter(x),) + tuple(output[1:])
    return output + adapter(x)


def bottleneck_params(d: int, m: int) -> int:
    """Parameters of one bottleneck: down (d*m + m) and up (m*d + d)."""
    return 2 * d * m + m + d


def phm_params(d_in: int, d_out: int, n: int, rank: int = 1) -> int:
    """Parameters of one factorized PHM layer: rule n^3, W_left n*(d_in/n)*rank, W_right n*rank*(d_out/n), bias."""
    return n ** 3 + d_in * rank + d_out * rank + d_out


# ------------------------------------------------------------------------------------------- torch modules

@functools.cache
def _torch_classes() -> dict:
    import torch
    from torch import nn

    acts = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}

    class Bottleneck(nn.Module):
        """``y + up(f(down(y)))``: Houlsby's adapter, with its internal skip connection."""

        def __init__(self, d, m, nonlinearity, init_std, zero_up):
            super().__init__()
            self.down = nn.Linear(d, m)
            self.act = acts[nonlinearity]()
            self.up = nn.Linear(m, d)
            with torch.no_grad():
                nn.init.trunc_normal_(self.down.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
                self.down.bias.zero_()
                if zero_up:
                    self.up.weight.zero_()
                else:
                    nn.init.trunc_normal_(self.up.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
                self.up.bias.zero_()

        def forward(self, y):
            return y + self.up(self.act(self.down(y)))

    class Parallel(Bottleneck):
        """``s * up(f(down(x)))``, added to the sublayer's output by the hook (He et al. 2022's parallel adapter)."""

        def __init__(self, d, m, nonlinearity, init_std, zero_up, scale):
            super().__init__(d, m, nonlinearity, init_std, zero_up)
            self.scale = scale

        def forward(self, x):
            return self.scale * self.up(self.act(self.down(x)))

    class GatedBottleneck(Bottleneck):
        """``y + sigmoid(gate(y)) * up(f(down(y)))`` (UniPELT's gated adapter, Mao et al. 2022 section 3)."""

        def __init__(self, d, m, nonlinearity, init_std, zero_up):
            super().__init__(d, m, nonlinearity, init_std, zero_up)
            self.gate = nn.Linear(d, 1)

        def forward(self, y):
            return y + torch.sigmoid(self.gate(y)) * self.up(self.act(self.down(y)))

    class GatedLora(nn.Module):
        """``sigmoid(gate(x)) * (alpha/r) * B(A(x))``, added to a projection's output (UniPELT's gated LoRA); B starts
        at zero."""

        def __init__(self, d_in, d_out, r, alpha):
            super().__init__()
            self.A = nn.Linear(d_in, r, bias=False)
            self.B = nn.Linear(r, d_out, bias=False)
            self.gate = nn.Linear(d_in, 1)
            self.scaling = alpha / r
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.A.weight, a=5 ** 0.5)  # peft's LoRA init
                self.B.weight.zero_()

        def forward(self, x):
            return torch.sigmoid(self.gate(x)) * self.scaling * self.B(self.A(x))

    class PHMLinear(nn.Module):
        """``x @ H + b`` with ``H = sum_i kron(A_i, W_left_i @ W_right_i)`` (Compacter's factorized PHM layer, rank
        1): A (the "rule") is n x n x n, W_left n x d_in/n x 1, W_right n x 1 x d_out/n."""

        def __init__(self, d_in, d_out, n, zero):
            super().__init__()
            self.n = n
            self.rule = nn.Parameter(torch.empty(n, n, n).normal_(std=0.02))  # T-Few's c_init=normal
            left = torch.empty(n, d_in // n, 1)
            right = torch.empty(n, 1, d_out // n)
            for i in range(n):  # glorot-uniform (T-Few's compacter_hypercomplex_nonlinearity)
                nn.init.xavier_uniform_(left[i], gain=2 ** 0.5)
                nn.init.xavier_uniform_(right[i], gain=2 ** 0.5)
            if zero:
                right.zero_()
            self.left, self.right = nn.Parameter(left), nn.Parameter(right)
            self.bias = nn.Parameter(torch.zeros(d_out))

        def weight(self):
            w = torch.bmm(self.left, self.right)  # n x d_in/n x d_out/n
            h = torch.einsum("iab,icd->iacbd", self.rule, w)
            n, a, c, b, d = h.shape
            return h.reshape(n, a * c, b * d).sum(0)

        def forward(self, x):
            return x @ self.weight() + self.bias

    class PHMBottleneck(nn.Module):
        def __init__(self, d, m, n, nonlinearity, zero_up):
            super().__init__()
            self.down = PHMLinear(d, m, n, zero=False)
            self.act = acts[nonlinearity]()
            self.up = PHMLinear(m, d, n, zero=zero_up)

        def forward(self, y):
            return y + self.up(self.act(self.down(y)))

    return {"Bottleneck": Bottleneck, "Parallel": Parallel, "GatedBottleneck": GatedBottleneck, "GatedLora": GatedLora, "PHMLinear": PHMLinear, "PHMBottleneck": PHMBottleneck}
