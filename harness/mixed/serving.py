"""How one forward's rows get their own task's trained parameters: a :class:`Serving` per method.

Every serving holds one model and N tasks (numbered 0..N-1, the order of the adapter folders it was loaded from);
:meth:`Serving.select` wraps one forward whose row ``b`` belongs to task ``tasks[b]`` and yields the extra keyword
arguments of that forward.

- :class:`Serving` (plain): nothing per row (in-context learning: a task differs only by its demonstrations, which
  :mod:`harness.mixed.scorer` caches per task; also one adapter loaded alone, or merged weights);
- :class:`LoraServing`: every task's LoRA adapter loaded into one ``PeftModel``; peft's own mixed-batch inference
  (``adapter_names=[...]``, one name per row: each adapted layer runs ``B A x`` per sub-batch of rows of one
  adapter; peft >= 0.12, checked here with the installed 0.21);
- :class:`IA3Serving`: peft has no mixed batches for (IA)3, so ours: each target module's vectors of all tasks
  stacked into one [N, d] tensor, and a forward hook (keys, values: output scaled) or pre-hook (feed-forward:
  input scaled) multiplies row b by ``vectors[tasks[b]]`` exactly as peft's ``IA3Layer.forward`` does for one
  adapter (in the vectors' dtype, cast back);
- prompt tuning: a plain serving with ``soft_prompts`` (per task [n_virtual, d]): the scorer encodes each task's
  soft prompt once into that task's prefix cache, so every row attends to its own task's virtual tokens.

Adapters are the folders ``harness run`` saved (peft's ``adapter_model.safetensors`` + ``adapter_config.json``).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from harness.errors import HarnessError

ADAPTER_FILE = "adapter_model.safetensors"
MIXABLE = ("LORA", "IA3", "PROMPT_TUNING")  # peft types that can share a batch (plus in-context learning)


def peft_type(folder: str | Path) -> str:
    """The ``peft_type`` of a saved adapter folder (``LORA``, ``IA3``, ``PROMPT_TUNING``, ...)."""
    path = Path(folder) / "adapter_config.json"
    try:
        return str(json.loads(path.read_text())["peft_type"])
    except (OSError, ValueError, KeyError) as exc:
        raise HarnessError(f"{folder}: not a saved peft adapter ({type(exc).__name__}: {exc})") from exc


def adapter_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_FILE
    if not path.exists():
        raise HarnessError(f"no {ADAPTER_FILE} in {folder}; rerun the training run")
    return load_file(str(path))


class Serving:
    """A model serving rows of ``n_tasks`` tasks; the base class changes nothing per row."""

    kind = "plain"

    def __init__(self, model, n_tasks: int, soft_prompts: list[torch.Tensor] | None = None):
        self.model = model
        self.n_tasks = n_tasks
        self.soft_prompts = soft_prompts  # per task [n_virtual, d] or None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def soft_prompt(self, task: int) -> torch.Tensor | None:
        """Task ``task``'s virtual-token embeddings [n_virtual, d] (prompt tuning), else None."""
        return None if self.soft_prompts is None else self.soft_prompts[task]

    @contextlib.contextmanager
    def select(self, tasks: torch.Tensor):
        """One forward whose row b belongs to task ``tasks[b]`` (tasks [B], long); yields its extra kwargs."""
        yield {}

    def state_bytes(self) -> int:
        """Bytes of the per-task tensors this serving keeps (adapters, soft prompts), base weights excluded."""
        return sum(t.numel() * t.element_size() for t in self.soft_prompts or ())


class LoraServing(Serving):
    """All tasks' LoRA adapters in one ``PeftModel`` (adapter ``task{i}`` = task i), mixed through peft."""

    kind = "lora"

    @contextlib.contextmanager
    def select(self, tasks: torch.Tensor):
        yield {"adapter_names": [f"task{t}" for t in tasks.tolist()]}

    def state_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for n, p in self.model.named_parameters() if "lora_" in n)


