"""The N groups' adapters of a packed training (:mod:`harness.packed`), applied row by row.

How rows get their adapter (:class:`PackedAdapters`): while training, the peft model's own adapter layers are
disabled (they call their base layer alone) and hooks on those base layers apply each row's group's tensors,
gathered per row from the stacked leaves: (IA)3 multiplies the outputs (keys, values) or inputs
(feed-forward) by ``vectors[group[b]]``, as peft's ``IA3Layer.forward`` does; LoRA adds
``scaling * B[group[b]] A[group[b]] x`` as peft's ``lora.Linear.forward`` does (dropout 0, no variant). After
training, :meth:`PackedAdapters.load_group` copies a group's tensors into the peft model, which is then saved and
evaluated exactly as an unpacked run's. LayerNorm tuning recomputes each norm row by row (``torch.func.vmap``
over the rows, each row with its group's copy of the norm's parameters through ``torch.func.functional_call``: the
norm's own code, so any norm class works). Prompt tuning: peft puts its one table's virtual tokens before every
row's embeddings and calls the base model; a pre-hook there puts each row's group's table in their place.
"""

from __future__ import annotations

import contextlib

import torch

from harness.errors import HarnessError


def _adapter_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """(name, layer) of every peft IA3, LoRA or LayerNorm-tuning layer of ``model``, in module order, or a prompt
    tuning model's prompt embedding."""
    from peft.tuners.ia3.layer import IA3Layer
    from peft.tuners.ln_tuning.layer import LNTuningLayer
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.prompt_tuning.model import PromptEmbedding

    kinds = (IA3Layer, LoraLayer, LNTuningLayer, PromptEmbedding)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
    if not layers:
        raise HarnessError("packed training needs a peft IA3, LoRA, LayerNorm-tuning or prompt-tuning model")
    return layers


def group_initial_tensors(base, method: str, settings: dict, seed: int) -> list[torch.Tensor]:
    """The trainable tensors a separate run of ``seed`` starts from: ``torch.manual_seed(seed)`` then
    ``apply_method`` on ``base`` (as :func:`harness.peft_runner.run_peft_group` does), copied, and the peft
    layers taken off ``base`` again."""
    from harness.methods import apply_method

    torch.manual_seed(seed)
    model = apply_method(base, method, settings)
    tensors = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    from harness.compat import is_prompt_learning

    if not is_prompt_learning(model):  # (prompt tuning only wraps ``base``: nothing to take off)
        model.unload()  # the base model's own modules back in place
    return tensors


