"""Packed training (``harness run --pack N``, :mod:`harness.packed`): every adapter trained in a pack equals its
separately trained twin (CPU float32: the same losses within 1e-5, the same scores within 1e-4), and a CLI run with
``--pack 2`` stores what ``--pack 1`` stores, under the same run ids."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tests.conftest import SHORT_CB, assert_scores_moved, choice_scores
from harness.cli import main
from harness.data import few_shot_examples
from harness.methods import apply_method, training_settings
from harness.packed import PackedAdapters, PackMember, group_initial_tensors, pack_refusal, train_packed
from harness.store import Store
from harness.tasks import load_task
from harness.training import TrainingDiverged, train

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152, "max_position_embeddings": 4096,
        "tie_word_embeddings": True}


def _members(data_dir):
    """Three groups: cb seeds 0 and 1, rte seed 32 (another task: two choices instead of three, other lengths)."""
    cb, rte = load_task("cb"), load_task("rte")
    return [PackMember(cb, few_shot_examples(cb, 0, data_dir, n=32)[:6], 0),
            PackMember(cb, few_shot_examples(cb, 1, data_dir, n=32)[:6], 1),
            PackMember(rte, few_shot_examples(rte, 32, data_dir, n=32)[:6], 32)]


def _probe(member):
    """Fixed prompts to score a trained adapter on: two rows of the member's task, its first template."""
    rows = SHORT_CB if member.task.name == "cb" else member.train_examples[:2]
    return [member.task.render(member.task.templates[0], ex) for ex in rows]


@pytest.mark.parametrize("method, padding", [("ia3", "left"), ("tfew", "left"), ("lora", "left"),
                                             ("ln_tuning", "left"), ("prompt_tuning", "right"),
                                             ("tfew", "right")])  # right: CUDA's padding (the head's gather)
def test_each_packed_adapter_equals_its_separately_trained_twin(tiny, smollm, data_dir, method, padding):
    # no warmup and a large rate: every step moves the weights (LoRA's A from the second step on)
    settings = training_settings(method, "quick", {"steps": 3, "batch_size": 2, "grad_accum": 2, "lr": 3e-2,
                                                   "warmup_ratio": 0.0})
    members = _members(data_dir)
    tok = smollm.tokenizer
    alone = []
    for m in members:
        torch.manual_seed(m.seed)
        model = apply_method(copy.deepcopy(tiny), method, settings)
        stats = train(model, tok, m.train_examples, m.task, settings, m.seed, method=method, padding=padding)
        alone.append((stats, choice_scores(model, tok, _probe(m)),
                      [p.detach().clone() for p in model.parameters() if p.requires_grad]))

    base = copy.deepcopy(tiny)
    initial = [group_initial_tensors(base, method, settings, m.seed) for m in members]
    torch.manual_seed(members[0].seed)
    model = apply_method(base, method, settings)
    packed = PackedAdapters(model, initial)
    outcomes = train_packed(model, tok, packed, members, settings, method=method, padding=padding)
    model.eval()
    for g, (m, out, (stats, scores, weights)) in enumerate(zip(members, outcomes, alone)):
        assert out.steps == stats.steps == 3
        assert out.losses == pytest.approx(stats.losses, rel=1e-5, abs=1e-5)
        for name in settings["losses"]:
            assert out.components[name] == pytest.approx(stats.components[name], rel=1e-5, abs=1e-5)
        assert out.work == stats.work and out.rows == stats.rows and out.forwards == stats.forwards
        moved = [not torch.equal(p, t) for p, t in zip(packed.params[g], initial[g])]
        assert all(moved), f"group {g}: {moved.count(False)} tensors did not move"
        for p, w in zip(packed.params[g], weights):
            torch.testing.assert_close(p.detach(), w, rtol=1e-4, atol=1e-5)
        packed.load_group(g)
        got = choice_scores(model, tok, _probe(m))
        assert (got - scores).abs().max().item() < 1e-4
        assert_scores_moved(got, choice_scores(tiny, tok, _probe(m)), min_diff=2e-4)  # twins differ by ~1e-6
    # the peft model's own adapter layers are enabled again, its tensors trainable
    assert all(p.requires_grad for n, p in model.named_parameters()
               if "ia3_l" in n or "lora_" in n or "ln_tuning_layers" in n or "prompt_encoder" in n)