class IA3Serving(Serving):
    """(IA)3 vectors of all tasks stacked per module, gathered per row by hooks on the base model's modules."""

    kind = "ia3"

    def __init__(self, model, vectors: dict[str, tuple[torch.Tensor, bool]]):
        """``vectors``: module name in ``model`` -> (stacked [N, d] vectors, whether its input is scaled)."""
        n = {v.shape[0] for v, _ in vectors.values()}
        if len(n) != 1:
            raise HarnessError("ia3: every module needs the vectors of every task")
        super().__init__(model, n.pop())
        self.vectors = vectors
        self._rows: torch.Tensor | None = None  # [B] task per row, set by select() for one forward
        self._handles = []
        modules = dict(model.named_modules())
        for name, (vec, is_ff) in vectors.items():
            if name not in modules:
                raise HarnessError(f"ia3: the adapter scales {name!r}, which the model does not have")
            if is_ff:
                self._handles.append(modules[name].register_forward_pre_hook(self._scale_input(vec)))
            else:
                self._handles.append(modules[name].register_forward_hook(self._scale_output(vec)))

    def _gather(self, vec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self._rows is None:
            raise RuntimeError("IA3Serving: forward outside select()")
        if self._rows.shape[0] != x.shape[0]:
            raise RuntimeError(f"IA3Serving: {self._rows.shape[0]} row tasks for a batch of {x.shape[0]}")
        return vec[self._rows].unsqueeze(1)  # [B, 1, d]

    def _scale_input(self, vec):
        def hook(module, args):
            x = args[0]  # [B, L, d_in]
            return ((x.to(vec.dtype) * self._gather(vec, x)).to(x.dtype), *args[1:])
        return hook

    def _scale_output(self, vec):
        def hook(module, args, out):  # out [B, L, d_out]
            return (out * self._gather(vec, out)).to(out.dtype)
        return hook

    @contextlib.contextmanager
    def select(self, tasks: torch.Tensor):
        self._rows = tasks.to(self.device)
        try:
            yield {}
        finally:
            self._rows = None

    def remove(self) -> None:
        """Take the hooks off the model (it is the plain base model again)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v, _ in self.vectors.values())


# --------------------------------------------------------------------------------------------- loading

def _peft_from_pretrained(base, folder, name: str):
    from peft import PeftModel

    from harness.compat import peft_legacy_calls

    with peft_legacy_calls():
        return PeftModel.from_pretrained(base, str(folder), adapter_name=name)


def load_lora(base, folders: list[str | Path]) -> LoraServing:
    """Every folder's LoRA adapter onto ``base`` (modified in place: peft wraps its layers)."""
    model = _peft_from_pretrained(base, folders[0], "task0")
    for i, folder in enumerate(folders[1:], start=1):
        model.load_adapter(str(folder), adapter_name=f"task{i}")
    model.eval()
    return LoraServing(model, len(folders))


def _ia3_module(key: str) -> str:
    """``base_model.model.model.layers.0.self_attn.k_proj.ia3_l`` -> ``model.layers.0.self_attn.k_proj``."""
    name = key.removeprefix("base_model.model.")
    return name.rsplit(".ia3_l", 1)[0]


def load_ia3(base, folders: list[str | Path]) -> IA3Serving:
    """Stack every folder's (IA)3 vectors: peft saves a feed-forward module's as [1, d_in] (input scaled) and the
    others' as [d_out, 1] (output scaled); ``base`` gets hooks (remove them with :meth:`IA3Serving.remove`)."""
    states = [adapter_tensors(f) for f in folders]
    keys = sorted(states[0])
    for folder, state in zip(folders, states):
        if sorted(state) != keys:
            raise HarnessError(f"ia3: {folder} scales other modules than {folders[0]}; mixed batches need one "
                               "set of target modules")
    device = next(base.parameters()).device
    vectors = {}
    for key in keys:
        shape = tuple(states[0][key].shape)
        is_ff = shape[0] == 1 and len(shape) == 2
        stacked = torch.stack([s[key].flatten() for s in states])  # [N, d]
        # float32, as peft keeps adapter weights (autocast_adapter_dtype) whatever the base's dtype
        vectors[_ia3_module(key)] = (stacked.to(device=device, dtype=torch.float32), is_ff)
    return IA3Serving(base, vectors)


def soft_prompt(folder: str | Path, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A saved prompt-tuning adapter's virtual-token embeddings [n_virtual, d]."""
    state = adapter_tensors(folder)
    if "prompt_embeddings" not in state:
        raise HarnessError(f"{folder}: no prompt_embeddings (not a prompt-tuning adapter)")
    return state["prompt_embeddings"].to(device=device, dtype=dtype)


def load_mixed(base, folders: list[str | Path]) -> Serving:
    """A serving of every folder's adapter at once (one peft type for all), chosen by the saved ``peft_type``."""
    types = {peft_type(f) for f in folders}
    if len(types) != 1:
        raise HarnessError(f"adapters of different peft types cannot be mixed in one serving: {sorted(types)}")
    kind = types.pop()
    if kind == "LORA":
        return load_lora(base, folders)
    if kind == "IA3":
        return load_ia3(base, folders)
    if kind == "PROMPT_TUNING":
        p = next(base.parameters())
        return Serving(base, len(folders), [soft_prompt(f, p.device, p.dtype) for f in folders])
    raise HarnessError(f"peft type {kind} cannot serve mixed-task batches (mixable: LoRA, IA3, prompt tuning, ICL)")


def base_weights(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, a copy) of every base layer a peft model wraps: what merging changes, to restore it afterwards."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = []
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            w = module.get_base_layer().weight
            out.append((w, w.detach().clone()))
    return out
