"""Every PEFT method the harness can run, end to end on the real embedded SmolLM2-135M (issue 13, item 2).

One parametrized test over every registered method of kind ``peft`` (methods registered later are picked up
automatically) and every peft type in peft's ``PEFT_TYPE_TO_CONFIG_MAPPING`` (``peft:<type>``): 3 steps on one
short CB example through :func:`harness.peft_runner.run_peft_group`, scored on 2 validation examples with one
template, asserting that the loss changed, that the trainable-parameter count equals the method's own count
(a ``trainable_params(model, cfg)`` formula where the method module has one, peft's
``get_nb_trainable_parameters`` for peft models, else the parameters left trainable by ``apply`` counted here),
that the saved adapter reloads to the same scores and that ``checkpoint_bytes`` is the bytes on disk.

A type that cannot apply to a decoder-only model, or needs arguments the harness cannot guess, is skipped with
its reason (:data:`SKIP`). Cheap by construction: one base model (the session fixture) deep-copied per run.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
import time

import pytest

from tests.conftest import SHORT_CB
from harness.errors import HarnessError
from harness.methods import apply_method, get_method, list_methods, method_config, training_settings
from harness.spec import RunSpec


def _peft_types() -> list[str]:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return sorted(f"peft:{t.value.lower()}" for t in PEFT_TYPE_TO_CONFIG_MAPPING)


CASES = [m.name for m in list_methods() if m.kind == "peft"] + _peft_types()

# learning rate per case where 1e-2 does not move the loss in 3 steps or diverges
LR = {"full": 1e-4, "prompt_tuning": 0.1, "peft:prompt_tuning": 0.1, "bitfit": 1.0}  # bitfit: a tiny random model
# --method-args per peft type where peft has no usable default for a llama-style causal LM
ARGS: dict[str, str] = {
    "peft:adalora": "total_step=3",  # AdaLoRA schedules its rank budget over the run: it needs the step count
    # prompt learning: peft has no default number of virtual tokens (adaption_prompt: prompt length and layers)
    "peft:prompt_tuning": "num_virtual_tokens=10", "peft:p_tuning": "num_virtual_tokens=10",
    "peft:prefix_tuning": "num_virtual_tokens=10", "peft:multitask_prompt_tuning": "num_virtual_tokens=10",
    "peft:cartridge": "num_virtual_tokens=10", "peft:adaption_prompt": "adapter_len=10,adapter_layers=2",
    # block / vector sizes must divide SmolLM2's widths (576, 192, 1536); peft's default 256 does not
    "peft:c3a": "block_size=64", "peft:vblora": "vector_length=64",
    "peft:trainable_tokens": "token_indices=0|1",  # which embedding rows to train: peft has no default
    # OSF takes an SVD of every weight it targets at set-up: all 210 linear layers took 92 s of CI (2 cores); two
    # projections a layer keep every check of the test (trains, counts, saves, reloads)
    "peft:osf": "target_modules=q_proj|v_proj",
}
# cases that cannot run on SmolLM2-135M, with the reason
SKIP: dict[str, str] = {
    "bitfit": "SmolLM2-135M (llama-style) has no bias parameters; bitfit refuses it with a clear error",
    "peft:xlora": "X-LoRA mixes already trained LoRA adapters (adapters=name:path|...): nothing to guess",
    "peft:multitask_prompt_tuning": "needs per-example task_ids in every forward; harness runs one task per run "
                                    "and passes none (peft: 'task_ids cannot be None')",
    "peft:poly": "Polytropon routes by per-example task_ids in every forward; harness passes none",
    "peft:shadow": "peft 0.21's shadow passes past_key_values, deprecated since transformers 5.24 (the suite "
                   "turns that FutureWarning into an error)",
}
NEEDS = {"peft:adamss": "sklearn"}  # optional packages a peft type imports
TIMES: dict[str, float] = {}
TABLE: list[tuple] = []


def _expected_trainable(name: str, base_model, settings: dict) -> int:
    """The method's trainable-parameter count, computed apart from the run."""
    info = get_method(name)
    module = sys.modules.get(getattr(info.apply, "__module__", ""), None)
    formula = getattr(module, "trainable_params", None)
    if formula is not None:
        return formula(base_model, method_config(name, settings))
    # a real copy, not a meta-device skeleton: peft moves AdaLoRA's frozen ranknum to the meta device as a new,
    # trainable Parameter, so a skeleton counts 60 parameters too many
    model = apply_method(copy.deepcopy(base_model), name, settings)
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()[0]
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