def test_a_pack_under_compiled_blocks_trains_as_the_eager_pack(tiny, smollm, data_dir):
    """``--compile on`` with ``--pack``: the per-row hooks trace into the compiled blocks (no fallback to eager),
    the losses and the trained tensors equal the eager pack's, and the blocks are eager again afterwards; ``graphs``
    (CUDA graphs on a GPU) takes the same path on the CPU."""
    from transformers import LlamaForCausalLM

    from harness.compiling import GRAPH_WIDTH_MULTIPLE, repeated_blocks

    config = copy.deepcopy(tiny.config)
    config.num_hidden_layers = 4  # enough layers to tell one graph per layer from graphs the blocks share
    torch.manual_seed(0)
    deep = LlamaForCausalLM(config).eval()
    settings = training_settings("lora", "quick", {"steps": 3, "batch_size": 2, "grad_accum": 2, "lr": 3e-2,
                                                   "warmup_ratio": 0.0})
    members = _members(data_dir)
    from torch._dynamo.utils import counters

    results = {}
    for compile_ in ("off", "on", "graphs"):
        counters.clear()
        base = copy.deepcopy(deep)
        initial = [group_initial_tensors(base, "lora", settings, m.seed) for m in members]
        torch.manual_seed(members[0].seed)
        model = apply_method(base, "lora", settings)
        packed = PackedAdapters(model, initial)
        widths = []  # each forward's padded width: under graphs a multiple of GRAPH_WIDTH_MULTIPLE (few CUDA graphs)
        hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: widths.append(a[0].shape[1]))
        outcomes = train_packed(model, smollm.tokenizer, packed, members, settings, method="lora", padding="right",
                                compile=compile_)
        hook.remove()
        assert all(o.compiled == (compile_ != "off") for o in outcomes)
        assert all(w % GRAPH_WIDTH_MULTIPLE == 0 for w in widths) == (compile_ == "graphs"), (compile_, widths)
        # the flag is not taken on trust: dynamo compiled the blocks' frames exactly when asked to
        assert (counters["frames"]["ok"] > 0) == (compile_ != "off"), dict(counters["frames"])
        # ... and the blocks share their graphs: one for the first (its input needs no grad), one for the others;
        # not one per layer (hooks that guarded on their layer's index did that, and past 8 layers the recompile
        # limit left the rest eager while the run still said compiled)
        assert counters["stats"]["unique_graphs"] <= 2, counters["stats"]["unique_graphs"]
        assert all(block._compiled_call_impl is None for block in repeated_blocks(model))
        results[compile_] = (outcomes, [[p.detach().clone() for p in group] for group in packed.params], initial)
    eager, eager_params, initial = results["off"]
    for compiled, compiled_params, _ in (results["on"], results["graphs"]):
        for out, twin in zip(compiled, eager):
            assert out.losses == pytest.approx(twin.losses, rel=1e-5, abs=1e-5)
        for g, (mine, twin) in enumerate(zip(compiled_params, eager_params)):
            assert not torch.equal(mine[-1], initial[g][-1])  # LoRA's B moved
            for p, q in zip(mine, twin):
                torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_a_compile_failure_on_a_packs_first_step_falls_back_to_eager(tiny, smollm, data_dir, monkeypatch, caplog):
    import harness.compiling as compiling
    from harness.compiling import repeated_blocks

    def broken(*args, **kwargs):
        raise RuntimeError("BackendCompilerFailed: simulated")

    def compile_broken(model, mode=None):  # the first call of a compiled block raises, as a compiler failure does
        blocks = repeated_blocks(model)
        for block in blocks:
            block._compiled_call_impl = broken
        return blocks

    monkeypatch.setattr(compiling, "compile_blocks", compile_broken)
    settings = training_settings("ia3", "quick", {"steps": 2, "batch_size": 2, "lr": 3e-2, "warmup_ratio": 0.0})
    members = _members(data_dir)[:2]
    losses = []
    for compile_ in ("on", "off"):
        base = copy.deepcopy(tiny)
        initial = [group_initial_tensors(base, "ia3", settings, m.seed) for m in members]
        model = apply_method(base, "ia3", settings)
        packed = PackedAdapters(model, initial)
        outcomes = train_packed(model, smollm.tokenizer, packed, members, settings, method="ia3", compile=compile_)
        assert not any(o.compiled for o in outcomes) and all(o.steps == 2 for o in outcomes)
        assert all(block._compiled_call_impl is None for block in repeated_blocks(model))
        losses.append([o.losses for o in outcomes])
    assert losses[0] == losses[1]
    assert "torch.compile failed (RuntimeError: BackendCompilerFailed: simulated); training the pack eagerly" \
        in caplog.text