class PackedAdapters:
    """N groups' trainable tensors for a peft IA3, LoRA, LayerNorm-tuning or prompt-tuning ``model``, applied per
    row by hooks (module docstring).

    ``initial[g]``: group g's starting tensors, in the order of ``model``'s trainable parameters."""

    def __init__(self, model, initial: list[list[torch.Tensor]]):
        self.model = model
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        shapes = [p.shape for p in model.parameters() if p.requires_grad]
        for tensors in initial:
            if [t.shape for t in tensors] != shapes:
                raise HarnessError("packed training: a group's tensors do not match the model's trainable ones")
        # one leaf per trainable tensor: [N, *shape], slice g = group g's tensor
        self.stacked = [torch.nn.Parameter(torch.stack([tensors[i].detach() for tensors in initial]).clone())
                        for i in range(len(shapes))]
        index = {name: i for i, name in enumerate(self.names)}
        self.layers = []  # (layer, kind, [param indices])
        for name, layer in _adapter_layers(model):
            if hasattr(layer, "ia3_l"):
                self.layers.append((layer, "ia3", [index[f"{name}.ia3_l.default"]]))
            elif type(layer).__name__ == "PromptEmbedding":  # prompt tuning: its virtual tokens' embeddings
                self.layers.append((layer, "prompt", [index[f"{name}.embedding.weight"]]))
            elif hasattr(layer, "ln_tuning_layers"):  # its trainable copy of the norm, parameters in module order
                copy_ = layer.ln_tuning_layers["default"]
                self.layers.append((layer, "ln", [index[f"{name}.ln_tuning_layers.default.{n}"]
                                                  for n, _ in copy_.named_parameters()]))
            else:
                if layer.lora_variant or layer.use_dora.get("default"):
                    raise HarnessError("packed training supports plain LoRA only (no DoRA or other variants)")
                self.layers.append((layer, "lora", [index[f"{name}.lora_A.default.weight"],
                                                    index[f"{name}.lora_B.default.weight"]]))
        self._rows: torch.Tensor | None = None  # [R] group of each row, for one forward

    @property
    def n(self) -> int:
        return self.stacked[0].shape[0]

    @property
    def params(self) -> list[list[torch.Tensor]]:
        """Per group, its tensors (views of the stacked leaves), in the order of the model's trainable ones."""
        return [[s[g] for s in self.stacked] for g in range(self.n)]

    def _rows_of(self, x: torch.Tensor) -> torch.Tensor:
        if self._rows is None or self._rows.shape[0] != x.shape[0]:
            raise RuntimeError("PackedAdapters: a forward outside rows() or with another number of rows")
        return self._rows

    def _hook(self, layer, kind: str, indices: list[int]):
        # the hooks close over the stacked leaves themselves, not their indices: dynamo guards a closure's ints by
        # value, so every layer's block would compile its own graph (past 8 layers the recompile limit sent the
        # rest to eager); tensors are guarded by shape and dtype, and the layers of one shape share one graph
        stacks = [self.stacked[i] for i in indices]  # each [N, *shape]
        if kind == "ia3" and layer.is_feedforward:
            def scale_input(module, args):
                x = args[0]  # [R, L, d_in]
                vec = stacks[0].flatten(1)[self._rows_of(x)].unsqueeze(1)  # [R, 1, d_in]
                return ((x.to(vec.dtype) * vec).to(x.dtype), *args[1:])
            return layer.base_layer.register_forward_pre_hook(scale_input)
        if kind == "prompt":  # peft puts one table's prompt before every row's embeddings, then calls the base
            def per_row_prompt(module, args, kwargs):  # model: there the first n positions become the row's group's
                embeds = kwargs["inputs_embeds"]  # [R, n + L, d]
                table = stacks[0]  # [N, n, d]
                prompts = table[self._rows_of(embeds)].to(embeds.dtype)  # [R, n, d], as peft casts its prompts
                return args, {**kwargs, "inputs_embeds": torch.cat((prompts, embeds[:, table.shape[1]:]), dim=1)}
            return self.model.base_model.register_forward_pre_hook(per_row_prompt, with_kwargs=True)
        if kind == "ln":  # the norm recomputed row by row (vmap) with each row's group's copy of its parameters
            norm = layer.ln_tuning_layers["default"]
            names = [n for n, _ in norm.named_parameters()]

            def one_row(x, *params):  # x [L, d]
                return torch.func.functional_call(norm, dict(zip(names, params)), (x.unsqueeze(0),)).squeeze(0)

            def per_row_norm(module, args, out):  # args[0] [R, L, d]; the base norm's output is discarded
                x = args[0]
                rows = self._rows_of(x)
                return torch.func.vmap(one_row)(x, *[stack[rows] for stack in stacks])
            return layer.base_layer.register_forward_hook(per_row_norm)
        if kind == "ia3":
            def scale_output(module, args, out):  # out [R, L, d_out]
                vec = stacks[0].flatten(1)[self._rows_of(out)].unsqueeze(1)  # [R, 1, d_out]
                return (out * vec).to(out.dtype)
            return layer.base_layer.register_forward_hook(scale_output)
        scaling = layer.scaling["default"]

        def low_rank(module, args, out):  # out [R, L, d_out]
            rows = self._rows_of(out)
            a = stacks[0][rows]  # [R, r, d_in]
            b = stacks[1][rows]  # [R, d_out, r]
            x = args[0].to(a.dtype)  # [R, L, d_in]
            delta = torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))  # [R, L, d_out]
            return (out + delta * scaling).to(out.dtype)
        return layer.base_layer.register_forward_hook(low_rank)

    @contextlib.contextmanager
    def attached(self):
        """The peft layers disabled and the per-row hooks on their base layers, for the whole training."""
        handles = []
        try:
            for layer, kind, indices in self.layers:
                if kind != "prompt":  # (the prompt embedding's own output is replaced by the hook)
                    layer.enable_adapters(False)
                handles.append(self._hook(layer, kind, indices))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for layer, kind, _ in self.layers:
                if kind != "prompt":
                    layer.enable_adapters(True)

    @contextlib.contextmanager
    def rows(self, groups: torch.Tensor):
        """One forward whose row r belongs to group ``groups[r]`` ([R] long)."""
        self._rows = groups
        try:
            yield
        finally:
            self._rows = None

    @torch.no_grad()
    def load_group(self, g: int) -> None:
        """Copy group ``g``'s tensors into the peft model's own adapter (to save or evaluate it)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p, stacked in zip(params, self.stacked):
            p.copy_(stacked[g])
