"""AdaLoRA's per-step rank allocation (peft's ``AdaLoraModel.update_and_allocate``) in a few multi-tensor ops.

peft's ``RankAllocator`` loops in Python over every ``lora_A``/``lora_B``/``lora_E`` tensor with several small ops
each: on SmolLM2-135M (210 adapted linears, 630 tensors) one call dispatches ~10,700 aten ops, each a kernel launch
on a GPU, more than the training step itself. :func:`update_and_allocate` computes the same thing with the
importance state in three flat buffers (``ipt``, ``exp_avg_ipt``, ``exp_avg_unc``; the allocator's dicts of those
names hold views of them, per parameter name, where peft keeps its tensors) and the element scores in a fourth,
laid out by groups of layers of one shape (each ``A`` of the group, then each ``B``, then each ``E``), so that

- ``update_ipt``: ``|p * grad|`` is two ``_foreach`` ops into the buffer, the smoothing of sensitivity and
  uncertainty is elementwise on the flat buffers (peft's ops in peft's order, so the same float32 roundings);
- ``mask_to_budget``: the element scores are one multiply. The row means of ``A`` (``mean(dim=1)``) and column
  means of ``B`` (``mean(dim=0)``) are, on the CPU, one ``mean`` per shape group over stacked views, bit-equal to
  peft's per-tensor means (the CPU sum reduces each row/column alike whatever the number of rows). Elsewhere they
  are one ``mean`` per tensor on views aligned as fresh tensors are, the very reductions peft runs: CUDA picks a
  reduction's block shape from its number of outputs, so a stacked mean could differ from peft's in the last bit
  (on SmolLM2-135M that path is 420 small ``mean`` kernels instead of 8: ~470 ops a call, not 51). The threshold
  is peft's ``kthvalue`` over all triplet scores (its value does not depend on their order); ``E`` is masked
  through one ``cat``, ``masked_fill_`` and ``_foreach_copy_``; ``rank_pattern`` comes from one ``tolist``, in
  peft's key order;
- the final phase (``step > total_step - tfinal``) masks ``E`` with the saved ``rank_pattern`` (adapter name in its
  keys or, after a save, not), its mask built once.

The control flow is peft's (``budget_schedule`` is peft's own method; ``force_mask`` at ``total_step - tfinal``,
then ``reset_ipt``; ``rank_pattern`` set on the adapter's config as peft sets it, so saving and reloading resize
as before). A parameter without a gradient raises ``TypeError`` as peft's ``p * p.grad`` does. Anything outside
this layout (mixed dtypes or devices, a parameter that is not part of an A/B/E triplet, DeepSpeed) falls back to
peft's own method. ``tests/test_adalora_allocator.py`` checks bit equality with peft on the CPU (both mean paths)
over the warmup, budget-decrease and final phases; ``python -m benchmarks.count_ops adalora`` counts the ops. The
CUDA path's equality rests on the argument above: it was not run on a GPU when written.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

FAST_ATTR = "_harness_fast_allocator"  # set on peft's RankAllocator: our layout and flat state


class _Group:
    """Layers whose ``A`` (r x d_in), ``B`` (d_out x r) and ``E`` (r x 1) share shapes."""

    def __init__(self, r: int, d_in: int, d_out: int):
        self.r, self.d_in, self.d_out = r, d_in, d_out
        self.layers: list[tuple] = []  # (A, B, E) as (name, param)


class FastAllocator:
    """The flat layout of one AdaLoRA adapter's tensors and its importance state (see the module docstring).

    ``grouped``: the row/column means of the scores as one ``mean`` per shape group (a few ops; bit-equal to
    peft's per-tensor means on the CPU, whose sum kernel reduces each row/column alike whatever the number of
    rows), else one ``mean`` per tensor on 64-byte-aligned views (each the very reduction peft runs: on CUDA the
    reduction's block shape depends on the number of outputs, so stacked means can differ from peft's in the last
    bit). Default (None): grouped on the CPU, per tensor elsewhere."""

    def __init__(self, tuner, groups: list[_Group], e_order: list[str], tracked_order: list[str],
                 grouped: bool | None = None):
        self.allocator = tuner.rankallocator
        self.tracked_order = tracked_order  # peft's dict order (named_parameters)
        self.groups = groups
        self.layers = [layer for g in groups for layer in g.layers]  # the layout's layer order
        self.names: list[str] = []
        self.params: list[torch.Tensor] = []
        for g in groups:  # per group: every A, then every B, then every E
            for slot in range(3):
                for layer in g.layers:
                    name, p = layer[slot]
                    self.names.append(name)
                    self.params.append(p)
        self.device = self.params[0].device
        self.grouped = self.device.type == "cpu" if grouped is None else grouped
        align = 1 if self.grouped else 16  # per tensor: each view starts where a fresh allocation would (64 B)
        self.offsets: dict[str, int] = {}
        offset = 0
        for name, p in zip(self.names, self.params):
            offset = -(-offset // align) * align
            self.offsets[name] = offset
            offset += p.numel()
        self.numel = offset
        self.segment_sizes = [len(g.layers) * size for g in groups
                              for size in (g.r * g.d_in, g.d_out * g.r, g.r)]  # grouped: contiguous segments
        self.E = [e for _, _, (_, e) in self.layers]
        self.E_sizes = [e.shape[0] for e in self.E]
        e_index, start = {}, 0
        for _, _, (name, e) in self.layers:
            e_index[name] = (start, start + e.shape[0])
            start += e.shape[0]
        self.e_slices = [(name, *e_index[name]) for name in e_order]  # peft's rank_pattern order
        self.state: tuple[dict, dict, dict] | None = None  # the dicts we put on the allocator
        self.flat: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._views: list[torch.Tensor] = []
        self._pattern = self._pattern_copy = self._drop = None

    # ------------------------------------------------------------------ state
    def _bind_state(self) -> None:
        """Flat buffers behind the allocator's ``ipt``/``exp_avg_ipt``/``exp_avg_unc`` dicts (zeros where peft's
        dicts have no entry yet, as peft's lazy ``zeros_like``)."""
        a = self.allocator
        p0 = self.params[0]
        if (self.state is not None and a.ipt is self.state[0] and a.exp_avg_ipt is self.state[1]
                and a.exp_avg_unc is self.state[2]):
            return
        flat = tuple(torch.zeros(self.numel, dtype=p0.dtype, device=p0.device) for _ in range(4))  # + scores
        dicts = ({}, {}, {})
        old = (a.ipt, a.exp_avg_ipt, a.exp_avg_unc)
        for name, p in zip(self.names, self.params):
            start = self.offsets[name]
            for buf, new, prev in zip(flat, dicts, old):
                view = buf[start:start + p.numel()].view(p.shape)
                if name in prev:
                    view.copy_(prev[name])
                new[name] = view
        a.ipt, a.exp_avg_ipt, a.exp_avg_unc = ({n: d[n] for n in self.tracked_order} for d in dicts)
        self.state = (a.ipt, a.exp_avg_ipt, a.exp_avg_unc)
        self.flat = flat
        self._views = [a.ipt[n] for n in self.names]
        score = flat[3]
        self._score_views = [[score[self.offsets[n]:self.offsets[n] + p.numel()].view(p.shape) for n, p in slot]
                             for slot in zip(*self.layers)]  # [A views, B views, E views] in layer order

    def release(self) -> None:
        """Drop the flat state (after peft's ``reset_ipt``, which replaces the dicts)."""
        self.state = self.flat = None
        self._views = self._score_views = []

    # ------------------------------------------------------------------ peft's RankAllocator methods
    @torch.no_grad()
    def update_ipt(self) -> None:
        grads = []
        for name, p in zip(self.names, self.params):
            if p.grad is None:
                raise TypeError(f"adalora: {name} has no gradient (peft's update_ipt computes p * p.grad)")
            grads.append(p.grad)
        self._bind_state()
        ipt, avg, unc, tmp = self.flat  # the scores' buffer serves as scratch here
        b1, b2 = self.allocator.beta1, self.allocator.beta2
        torch._foreach_copy_(self._views, self.params)
        torch._foreach_mul_(self._views, grads)  # p * grad
        ipt.abs_()
        avg.mul_(b1).add_(torch.mul(ipt, 1 - b1, out=tmp))  # beta1 * avg + (1 - beta1) * ipt
        unc.mul_(b2).add_(torch.sub(ipt, avg, out=tmp).abs_().mul_(1 - b2))  # beta2 * unc + (1 - beta2) * |ipt - avg|

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict:
        if not self.allocator.exp_avg_ipt:
            raise KeyError("adalora: no importance scores yet (peft's mask_to_budget needs update_ipt first)")
        self._bind_state()
        _, avg, unc, score = self.flat
        torch.mul(avg, unc, out=score)  # peft's _element_score
        if self.grouped:
            segments = iter(score.split(self.segment_sizes))  # per group: its A, its B, its E
            parts = []
            for g in self.groups:
                n = len(g.layers)
                a = next(segments).view(n * g.r, g.d_in).mean(dim=1)  # mean(A_score, dim=1)
                b = next(segments).view(n, g.d_out, g.r).mean(dim=1).view(-1)  # mean(B_score, dim=0)
                parts.append(next(segments) + (a + b))  # _combine_ipt: E + sum([A, B], dim=1)
        else:  # peft's per-tensor means, on views made once
            A, B, E = self._score_views
            a = torch.cat([s.mean(dim=1) for s in A])
            b = torch.cat([s.mean(dim=0) for s in B])
            parts = [torch.cat(E).view(-1) + (a + b)]
        all_score = parts[0] if len(parts) == 1 else torch.cat(parts)
        threshold = torch.kthvalue(all_score, k=self.allocator.init_bgt - budget)[0].item()
        drop = all_score <= threshold
        self._mask_E(drop)
        keep = (~drop).tolist()
        return {name: keep[start:end] for name, start, end in self.e_slices}

    @torch.no_grad()
    def mask_using_rank_pattern(self, model, rank_pattern: dict) -> None:
        if not (self._pattern is rank_pattern and self._pattern_copy == rank_pattern):
            adapter = self.allocator.adapter_name
            truncated = adapter not in next(iter(rank_pattern.keys()))
            drop = [False] * sum(self.E_sizes)
            for name, start, end in self.e_slices:
                keep = rank_pattern[name.replace(f".{adapter}", "") if truncated else name]
                if len(keep) != end - start:  # not a pattern of this layout: peft says what it makes of it
                    return self.allocator.mask_using_rank_pattern(model, rank_pattern)
                drop[start:end] = [not bool(k) for k in keep]
            self._drop = torch.tensor(drop, dtype=torch.bool, device=self.E[0].device)
            self._pattern, self._pattern_copy = rank_pattern, {k: list(v) for k, v in rank_pattern.items()}
        self._mask_E(self._drop)

    def _mask_E(self, drop: torch.Tensor) -> None:
        """``E.masked_fill_(drop, 0)`` for every ``E`` at once (``drop`` flat, in the layout's ``E`` order)."""
        flat_E = torch.cat(self.E)
        flat_E.masked_fill_(drop.view(-1, 1), 0.0)
        torch._foreach_copy_(self.E, flat_E.split(self.E_sizes))