@pytest.mark.slow
def test_packed_tfew_on_the_real_model_equals_separate_training(smollm):
    """The embedded SmolLM2-135M (float32, CPU): three T-Few groups (seeds 0, 1, 32: each its own draws of
    templates and order) on cb's two shortest training rows, two steps."""
    settings = training_settings("tfew", "quick", {"steps": 2, "batch_size": 1, "lr": 1e-2, "warmup_ratio": 0.0})
    cb = load_task("cb")
    members = [PackMember(cb, SHORT_CB, seed) for seed in (0, 1, 32)]
    tok = smollm.tokenizer
    prompts = [cb.render(cb.template("gpt3_style"), ex) for ex in SHORT_CB]
    alone = []
    for m in members:
        torch.manual_seed(m.seed)
        model = apply_method(copy.deepcopy(smollm.model), "tfew", settings)
        stats = train(model, tok, m.train_examples, m.task, settings, m.seed, method="tfew")
        alone.append((stats.losses, choice_scores(model, tok, prompts)))
        del model
    base = copy.deepcopy(smollm.model)
    initial = [group_initial_tensors(base, "tfew", settings, m.seed) for m in members]
    model = apply_method(base, "tfew", settings)
    packed = PackedAdapters(model, initial)
    outcomes = train_packed(model, tok, packed, members, settings, method="tfew")
    model.eval()
    for g, (out, (losses, scores)) in enumerate(zip(outcomes, alone)):
        assert out.losses == pytest.approx(losses, rel=1e-5, abs=1e-5)
        packed.load_group(g)
        got = choice_scores(model, tok, prompts)
        assert (got - scores).abs().max().item() < 1e-4
        assert_scores_moved(got, choice_scores(smollm.model, tok, prompts))


def test_a_diverging_group_fails_alone(tiny, smollm, data_dir):
    settings = training_settings("ia3", "quick", {"steps": 2, "batch_size": 2, "lr": 3e-2, "warmup_ratio": 0.0})
    members = _members(data_dir)
    base = copy.deepcopy(tiny)
    initial = [group_initial_tensors(base, "ia3", settings, m.seed) for m in members]
    initial[1][0].fill_(float("nan"))  # group 1's first vector: its loss is NaN from the first step
    model = apply_method(base, "ia3", settings)
    packed = PackedAdapters(model, initial)
    outcomes = train_packed(model, smollm.tokenizer, packed, members, settings, method="ia3")
    assert isinstance(outcomes[1], TrainingDiverged) and outcomes[1].step == 0
    torch.manual_seed(members[2].seed)
    twin = apply_method(copy.deepcopy(tiny), "ia3", settings)
    stats = train(twin, smollm.tokenizer, members[2].train_examples, members[2].task, settings, members[2].seed,
                  method="ia3")
    assert outcomes[0].steps == outcomes[2].steps == 2
    assert outcomes[2].losses == pytest.approx(stats.losses, rel=1e-5, abs=1e-5)


def test_what_packs():
    assert pack_refusal("ia3", {}) is None and pack_refusal("tfew", {}) is None
    assert pack_refusal("lora", {"dropout": 0.0}) is None
    assert "dropout" in pack_refusal("lora", {"dropout": 0.1})
    assert pack_refusal("ln_tuning", {}) is None and pack_refusal("prompt_tuning", {}) is None
    assert "no packed trainer" in pack_refusal("bitfit", {})


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_pack_must_be_a_positive_integer(value):
    result = CliRunner().invoke(main, ["run", "--methods", "ia3", "--tasks", "cb", "--pack", value])
    assert result.exit_code == 2
    assert "--pack" in result.output and len(result.output.strip().splitlines()) == 1


def test_pack_needs_the_local_executor():
    result = CliRunner().invoke(main, ["run", "--methods", "ia3", "--tasks", "cb", "--executor", "ray", "--pack", "2"])
    assert result.exit_code == 2 and "--pack needs --executor local" in result.output


def _stored(store: Store) -> dict:
    runs = {r["run_id"]: r for r in store.runs()}
    examples = {}
    for e in store.examples(list(runs)):
        examples.setdefault(e["run_id"], []).append([c["logprob"] for c in e["choices"]])
    return {rid: (r["status"], r["accuracy"], r.get("loss_last"), examples.get(rid)) for rid, r in runs.items()}


