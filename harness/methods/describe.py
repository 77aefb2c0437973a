"""``harness methods``: one row per method with its family, whether it merges, mixed-task batches, and, with a
model (``--model`` or ``--params``), its trainable parameters (share of the model's), inference FLOPs
overhead per token and per forward call.

Overhead per token (what a deployed, unmerged model adds to each token's forward):
``per_token + 4 x n_heads x head_dim x n_layers x (prefix_keys + virtual_tokens)``: the method's own FLOPs
per token (unmerged LoRA ``2 r (d_in + d_out)`` per adapted layer, IA3 one multiply per scaled element) plus
attending to the extra keys: every token scores and mixes each extra key on every layer (``QK^T`` and ``PV``,
2 FLOPs each per head dimension). Prompt tuning and p-tuning also run their virtual tokens' own forward once
per example (not per token, not in this column; :func:`harness.peft_runner.eval_overhead_flops` counts it).

Overhead per forward call (``FLOPs/call``, ``Overhead.per_forward``): input-independent work the unmerged method
redoes on every forward call, whatever its rows and tokens (DoRA's weight norm, OFT's rotation blocks,
Compacter's PHM weights, p-tuning's prompt encoder); evaluation charges it once per batch of examples.

Trainable parameters: the method applied to a copy of the model with the ``paper`` preset's settings, tensors
counted once; a method module's ``trainable_params(model, cfg)`` formula is used where it has one (FishMask,
whose mask needs training data). A method that cannot apply to the model shows ``n/a (reason)``.
"""

from __future__ import annotations

import copy
import sys
import warnings

from harness.errors import HarnessError

PEFT_TYPE_LINE = ("peft:<type>", "peft", "(peft's)", "", "", "", "", "",
                  "any other peft method by its type name, e.g. peft:loha, with --method-args")


def _trainable(info, model, settings) -> int:
    from harness.methods import apply_method, method_config

    module = sys.modules.get(getattr(info.apply, "__module__", ""), None)
    formula = getattr(module, "trainable_params", None)
    if formula is not None:
        return formula(model, method_config(info.name, settings))
    applied = apply_method(copy.deepcopy(model), info.name, settings)
    return sum(p.numel() for p in {id(p): p for p in applied.parameters() if p.requires_grad}.values())


def overhead_per_token(model, name: str, settings: dict) -> int:
    """Inference FLOPs a method adds per token (module docstring)."""
    return overheads(model, name, settings)[0]


def overheads(model, name: str, settings: dict) -> tuple[int, int]:
    """(inference FLOPs a method adds per token, per forward call) (module docstring)."""
    from harness.costs import ModelDims
    from harness.methods import method_overhead

    dims = ModelDims.from_model(model)
    ov = method_overhead(model, name, settings)
    per_token = ov.per_token + 4 * dims.n_heads * dims.head_dim * dims.n_layers * (ov.prefix_keys + ov.virtual_tokens)
    return per_token, ov.per_forward


def method_rows(model=None) -> list[tuple]:
    """(name, kind, family, trainable, merges, mixed batches, overhead/token, overhead/call, description) per
    method."""
    from harness.methods import list_methods, training_settings
    from harness.report.format import fmt_flops, fmt_params

    total = None
    if model is not None:
        total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    rows = []
    for info in list_methods():
        trainable = overhead = per_call = "-"
        if info.kind != "peft":
            trainable, overhead, per_call = "0", "0", "0"
        elif model is not None:
            settings = training_settings(info.name, "paper")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # peft's "Unsupported layer type" notes while applying
                    n = _trainable(info, model, settings)
                trainable = f"{fmt_params(n)} ({100 * n / total:.3g}%)"
                per_token, per_forward = overheads(model, info.name, settings)
                overhead, per_call = fmt_flops(per_token), fmt_flops(per_forward)
            except HarnessError as exc:
                reason = str(exc).split(": ", 1)[-1].split(";")[0].split(", so ")[0]
                reason = reason if len(reason) <= 48 else reason[:45] + "..."
                trainable = overhead = f"n/a ({reason})"
                per_call = "n/a"
        rows.append((info.name, info.kind, info.family, trainable, "yes" if info.merges else "no",
                     "yes" if info.mixed_batches else "no", overhead, per_call, info.description))
    return rows + [PEFT_TYPE_LINE]


def describe_methods(model=None, model_name: str | None = None) -> str:
    """The ``harness methods`` table (tabulate, plain text)."""
    from tabulate import tabulate

    headers = ("method", "kind", "family", "trainable" + (f" ({model_name})" if model_name else ""), "merges",
               "mixed batches", "FLOPs/token", "FLOPs/call", "description")
    text = tabulate(method_rows(model), headers=headers, tablefmt="simple", disable_numparse=True)
    if model is None:
        text += "\n(trainable parameters and FLOPs/token and FLOPs/call overhead: add --params, or --model NAME)"
    return text