def _layout(tuner, grouped: bool | None = None) -> FastAllocator | str:
    """The allocator's flat layout, or why there is none (then peft's method runs)."""
    from peft.tuners.adalora.layer import deepspeed_config  # what peft's update_ipt checks

    a = tuner.rankallocator
    adapter = a.adapter_name
    if deepspeed_config() is not None:
        return "DeepSpeed"
    tracked = [(n, p) for n, p in tuner.model.named_parameters() if "lora_" in n and adapter in n]  # update_ipt's
    if not tracked:
        return "no adapter tensors"
    triplets: dict[str, dict] = {}
    e_order = []
    for n, p in tracked:
        hits = [r for r in "ABE" if f"lora_{r}.{adapter}" in n]
        if len(hits) != 1 or p.dim() != 2:
            return f"{n} is not one AdaLoRA A/B/E tensor"
        role = hits[0]
        name_m = n.replace(f"lora_{role}", "%s")
        if role in triplets.setdefault(name_m, {}):
            return f"two {role} tensors for {name_m}"
        triplets[name_m][role] = (n, p)
        if role == "E":
            e_order.append(n)
    p0 = tracked[0][1]
    if any(p.dtype != p0.dtype or p.device != p0.device for _, p in tracked):
        return "mixed dtypes or devices"
    groups: dict[tuple, _Group] = {}
    for name_m, t in triplets.items():
        if set(t) != {"A", "B", "E"}:
            return f"{name_m} lacks one of A, B, E"
        (r, d_in), (d_out, r_b), (r_e, one) = t["A"][1].shape, t["B"][1].shape, t["E"][1].shape
        if not (r == r_b == r_e and one == 1):
            return f"{name_m}: shapes {tuple(t['A'][1].shape)}, {tuple(t['B'][1].shape)}, {tuple(t['E'][1].shape)}"
        groups.setdefault((r, d_in, d_out), _Group(r, d_in, d_out)).layers.append((t["A"], t["B"], t["E"]))
    return FastAllocator(tuner, list(groups.values()), e_order, [n for n, _ in tracked], grouped)