def _args(tmp_path, data_dir, methods: str) -> list[str]:
    config = tmp_path / "tiny" / "config.json"
    config.parent.mkdir(exist_ok=True)
    config.write_text(json.dumps(TINY))
    return ["run", "--methods", methods, "--tasks", "cb", "--seeds", "0,1", "--templates", "gpt3_style",
            "--preset", "quick", "--steps", "3", "--method-args", "warmup_ratio=0", "--lr", "0.03",
            "--train-batch-size", "2", "--limit", "4", "--model", f"random:{config}", "--device", "cpu",
            "--data-dir", str(data_dir), "--quiet"]


def _same_runs(one: dict, two: dict) -> None:
    assert set(one) == set(two)  # the same run ids
    for rid, (status, accuracy, loss, scores) in one.items():
        status2, accuracy2, loss2, scores2 = two[rid]
        assert status == status2 == "finished"
        assert accuracy == accuracy2
        assert loss == pytest.approx(loss2, rel=1e-5, abs=1e-5)
        assert torch.allclose(torch.tensor(scores), torch.tensor(scores2), atol=1e-4)


@pytest.mark.slow
def test_packs_in_worker_processes_store_what_one_process_stores(tmp_path, data_dir):
    """``--pack 2 --workers 2``: the two packs (ia3, lora) train in spawned processes (harness.parallel.run_packs)."""
    args = _args(tmp_path, data_dir, "ia3,lora")
    stored = {}
    for name, extra in (("serial", ["--pack", "1"]), ("workers", ["--pack", "2", "--workers", "2"])):
        store = tmp_path / f"{name}.sqlite"
        result = CliRunner().invoke(main, args + ["--store", str(store)] + extra, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        stored[name] = Store(store)
    _same_runs(_stored(stored["serial"]), _stored(stored["workers"]))
    assert {(r["env"].get("pack"), r["env"].get("workers")) for r in stored["workers"].runs()} == {(2, 2)}


def test_cli_pack_2_stores_what_pack_1_stores(tmp_path, data_dir, caplog):
    args = _args(tmp_path, data_dir, "ia3,lora,ln_tuning,prompt_tuning,prefix_tuning")
    stored = {}
    for pack in (1, 2):
        store = tmp_path / f"pack{pack}.sqlite"
        with caplog.at_level("INFO", logger="harness"):
            result = CliRunner().invoke(main, args + ["--store", str(store), "--pack", str(pack)],
                                        catch_exceptions=False)
        assert result.exit_code == 0, result.output
        stored[pack] = Store(store)
    assert "not packed: prefix_tuning has no packed trainer" in caplog.text
    one, two = _stored(stored[1]), _stored(stored[2])
    assert len(one) == 10
    _same_runs(one, two)
    packs = {r["method"]: r["env"].get("pack") for r in stored[2].runs()}
    assert packs == {"ia3": 2, "lora": 2, "ln_tuning": 2, "prompt_tuning": 2, "prefix_tuning": None}
    # the packed adapters were saved as the unpacked run saves them: the same files
    for r in stored[2].runs():
        if r["env"].get("pack"):
            assert sorted(p.name for p in Path(r["artifact_path"]).iterdir()) == \
                ["README.md", "adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("scale_parameter", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("repeats", [1, 3])
def test_sliced_adafactor_updates_each_slice_as_transformers_adafactor(scale_parameter, weight_decay, repeats):
    """Each group's slices as its own transformers Adafactor after clipping per group; with repeats, tensors of one
    shape are stacked into one pass (the optimizer's and the clipping's buckets)."""
    from transformers.optimization import Adafactor

    from harness.packed_optim import SlicedAdafactor, clip_per_group

    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 1), (1, 5), (4, 3), (7,)] * repeats  # IA3's 2-D vectors, a LoRA-like matrix, a 1-D tensor
    n = 3
    alone = [[torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes] for _ in range(n)]
    stacked = [torch.nn.Parameter(torch.stack([alone[g][i].detach() for g in range(n)]).clone())
               for i in range(len(shapes))]
    options = dict(lr=1e-2, weight_decay=weight_decay, scale_parameter=scale_parameter)
    references = [Adafactor(params, relative_step=False, warmup_init=False, **options) for params in alone]
    sliced = SlicedAdafactor(stacked, **options)
    for _ in range(4):
        grads = [[torch.randn(s, generator=gen) * 3 for s in shapes] for _ in range(n)]
        for g in range(n):
            for p, grad in zip(alone[g], grads[g]):
                p.grad = grad.clone()
            torch.nn.utils.clip_grad_norm_(alone[g], 1.0)
            references[g].step()
        for i, p in enumerate(stacked):
            p.grad = torch.stack([grads[g][i] for g in range(n)])
        clip_per_group(stacked, 1.0)
        sliced.step()
        for i, p in enumerate(stacked):
            for g in range(n):
                torch.testing.assert_close(p[g].detach(), alone[g][i].detach(), rtol=1e-6, atol=1e-7)


