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

from tests.conftest import (SHORT_CB, assert_every_tensor_moved, assert_scores_moved, choice_scores,
                            trainable_snapshot)
from harness.errors import HarnessError
from harness.methods import (apply_method, get_method, list_methods, method_overhead, parse_method_args,
                             training_settings)
from harness.spec import RunSpec
from harness.tasks import load_task


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
    ("scale_parameter=true", "scale_parameter: Adafactor option, but optimizer is adamw"),
    ("optimizer=adafactor,scale_parameter=1", "scale_parameter must be true or false, got 1"),
    ("optimizer=adafactor,relative_step=true", "relative_step=true is not supported"),
    ("optimizer=adafactor,warmup_init=true", "warmup_init=true is not supported"),
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
    assert (quick["steps"], quick["batch_size"], quick["lr"], quick["r"]) == (5, 4, 2e-3, 4)  # quick's lr
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


def test_adafactor_options_follow_t_few_per_method():
    """r-three/t-few: src/utils/get_optimizer.py passes scale_parameter=config.scale_parameter (Config.py: True;
    configs/prompt_tuning-*.json: false), relative_step=False, warmup_init=False; the options are settings (so
    part of a run's id), None for AdamW methods."""
    expected = {"ia3": True, "tfew": True, "ln_tuning": True, "bitfit": True, "prefix_tuning": True,
                "prompt_tuning": False}
    for method, scale in expected.items():
        for preset in ("paper", "quick"):
            s = training_settings(method, preset, {})
            assert s["optimizer"] == "adafactor"
            assert (s["scale_parameter"], s["relative_step"], s["warmup_init"]) == (scale, False, False), method
    for method in ("lora", "full", "ptuning", "peft:loha"):
        s = training_settings(method, "paper", {})
        assert s["optimizer"] == "adamw" and s["scale_parameter"] is s["relative_step"] is s["warmup_init"] is None
    turned = training_settings("ia3", "paper", {"method_args": "scale_parameter=false"})
    assert turned["scale_parameter"] is False
    on_lora = training_settings("lora", "paper", {"method_args": "optimizer=adafactor"})
    assert (on_lora["scale_parameter"], on_lora["relative_step"]) == (True, False)
    key = lambda s: RunSpec(task="cb", method="ia3", template="t", seed=0, k=0, model="m",  # noqa: E731
                            train=tuple(sorted(s.items()))).run_id
    assert key(turned) != key(training_settings("ia3", "paper", {}))


def test_paper_preset_keeps_t_few_rates_and_quick_raises_lora():
    paper = {m: training_settings(m, "paper", {})["lr"] for m in ("lora", "ia3", "tfew", "prompt_tuning")}
    assert paper == {"lora": 2e-4, "ia3": 3e-3, "tfew": 3e-3, "prompt_tuning": 0.3}
    quick = {m: training_settings(m, "quick", {})["lr"] for m in ("lora", "ia3", "tfew", "prompt_tuning")}
    assert quick == {"lora": 2e-3, "ia3": 3e-3, "tfew": 3e-3, "prompt_tuning": 0.3}
    assert training_settings("lora", "quick", {"lr": 1e-3})["lr"] == 1e-3  # --lr wins
    assert training_settings("lora", "quick", {"method_args": "lr=1e-3"})["lr"] == 1e-3


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
    prompts = [cb.render(cb.template("gpt3_style"), ex) for ex in SHORT_CB]
    right_pad = not get_method(method).position_ids
    base_scores = choice_scores(smollm.model, smollm.tokenizer, prompts, right_pad=right_pad)
    torch.manual_seed(0)
    base = copy.deepcopy(smollm.model)
    n_base = sum(p.numel() for p in base.parameters())
    model = apply_method(base, method, settings)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable <= n_base
    assert (trainable == n_base) == (method == "full")
    before = trainable_snapshot(model)
    untrained = choice_scores(model, smollm.tokenizer, prompts, right_pad=right_pad)
    stats = train(model, smollm.tokenizer, SHORT_CB[:batch], cb, settings, seed=0, method=method)
    assert stats.steps == steps and all(math.isfinite(x) for x in stats.losses)
    assert min(stats.losses[-2:]) < stats.losses[0] * 0.9, stats.losses
    assert stats.work.tokens > 0 and stats.rows == steps * batch * 3
    assert_every_tensor_moved(model, before)
    model.eval()
    trained = choice_scores(model, smollm.tokenizer, prompts, right_pad=right_pad)
    assert_scores_moved(trained, untrained)  # against the method applied, untrained (prompt tuning adds tokens)
    if method in ("lora", "ia3", "tfew", "ln_tuning", "full"):  # these start exactly at the base model
        torch.testing.assert_close(untrained, base_scores, rtol=1e-4, atol=1e-4)
        assert_scores_moved(trained, base_scores)