def fast_allocator(tuner, grouped: bool | None = None) -> FastAllocator | None:
    """The cached :class:`FastAllocator` of peft's ``AdaLoraModel`` ``tuner``, None where peft's method must run
    (``grouped``: see :class:`FastAllocator`, used when it is first built)."""
    a = tuner.rankallocator
    fast = getattr(a, FAST_ATTR, None)
    if isinstance(fast, FastAllocator) and fast.params[0].device != fast.device:
        fast = None  # the model moved: a new layout there (its state is copied over from the dicts' views)
    if fast is None:
        fast = _layout(tuner, grouped)
        if isinstance(fast, str):
            log.warning("adalora: peft's own rank allocation runs (%s)", fast)
        setattr(a, FAST_ATTR, fast)
    return None if isinstance(fast, str) else fast


def update_and_allocate(tuner, global_step: int) -> None:
    """``tuner.update_and_allocate(global_step)`` for peft's ``AdaLoraModel`` ``tuner`` (a ``PeftModel``'s
    ``base_model``): the same results in few ops."""
    fast = fast_allocator(tuner)
    if fast is None:
        return tuner.update_and_allocate(global_step)
    config = tuner.peft_config[tuner.trainable_adapter_name]
    allocator = tuner.rankallocator
    end = config.total_step - config.tfinal
    if global_step < end:  # update the importance scores, mask on schedule
        fast.update_ipt()
        budget, mask_ind = allocator.budget_schedule(global_step)
        if mask_ind:
            rank_pattern = fast.mask_to_budget(budget)
            if rank_pattern:
                config.rank_pattern = rank_pattern
    elif global_step == end:  # the final allocation (peft's force_mask), then the state is dropped
        budget, _ = allocator.budget_schedule(global_step)
        config.rank_pattern = fast.mask_to_budget(budget)
        allocator.reset_ipt()
        fast.release()
    elif global_step > end:  # final fine-tuning: keep the final pattern's masked ranks at zero
        fast.mask_using_rank_pattern(tuner.model, config.rank_pattern)
