"""The T-Few losses of a packed micro-batch (:mod:`harness.packed`), every group's at once.

:mod:`harness.losses` computes ``lm``, ``ul`` and ``ln`` over one batch (token means over all of the batch's
tokens, L_LN's mean over its prompts). A packed forward holds the micro-batches of G groups; each group's losses
must be those of its rows alone. Slicing the batch per group and calling the loss functions G times costs about
50 ops per group (and as many in the backward): the one part of a packed step whose op count grows with the
pack (``benchmarks/packed_training.py --count-ops``). :func:`group_losses` takes the per-token terms of
:mod:`harness.losses` (the one definition of each loss), sums them per row once and reduces them per group with
``index_add`` (segment sums), so the loss's op count does not depend on G.

The sums are the same numbers added in another order (per row, then per group, instead of over the group's
[b, T] block at once): equal to the separate losses within float32 rounding (``tests/test_packed_training.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from harness.losses import length_normalized_scores, lm_terms, unlikelihood_terms


def _per_group(values: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """values [B] summed per group: [G] (groups [B] long in 0..G-1)."""
    return values.new_zeros(n_groups).index_add_(0, groups, values)


def group_losses(names, token_logprobs: torch.Tensor, token_mask: torch.Tensor, labels: torch.Tensor,
                 groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Per loss name and group, the loss of that group's prompts alone: [len(names), G].

    token_logprobs [B, C, T], token_mask [B, C, T] bool, labels [B] long (as :class:`harness.losses.ChoiceLogprobs`);
    groups [B] long: the group (0..G-1) of each prompt. Each entry equals ``LOSS_FUNCTIONS[name]`` on the group's
    rows: ``lm`` and ``ul`` are token means over the group's tokens, ``ln`` the mean over its prompts."""
    out = []
    for name in names:
        if name in ("lm", "ul"):  # token means: per-token terms summed per prompt, then per group
            terms, weights = (lm_terms if name == "lm" else unlikelihood_terms)(token_logprobs, token_mask, labels)
            num = _per_group(terms.flatten(1).sum(-1), groups, n_groups)  # [G]
            den = _per_group(weights.flatten(1).sum(-1), groups, n_groups)  # [G]
            out.append(num / den.clamp(min=1))
        elif name == "ln":  # cross-entropy of the length-normalized scores, mean over the group's prompts
            ce = F.cross_entropy(length_normalized_scores(token_logprobs, token_mask), labels, reduction="none")  # [B]
            count = _per_group(torch.ones_like(ce), groups, n_groups)  # [G]
            out.append(_per_group(ce, groups, n_groups) / count.clamp(min=1))
        else:
            raise HarnessError(f"packed training has no per-group {name!r} loss (lm, ul, ln)")
    return torch.stack(out)  # [n_losses, G]