def _disk_bytes(path) -> int:
    from pathlib import Path

    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("every_method")
    folder = root / "cb"
    (folder / "few_shot").mkdir(parents=True)
    valid = [json.loads(line) for line in open(data_dir / "cb" / "validation.jsonl")][:2]
    for name, rows in (("train.jsonl", SHORT_CB), ("few_shot/0_seed.jsonl", SHORT_CB), ("validation.jsonl", valid)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_every_method_trains_saves_and_reloads(name, smollm, cb, small_data, tmp_path):
    from harness.models import LoadedModel, load_model

    if name in SKIP:
        pytest.skip(SKIP[name])
    quantize = get_method(name).quantize
    if quantize and smollm.device.type == "cpu":
        from harness.models import bitsandbytes_cpu_4bit

        if importlib.util.find_spec("bitsandbytes") is None or not bitsandbytes_cpu_4bit():
            pytest.skip(f"{name}: a 4-bit NF4 base on the CPU needs bitsandbytes with CPU kernels (the qlora extra); "
                        "its refusal is tested in tests/test_methods_peft_family.py")
    if name in NEEDS:
        pytest.importorskip(NEEDS[name], reason=f"{name} needs {NEEDS[name]}, not installed")

    def load_base():
        if quantize:  # a 4-bit base cannot be copied from the float32 one: loaded as a run loads it
            return load_model("smollm2-135m", device=smollm.device.type, dtype="float32", quantize=quantize)
        return LoadedModel("smollm2-135m", copy.deepcopy(smollm.model), smollm.tokenizer, smollm.device, smollm.dtype)

    _train_save_reload(name, load_base, smollm.model, cb, small_data, tmp_path)


def _train_save_reload(name, load_base, base_model, cb, small_data, tmp_path, model: str = "smollm2-135m") -> None:
    """3 steps of ``name`` on ``load_base()``'s model, then the assertions of the module docstring."""
    from harness.peft_runner import eval_saved, run_peft_group

    start = time.perf_counter()
    try:
        settings = training_settings(name, "quick", {
            "steps": 3, "batch_size": 1, "n_train": 1, "lr": LR.get(name, 1e-2), "warmup_ratio": 0.0,
            "train_template": "gpt3_style", "method_args": ARGS.get(name)})
    except HarnessError as exc:
        pytest.fail(f"{name}: no usable default settings ({exc}); add --method-args to ARGS or a reason to SKIP")

    spec = RunSpec(task="cb", method=name, template="gpt3_style", seed=0, k=0, model=model,
                   preset="quick", limit=2, train=tuple(sorted(settings.items())))
    (result,) = run_peft_group(load_base, cb, [spec], small_data, tmp_path / "adapters")
    assert result.status == "finished", (result.error, result.extra.get("traceback"))
    m = result.metrics
    assert m["steps"] == 3 and m["loss_first"] != m["loss_last"], result.extra["losses"]
    assert m["trainable_params"] == _expected_trainable(name, base_model, settings)
    assert 0 < m["trainable_params"] <= m["total_params"]
    assert m["checkpoint_bytes"] == _disk_bytes(result.artifact_path) > 0

    run = {"run_id": result.run_id, "config": result.config, "artifact_path": result.artifact_path}
    again = eval_saved(load_base, run, cb, small_data)
    for a, b in zip(result.examples, again.examples, strict=True):
        assert a.example_id == b.example_id
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    TIMES[name] = time.perf_counter() - start
    TABLE.append((name, m["trainable_params"], m["checkpoint_bytes"], m["loss_first"], m["loss_last"], TIMES[name]))
    print(f"\nEVERY_METHOD {name} trainable={m['trainable_params']} bytes={m['checkpoint_bytes']} "
          f"loss {m['loss_first']:.4f} -> {m['loss_last']:.4f} ({TIMES[name]:.1f} s)")


TINY_QWEN2 = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
              "tie_word_embeddings": True, "torch_dtype": "float32"}