def test_clip_per_group_equals_clip_grad_norm_of_each_group_bit_for_bit():
    """Gradients bucketed by shape, their norms put back in the parameters' order: each group's norm and clipped
    gradients are exactly what ``clip_grad_norm_`` gives that group alone (CPU float32)."""
    from harness.packed_optim import clip_per_group

    gen = torch.Generator().manual_seed(1)
    shapes = [(3, 12, 1), (3, 7), (3, 12, 1), (3, 1, 20), (3, 7)] * 4  # shapes interleaved: buckets reorder them
    stacked = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for p in stacked:
        p.grad = torch.randn(p.shape, generator=gen) * 5
    alone = [[torch.nn.Parameter(torch.zeros(s[1:])) for s in shapes] for _ in range(3)]
    for g, params in enumerate(alone):
        for p, q in zip(params, stacked):
            p.grad = q.grad[g].clone()
    norms = clip_per_group(stacked, 1.0)
    for g, params in enumerate(alone):
        assert torch.equal(norms[g], torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=False))
        assert all(torch.equal(p.grad, q.grad[g]) for p, q in zip(params, stacked))


def test_sliced_step_ops_do_not_grow_with_tensors_of_one_shape():
    """The packed optimizer and clipping of SmolLM2-like (IA)3 vectors (keys and values [N, d, 1], feed-forward
    [N, 1, d']) take as many ops for 30 layers as for 2: one pass per shape, not per tensor."""
    from tests.test_optim import OpCounter

    from harness.packed_optim import SlicedAdafactor, clip_per_group

    def ops_per_step(layers: int) -> int:
        stacked = [torch.nn.Parameter(torch.randn(s)) for s in [(3, 12, 1), (3, 12, 1), (3, 1, 20)] * layers]
        opt = SlicedAdafactor(stacked, lr=1e-2, weight_decay=0.0, scale_parameter=True)
        for _ in range(2):  # the first step makes the state
            for p in stacked:
                p.grad = torch.randn_like(p)
            with OpCounter() as counter:
                clip_per_group(stacked, 1.0)
                opt.step()
        return sum(counter.ops.values())

    assert ops_per_step(2) == ops_per_step(30)


def test_group_losses_equal_each_groups_own_losses():
    """The packed loss (all groups' losses in one computation, :mod:`harness.packed_losses`) equals
    ``LOSS_FUNCTIONS`` on each group's prompts alone, gradients included; groups of unequal sizes, a group whose
    prompts have fewer choices (a padded, empty choice) and masked tokens."""
    from harness.packed_losses import group_losses
    from harness.training import LOSS_FUNCTIONS

    gen = torch.Generator().manual_seed(0)
    B, C, T = 7, 3, 5
    logits = torch.randn(B, C, T, generator=gen).requires_grad_()
    mask = torch.rand(B, C, T, generator=gen) > 0.3
    mask[:, :, 0] = True
    mask[4:, 2] = False  # the last group's prompts have two choices
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    labels = torch.tensor([0, 2, 1, 0, 2, 1, 0])
    names = ("lm", "ul", "ln")
    lp = torch.nn.functional.logsigmoid(logits) * mask  # [B, C, T] log-probabilities, 0 where masked
    packed = group_losses(names, lp, mask, labels, groups, 3)  # [3, G]
    grad_packed, = torch.autograd.grad(packed.sum(), logits, retain_graph=True)
    grad_alone = torch.zeros_like(logits)
    for g in range(3):
        rows = groups == g
        for k, name in enumerate(names):
            alone = LOSS_FUNCTIONS[name](lp[rows], mask[rows], labels[rows])
            torch.testing.assert_close(packed[k, g], alone, rtol=1e-6, atol=1e-7)
            grad_alone += torch.autograd.grad(alone, logits, retain_graph=True)[0]
    torch.testing.assert_close(grad_packed, grad_alone, rtol=1e-5, atol=1e-7)
