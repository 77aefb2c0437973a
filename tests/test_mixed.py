"""Mixed-task batches (issue 16): a stream interleaving cb and rte queries, scored in batches whose rows belong to
different tasks, gives every query the score its single-task run gives (float32, 1e-4): LoRA through peft's
``adapter_names``, (IA)3 through our stacked vectors, prompt tuning through per-task soft-prompt prefixes, ICL
through per-task demonstration caches. The adapters are made to differ strongly (random perturbation), and each
test also checks that the other task's adapter would give other scores, so a row served with the wrong task's
parameters fails the comparison."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from harness.costs import ModelDims
from harness.data import few_shot_examples, load_split
from harness.methods import apply_method, get_method, training_settings
from harness.methods.artifacts import load_trained, save_trained
from harness.mixed.scorer import TaskQueries, interleave, score_mixed
from harness.mixed.serving import Serving, load_mixed
from harness.peft_runner import _score
from harness.random_models import build_random_model
from harness.scoring import score_prompts
from harness.tasks import load_task

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152, "max_position_embeddings": 4096,
        "tie_word_embeddings": True}
TASKS = ("cb", "rte")
N_QUERIES = 5


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


_BUILT: dict = {}


def fresh(tiny_config):
    """A fresh copy of the same seeded tiny llama every call (float32, CPU; built once)."""
    if tiny_config not in _BUILT:
        _BUILT[tiny_config] = build_random_model(tiny_config, torch.float32, device="cpu")
    model, tok = _BUILT[tiny_config]
    return copy.deepcopy(model), tok


@pytest.fixture(scope="module")
def queries(data_dir):
    out = []
    for name in TASKS:
        task = load_task(name)
        template = task.templates[0]
        prompts = [task.render(template, ex) for ex in load_split(task, task.eval_split, data_dir)[:N_QUERIES]]
        prefix = task.demonstrations(template, few_shot_examples(task, 0, data_dir, 2))
        out.append((name, prompts, prefix))
    return out


def make_adapter(tiny_config, method: str, seed: int, folder):
    """A saved adapter of ``method`` whose trainable tensors are moved far from their initialisation."""
    model, _ = fresh(tiny_config)
    torch.manual_seed(seed)
    model = apply_method(model, method, training_settings(method, "quick"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.5 if method != "prompt_tuning" else 2.0))
    return save_trained(model, get_method(method), folder)


def single_task(tiny_config, method, folder, prompts):
    """Scores of ``prompts`` as the single-task run scores them (:func:`harness.peft_runner.evaluate`)."""
    info = get_method(method)
    base, tok = fresh(tiny_config)
    model = load_trained(base, info, folder)
    out = _score(model, tok, prompts, info.supports_kv_cache, 4, False, one_row=not info.position_ids)
    return [ex.logprobs for ex in out.examples]


def max_diff(a, b) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt_tuning"])
def test_mixed_equals_single_task_peft(tiny_config, queries, tmp_path, method):
    folders = [make_adapter(tiny_config, method, seed, tmp_path / name) for seed, (name, _, _) in enumerate(queries)]
    expected = [single_task(tiny_config, method, f, prompts) for f, (_, prompts, _) in zip(folders, queries)]
    # the other task's adapter scores cb's queries differently: a row served with the wrong adapter would show
    wrong = single_task(tiny_config, method, folders[1], queries[0][1])
    assert max_diff(wrong, expected[0]) > 1e-2
    base, tok = fresh(tiny_config)
    dims = ModelDims.from_model(base)
    serving = load_mixed(base, folders)
    out = score_mixed(serving, tok, [TaskQueries(n, p) for n, p, _ in queries], 3, dims)
    assert max(out.tasks_per_batch) == 2  # the batches really mix tasks
    diffs = [max_diff([e.logprobs for e in got], exp) for got, exp in zip(out.examples, expected)]
    print(f"{method}: max |mixed - single-task| = {max(diffs):.3g}")
    assert max(diffs) < 1e-4, (method, diffs)
    assert [e.example_id for e in out.examples[0]] == [p.example_id for p in queries[0][1]]


def test_mixed_equals_single_task_icl(tiny_config, queries):
    base, tok = fresh(tiny_config)
    expected = [[e.logprobs for e in score_prompts(base, tok, prompts, prefix, batch_size=4).examples]
                for _, prompts, prefix in queries]
    assert max_diff(expected[0], [e.logprobs for e in score_prompts(
        base, tok, queries[0][1], queries[1][2], batch_size=4).examples]) > 1e-3  # demonstrations matter
    # a stream with another order than round-robin: two of cb, one of rte, ...
    order = sorted(interleave([N_QUERIES, N_QUERIES]), key=lambda ti: (ti[1] // 2, ti[0]))
    out = score_mixed(Serving(base, 2), tok, [TaskQueries(n, p, pre) for n, p, pre in queries], 4,
                      ModelDims.from_model(base), order=order)
    assert out.prefix_tokens[0] > 50 and out.prefix_tokens[1] > 50  # the demonstrations are cached per task
    assert max(out.tasks_per_batch) == 2
    diffs = [max_diff([e.logprobs for e in got], exp) for got, exp in zip(out.examples, expected)]
    print(f"icl: max |mixed - single-task| = {max(diffs):.3g}")
    assert max(diffs) < 1e-4, diffs