@pytest.mark.slow
def test_run_peft_group_saves_an_adapter_that_reloads_to_the_same_scores(smollm, cb, tmp_path, data_dir):
    from harness.models import LoadedModel
    from harness.peft_runner import eval_saved, run_peft_group

    # a small data folder of real CB rows: the two shortest train rows as the few-shot set
    folder = tmp_path / "data" / "cb"
    (folder / "few_shot").mkdir(parents=True)
    valid = [json.loads(line) for line in open(data_dir / "cb" / "validation.jsonl")][:3]
    for name, rows in (("train.jsonl", SHORT_CB), ("few_shot/0_seed.jsonl", SHORT_CB), ("validation.jsonl", valid)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    def load_base():
        return LoadedModel("smollm2-135m", copy.deepcopy(smollm.model), smollm.tokenizer, smollm.device, smollm.dtype)

    # 2 steps without warmup, both at lr 1e-2: the adapter moves (T-Few's warmup would make the first step lr 0)
    settings = training_settings("lora", "quick", {"steps": 2, "batch_size": 2, "n_train": 2, "lr": 1e-2,
                                                   "warmup_ratio": 0.0})
    specs = [RunSpec(task="cb", method="lora", template=t, seed=0, k=0, model="smollm2-135m", preset="quick",
                     limit=3, train=tuple(sorted(settings.items()))) for t in ("gpt3_style", "guaranteed_true")]
    results = list(run_peft_group(load_base, cb, specs, tmp_path / "data", tmp_path / "adapters", env={"x": 1}))
    assert [r.status for r in results] == ["finished", "finished"], [r.error for r in results]
    first = results[0]
    assert first.artifact_path == results[1].artifact_path
    assert list((tmp_path / "adapters").glob("*/adapter_model.safetensors"))
    m = first.metrics
    assert m["n_eval"] == 3 and m["steps"] == 2 and m["checkpoint_bytes"] > 0
    assert 0 < m["trainable_params"] < m["total_params"]
    assert m["train_flops"] > 0 and m["infer_flops_per_example"] > 0
    assert m["infer_flops_per_example_uncached"] >= m["infer_flops_per_example"]
    assert m["seconds"] == pytest.approx(m["train_seconds"] + m["eval_seconds"])

    # the saved adapter was trained: every lora_B (zero at initialisation) is nonzero
    from safetensors.torch import load_file

    (saved,) = (tmp_path / "adapters").glob("*/adapter_model.safetensors")
    tensors = load_file(str(saved))
    lora_b = [t for name, t in tensors.items() if "lora_B" in name]
    assert len(lora_b) == 60 and all(t.abs().max() > 0 for t in lora_b)
    # and its scores are not the base model's
    from harness.scoring import score_prompts

    prompts = [cb.render(cb.template("gpt3_style"), ex) for ex in valid]
    base = score_prompts(smollm.model, smollm.tokenizer, prompts, use_cache=False)
    diff = max(abs(a - b) for ea, eb in zip(first.examples, base.examples) for a, b in zip(ea.logprobs, eb.logprobs))
    assert diff > 1e-3, diff

    run = {"run_id": first.run_id, "config": first.config, "artifact_path": first.artifact_path}
    again = eval_saved(load_base, run, cb, tmp_path / "data")
    assert again.env["tokenizer"] == first.env["tokenizer"]  # the re-scoring records the tokenizer it used too
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


def test_scoring_a_ptuning_model_prints_no_position_ids_warning(smollm, cb, data_dir):
    """peft warns on every prompt-learning forward that it ignores position ids; harness knows (p-tuning is scored
    one unpadded row at a time), and the warning came back once per batch (each ``catch_warnings`` exit resets
    the once-only registry): 4,334 lines in one grid job's log (round 27). Scoring a p-tuning model warns nothing
    of it."""
    import warnings

    from harness.costs import ModelDims
    from harness.peft_runner import evaluate

    settings = training_settings("ptuning", "quick", {"steps": 1})
    model = apply_method(copy.deepcopy(smollm.model), "ptuning", settings)
    spec = RunSpec(task="cb", method="ptuning", template="gpt3_style", seed=0, k=0, model="smollm2-135m",
                   preset="quick", limit=3, train=tuple(sorted(settings.items())))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        metrics, _ = evaluate(model, smollm.tokenizer, get_method("ptuning"), cb, spec, data_dir,
                              ModelDims.from_model(smollm.model), method_overhead(model, "ptuning", settings))
    assert metrics["n_eval"] == 3
    assert not [w for w in caught if "Position ids are not supported" in str(w.message)]
