"""Tests of the method registry, every built-in PEFT method training on the real embedded SmolLM2-135M, and
adapter save/reload through harness.peft_runner.

Slow tests (``-m slow``) train a few steps each on two short CB examples; the model loads once per module.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch

from tests.conftest import SHORT_CB
from harness.errors import HarnessError
from harness.methods import (apply_method, get_method, list_methods, method_overhead, parse_method_args,
                             training_settings)
from harness.spec import RunSpec
from harness.tasks import load_task

DATA = "/work/shared/data"


# ------------------------------------------------------------------------------------------ registry

def test_registry_lists_every_builtin_and_the_in_context_methods():
    names = {m.name: m.kind for m in list_methods()}
    for name in ("lora", "ia3", "tfew", "prompt_tuning", "prefix_tuning", "ptuning", "ln_tuning", "bitfit", "full"):
        assert names[name] == "peft"
    assert names["zeroshot"] == "zeroshot" and names["icl"] == "icl"
    assert get_method("icl").config_cls is None
    assert not get_method("prompt_tuning").supports_kv_cache and get_method("lora").supports_kv_cache


def test_importing_the_registry_imports_neither_torch_nor_peft():
    code = "import sys, harness.methods; print('torch' in sys.modules, 'peft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_unknown_method_suggests_the_closest():
    with pytest.raises(HarnessError, match="Did you mean 'lora'"):
        get_method("lroa")


def test_peft_type_resolves_to_a_generic_method():
    info = get_method("peft:loha")
    assert info.kind == "peft" and info.supports_kv_cache
    settings = training_settings("peft:loha", "quick", {"method_args": "r=4,alpha=8,targets=q_proj|v_proj"})
    assert settings["r"] == 4 and settings["target_modules"] == ("q_proj", "v_proj")
    assert settings["optimizer"] == "adamw"
    with pytest.raises(HarnessError, match="peft method"):
        get_method("peft:lohaa")
    with pytest.raises(HarnessError, match="LoHaConfig"):
        training_settings("peft:loha", "quick", {"method_args": "rr=4"})
    assert not get_method("peft:prompt_tuning").supports_kv_cache


def test_parse_method_args_types_values():
    assert parse_method_args("r=16,alpha=32.5,targets=q_proj|v_proj,projection=false,init=none,encoder=mlp") == {
        "r": 16, "alpha": 32.5, "targets": ["q_proj", "v_proj"], "projection": False, "init": None, "encoder": "mlp"}
    assert parse_method_args(None) == {} and parse_method_args(" ") == {}
    for bad in ("r", "r=1,r=2", "=3", "r="):
        with pytest.raises(HarnessError, match="--method-args"):
            parse_method_args(bad)


@pytest.mark.parametrize("args, message", [
    ("rank=4", "unknown argument of method 'lora'"),
    ("r=0", "r must be a positive integer"),
    ("r=2.5", "r must be a positive integer"),
    ("dropout=1.5", "dropout"),
    ("targets=", "has no value"),
    ("optimizer=sgd", "optimizer must be one of"),
    ("losses=lm|xx", "unknown loss 'xx'"),
    ("steps=3", "is a run setting"),
])
def test_bad_method_args_are_clear_errors(args, message):
    with pytest.raises(HarnessError, match=message):
        training_settings("lora", "quick", {"method_args": args})


def test_training_settings_resolve_preset_defaults_and_overrides():
    paper = training_settings("tfew", "paper", {})
    assert (paper["steps"], paper["batch_size"], paper["lr"], paper["optimizer"]) == (1000, 8, 3e-3, "adafactor")
    assert paper["losses"] == ("lm", "ul", "ln") and paper["warmup_ratio"] == 0.06 and paper["schedule"] == "linear"
    quick = training_settings("lora", "quick",
                              {"steps": 5, "lr": None, "losses": ["lm", "ln"], "method_args": {"r": 4}})
    assert (quick["steps"], quick["batch_size"], quick["lr"], quick["r"]) == (5, 4, 2e-4, 4)
    assert quick["losses"] == ("lm", "ln") and quick["train_template"] is None
    json.dumps(quick)  # JSON-able
    hash(tuple(sorted(quick.items())))  # hashable as RunSpec.train
    assert training_settings("full", "quick", {})["lr"] == 1e-5
    with pytest.raises(HarnessError, match="Did you mean 'steps'"):
        training_settings("lora", "quick", {"stepz": 3})
    with pytest.raises(HarnessError, match="batch-size must be a positive integer"):
        training_settings("lora", "quick", {"batch_size": 0})
    with pytest.raises(HarnessError, match="has no training settings"):
        training_settings("icl", "quick", {})
    with pytest.raises(HarnessError, match="preset"):
        training_settings("lora", "fast", {})


# ------------------------------------------------------------------------------------------ real model

# smollm (the real model, loaded once per session), cb and SHORT_CB come from tests/conftest.py


def test_bitfit_on_smollm2_is_a_clear_error(smollm):
    settings = training_settings("bitfit", "quick", {})
    with pytest.raises(HarnessError, match="no bias parameters.*ln_tuning or ia3"):
        apply_method(copy.deepcopy(smollm.model), "bitfit", settings)


def test_targets_resolve_per_family_and_overrides_are_checked(smollm):
    lora = training_settings("lora", "quick", {})
    model = apply_method(copy.deepcopy(smollm.model), "lora", lora)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"q_proj", "v_proj"}
    # r (d_in + d_out) x 2 per layer: q 576->576 and v 576->192 on 30 layers
    assert method_overhead(model, "lora", lora).per_token == 30 * 2 * 8 * ((576 + 576) + (576 + 192))
    bad = training_settings("lora", "quick", {"method_args": "targets=q_prj"})
    with pytest.raises(HarnessError, match="Did you mean 'q_proj'"):
        apply_method(copy.deepcopy(smollm.model), "lora", bad)


# (lr, steps, batch) per method: the loss must visibly fall on one fixed batch (one short CB example, 3 choice
# rows, kept tiny because the test machine's 2 CPU cores are shared)
TRAIN_CASES = {
    "lora": (1e-3, 3, 1), "ia3": (1e-2, 3, 1), "tfew": (1e-2, 3, 1), "prompt_tuning": (0.1, 3, 1),
    "prefix_tuning": (3e-3, 3, 1), "ptuning": (3e-3, 3, 1), "ln_tuning": (3e-3, 3, 1), "full": (3e-5, 3, 1),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(TRAIN_CASES))
def test_each_method_trains_and_its_loss_falls(method, smollm, cb):
    from harness.training import train

    lr, steps, batch = TRAIN_CASES[method]
    settings = training_settings(method, "quick", {"steps": steps, "batch_size": batch, "n_train": batch, "lr": lr,
                                                   "warmup_ratio": 0.0, "train_template": "gpt3_style"})
    torch.manual_seed(0)
    base = copy.deepcopy(smollm.model)
    n_base = sum(p.numel() for p in base.parameters())
    model = apply_method(base, method, settings)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable <= n_base
    assert (trainable == n_base) == (method == "full")
    stats = train(model, smollm.tokenizer, SHORT_CB[:batch], cb, settings, seed=0, method=method)
    assert stats.steps == steps and all(math.isfinite(x) for x in stats.losses)
    assert min(stats.losses[-2:]) < stats.losses[0] * 0.9, stats.losses
    assert stats.work.tokens > 0 and stats.rows == steps * batch * 3


@pytest.mark.slow
def test_run_peft_group_saves_an_adapter_that_reloads_to_the_same_scores(smollm, cb, tmp_path):
    from harness.models import LoadedModel
    from harness.peft_runner import eval_saved, run_peft_group

    # a small data folder of real CB rows: the two shortest train rows as the few-shot set
    folder = tmp_path / "data" / "cb"
    (folder / "few_shot").mkdir(parents=True)
    valid = [json.loads(line) for line in open(f"{DATA}/cb/validation.jsonl")][:3]
    for name, rows in (("train.jsonl", SHORT_CB), ("few_shot/0_seed.jsonl", SHORT_CB), ("validation.jsonl", valid)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    def load_base():
        return LoadedModel("smollm2-135m", copy.deepcopy(smollm.model), smollm.tokenizer, smollm.device, smollm.dtype)

    settings = training_settings("lora", "quick", {"steps": 1, "batch_size": 2, "n_train": 2, "lr": 1e-3})
    specs = [RunSpec(task="cb", method="lora", template=t, seed=0, k=0, model="smollm2-135m", preset="quick",
                     limit=3, train=tuple(sorted(settings.items()))) for t in ("gpt3_style", "guaranteed_true")]
    results = list(run_peft_group(load_base, cb, specs, tmp_path / "data", tmp_path / "adapters", env={"x": 1}))
    assert [r.status for r in results] == ["finished", "finished"], [r.error for r in results]
    first = results[0]
    assert first.artifact_path == results[1].artifact_path
    assert list((tmp_path / "adapters").glob("*/adapter_model.safetensors"))
    m = first.metrics
    assert m["n_eval"] == 3 and m["steps"] == 1 and m["checkpoint_bytes"] > 0
    assert 0 < m["trainable_params"] < m["total_params"]
    assert m["train_flops"] > 0 and m["infer_flops_per_example"] > 0
    assert m["infer_flops_per_example_uncached"] >= m["infer_flops_per_example"]
    assert m["seconds"] == pytest.approx(m["train_seconds"] + m["eval_seconds"])

    run = {"run_id": first.run_id, "config": first.config, "artifact_path": first.artifact_path}
    again = eval_saved(load_base, run, cb, tmp_path / "data")
    for a, b in zip(first.examples, again.examples):
        assert a.example_id == b.example_id
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)

    # a training failure fails every spec of the group and raises nothing
    broken = dict(settings, train_template="no_such_template")
    bad = [RunSpec(task="cb", method="lora", template=t, seed=0, k=0, model="smollm2-135m", preset="quick",
                   limit=3, train=tuple(sorted(broken.items()))) for t in ("gpt3_style", "guaranteed_true")]
    failed = list(run_peft_group(load_base, cb, bad, tmp_path / "data", tmp_path / "adapters", env={}))
    assert [r.status for r in failed] == ["failed", "failed"]
    assert "no_such_template" in failed[0].error and "\n" not in failed[0].error
