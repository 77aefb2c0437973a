"""PEFT costs and the PEFT path through the CLI on the real model: train FLOPs vs FlopCounterMode,
and `harness run` + `harness eval --run` reproducing the stored scores from the saved adapter."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode

from harness import costs
from harness.cli import main
from harness.methods import apply_method, training_settings
from harness.peft_runner import count_params
from harness.store import Store
from harness.tasks import load_task
from harness.training import train
from tests.conftest import SHORT_CB


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_train_flops_formula_matches_flop_counter(smollm, method):
    """Forward 2N + backward (2N activations + 2 x trainable for weights) per token, vs FlopCounterMode.

    FlopCounterMode counts the full attention rectangle where we count the causal triangle; the training rows
    are short (about 60 tokens), so attention is a small share and the bound is 15%."""
    cb = load_task("cb")
    settings = training_settings(method, "quick", {"steps": 1, "batch_size": 2, "n_train": 2,
                                                   "train_template": "gpt3_style", "lr": 1e-6})
    model = copy.deepcopy(smollm.model)
    model.set_attn_implementation("eager")  # attention matmuls visible to the counter
    torch.manual_seed(0)
    model = apply_method(model, method, settings)
    trainable, _ = count_params(model)
    with FlopCounterMode(display=False) as counter:
        stats = train(model, smollm.tokenizer, SHORT_CB, cb, settings, seed=0, method=method)
    dims = costs.ModelDims.from_model(model)
    ours = costs.train_flops(dims, stats.work, trainable, *costs.trainable_vocab_params(model)) + stats.overhead_flops
    theirs = counter.get_total_flops()
    assert abs(ours - theirs) / theirs < 0.15, (method, ours, theirs)


@pytest.mark.slow
def test_peft_run_through_cli_and_eval_reproduces_scores(tmp_path, data_dir):
    store = tmp_path / "s.sqlite"
    args = ["run", "--methods", "lora", "--tasks", "cb", "--seeds", "0", "--templates", "gpt3_style,guaranteed_true",
            "--preset", "quick", "--steps", "3", "--limit", "6", "--store", str(store), "--data-dir", str(data_dir),
            "--quiet"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    runs = Store(store).runs()
    assert len(runs) == 2 and all(r["status"] == "finished" for r in runs)
    a, b = runs
    # one adapter trained for both templates
    assert a["artifact_path"] == b["artifact_path"] and a["train_flops"] == b["train_flops"] > 0
    assert a["trainable_params"] == 460_800  # LoRA r=8 on q,v of SmolLM2's 30 layers
    assert 0 < a["checkpoint_bytes"] < 5_000_000 and a["n_eval"] == 6 and a["config"]["train"]["steps"] == 3
    out = CliRunner().invoke(main, ["eval", "--run", a["run_id"], "--store", str(store), "--data-dir", str(data_dir)],
                             catch_exceptions=False)
    assert out.exit_code == 0, out.output
    worst = float(out.output.split("max |log-prob difference| ")[1].split()[0])
    assert worst < 1e-4, out.output
    exported = [json.loads(x) for x in CliRunner().invoke(main, ["export", "--store", str(store)]).output.splitlines()]
    assert len(exported) == 12