@pytest.mark.slow
def test_bitfit_trains_a_model_with_biases(smollm, cb, small_data, tmp_path):
    """BitFit refuses SmolLM2 (no biases: tests/test_methods.py); on a model with biases (a tiny random Qwen2, whose
    q/k/v projections have them, with SmolLM2's vocabulary) it trains, saves and reloads like every other method."""
    from harness.models import load_model

    config = tmp_path / "tiny-qwen2.json"
    config.write_text(json.dumps({**TINY_QWEN2, "vocab_size": len(smollm.tokenizer)}))
    loaded = load_model(f"random:{config}", device="cpu", dtype="float32")
    biases = sum(p.numel() for n, p in loaded.model.named_parameters() if n.endswith(".bias"))
    assert biases == 2 * (64 + 2 * 32)  # q (64) and k, v (2 kv heads x 16) per layer

    def load_base():
        return load_model(f"random:{config}", device="cpu", dtype="float32")  # seeded: the same weights each time

    _train_save_reload("bitfit", load_base, loaded.model, cb, small_data, tmp_path)


BUILTIN = [m.name for m in list_methods() if m.kind == "peft"]


@pytest.fixture(scope="module")
def tiny_t5_folder(tmp_path_factory):
    """tests/test_seq2seq.py's tiny random T5 saved as a model folder (weights, config, tokenizer), loaded by the
    real loading path (``AutoModelForSeq2SeqLM.from_pretrained``; 4-bit NF4 for qlora)."""
    from harness.models import load_model
    from tests.test_seq2seq import TINY_T5

    root = tmp_path_factory.mktemp("tiny-t5")
    (root / "config.json").write_text(json.dumps(TINY_T5))
    lm = load_model(f"random:{root / 'config.json'}", device="cpu", dtype="float32")
    folder = root / "model"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILTIN)
def test_every_builtin_method_on_an_encoder_decoder(name, tiny_t5_folder, cb, small_data, tmp_path):
    """Issue 17 item 4: every built-in method on a tiny T5 (T5 module names q/k/v/o, wi_0/wi_1/wo, layer_norm,
    EncDecAttention; tied ``shared`` embeddings): it resolves its targets, trains, saves and reloads exactly as on
    SmolLM2 (the assertions of :func:`_train_save_reload`). BitFit has nothing to train (T5 has no biases) and
    must say so."""
    from harness.models import load_model
    from harness.peft_runner import run_peft_group

    quantize = get_method(name).quantize
    if quantize:
        from harness.models import bitsandbytes_cpu_4bit

        if importlib.util.find_spec("bitsandbytes") is None or not bitsandbytes_cpu_4bit():
            pytest.skip(f"{name}: a 4-bit NF4 base on the CPU needs bitsandbytes with CPU kernels (the qlora extra)")

    def load_base():
        return load_model(str(tiny_t5_folder), device="cpu", dtype="float32", quantize=quantize)

    if name == "bitfit":
        settings = training_settings(name, "quick", {"steps": 3, "batch_size": 1, "n_train": 1})
        spec = RunSpec(task="cb", method=name, template="gpt3_style", seed=0, k=0, model=str(tiny_t5_folder),
                       preset="quick", limit=2, train=tuple(sorted(settings.items())))
        (result,) = run_peft_group(load_base, cb, [spec], small_data, tmp_path / "adapters")
        assert result.status == "failed" and "has no bias parameters" in result.error
        return
    base = load_model(str(tiny_t5_folder), device="cpu", dtype="float32").model
    _train_save_reload(name, load_base, base, cb, small_data, tmp_path, model=str(tiny_t5_folder))
