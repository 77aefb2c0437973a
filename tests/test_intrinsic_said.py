"""Intrinsic SAID (harness.methods.intrinsic_said): the Fastfood projection is linear, orthonormal where it should
be and seeded; the method starts at the base model, trains, merges, and reloads to the same scores.

Units on a tiny random llama (milliseconds); one test on the real SmolLM2-135M (a few seconds on a quiet CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import SHORT_CB, choice_scores
from harness.errors import HarnessError
from harness.methods import apply_method, get_method, method_config, method_overhead, training_settings
from harness.methods.intrinsic_said import _state_cls, fastfood_size, fwht, merge, plan, trainable_params


def _tiny(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def _settings(args: str = "intrinsic_dim=300") -> dict:
    return training_settings("intrinsic_said", "quick", {"method_args": args})


def test_fwht_is_the_orthonormal_sylvester_hadamard():
    n = 64  # two factors: 32 and 2
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ h / n ** 0.5)
    y = torch.randn(2, 4096, dtype=torch.float64)
    assert torch.allclose(fwht(fwht(y)), y)  # orthonormal and symmetric
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.zeros(48))


def test_fastfood_is_linear_norm_preserving_and_seeded():
    sizes = [1152, 576, 2112]
    state = _state_cls()(sizes, 1000, 7, "cpu")
    assert state.signs.shape == (3, fastfood_size(1000, 2112)) == (3, 4096)

    def project(v):
        with torch.no_grad():
            state.theta.copy_(v)
            return state.project()

    a, b = torch.randn(1000, dtype=torch.float64).float(), torch.randn(1000).float()
    assert torch.allclose(project(2 * a - 3 * b), 2 * project(a) - 3 * project(b), atol=1e-4)
    pa, pb = project(a), project(b)
    for i, d in enumerate(sizes):
        assert (pa[i, :d].norm() / a.norm()).item() == pytest.approx(1.0, abs=0.12)  # T-Few's normalisation
        cos = (pa[i, :d] @ pb[i, :d]) / (pa[i, :d].norm() * pb[i, :d].norm())
        assert abs(cos.item()) < 0.15  # independent inputs stay near-orthogonal
    again, other = _state_cls()(sizes, 1000, 7, "cpu"), _state_cls()(sizes, 1000, 8, "cpu")
    for name in ("signs", "perms", "gauss", "scale"):
        assert torch.equal(getattr(state, name), getattr(again, name))
    assert not torch.equal(state.perms, other.perms)


def test_config_and_targets_are_validated():
    with pytest.raises(HarnessError, match="intrinsic_dim must be an integer >= 2"):
        _settings("intrinsic_dim=1")
    with pytest.raises(HarnessError, match="projection_seed"):
        _settings("projection_seed=-1")
    model = _tiny()
    with pytest.raises(HarnessError, match="no vector"):
        apply_method(copy.deepcopy(model), "intrinsic_said", _settings("intrinsic_dim=300,targets=q_proj|v_proj"))
    with pytest.raises(HarnessError, match="must exceed the number of adapted tensors"):
        apply_method(copy.deepcopy(model), "intrinsic_said", _settings("intrinsic_dim=10"))
    with pytest.raises(HarnessError, match="embedding"):
        apply_method(copy.deepcopy(model), "intrinsic_said", _settings("intrinsic_dim=300,targets=lm_head"))
    info = get_method("intrinsic_said")
    assert info.family == "reparametrization" and info.merges and info.artifact == "tensors"
    assert not info.trains_model_dtype  # theta and the lambdas are float32 on any model


def test_starts_at_the_base_model_counts_its_parameters_and_merges():
    base = _tiny()
    settings = _settings()
    model = apply_method(copy.deepcopy(base), "intrinsic_said", settings)
    targets = plan(base, method_config("intrinsic_said", settings))
    assert len(targets) == 2 * 9 + 1  # 7 projections + 2 norms per layer, the final norm; no embedding
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"intrinsic_said.theta": 300 - 19, "intrinsic_said.lambdas": 19}
    assert trainable_params(base, method_config("intrinsic_said", settings)) == 300
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)  # theta = 0: no change at all
        model.intrinsic_said.theta.normal_(0, 0.3)
        model.intrinsic_said.lambdas.uniform_(0.5, 1.5)
        moved = model(ids).logits
    assert (moved - base(ids).logits).abs().max() > 1e-3
    merged = copy.deepcopy(model)
    merge(merged)
    assert not any(n.startswith("intrinsic_said") for n, _ in merged.named_parameters())
    assert all(not hasattr(m, "parametrizations") for m in merged.modules())
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, moved, atol=1e-5)  # the hooks compute the merged weights
    ov = method_overhead(model, "intrinsic_said", settings)
    assert ov.per_token == 0 and ov.train_per_token > 0 and ov.train_per_forward > 0


@pytest.mark.slow
def test_trains_on_smollm_and_reloads_to_the_same_scores(smollm, cb, tmp_path):
    from harness import costs
    from harness.methods.artifacts import load_trained, save_trained
    from harness.training import train

    settings = training_settings("intrinsic_said", "quick", {"steps": 2, "batch_size": 1, "n_train": 1,
                                                             "warmup_ratio": 0.0, "train_template": "gpt3_style"})
    prompts = [cb.render(cb.template("gpt3_style"), SHORT_CB[0])]
    base_scores = choice_scores(smollm.model, smollm.tokenizer, prompts)
    model = apply_method(copy.deepcopy(smollm.model), "intrinsic_said", settings)
    assert torch.equal(choice_scores(model, smollm.tokenizer, prompts), base_scores)
    stats = train(model, smollm.tokenizer, SHORT_CB[:1], cb, settings, seed=0, method="intrinsic_said")
    assert stats.losses[0] != stats.losses[-1] and stats.forwards == 2
    assert stats.overhead_flops == 3 * 2 * method_overhead(model, "intrinsic_said", settings).train_per_forward + \
        3 * method_overhead(model, "intrinsic_said", settings).train_per_token * stats.work.tokens
    model.eval()
    trained = choice_scores(model, smollm.tokenizer, prompts)
    assert (trained - base_scores).abs().max() > 1e-3
    info = get_method("intrinsic_said")
    folder = save_trained(model, info, tmp_path / "said")
    assert costs.directory_bytes(folder) < 100_000  # 20,000 float32 + the seed + the header
    fresh = apply_method(copy.deepcopy(smollm.model), "intrinsic_said", settings)
    reloaded = load_trained(fresh, info, folder)
    assert torch.equal(choice_scores(reloaded, smollm.tokenizer, prompts), trained)


def test_a_checkpoint_reloads_only_with_its_projection_seed(tmp_path):
    from harness.methods.artifacts import load_trained, save_trained

    info = get_method("intrinsic_said")
    model = apply_method(_tiny(), "intrinsic_said", _settings())
    with torch.no_grad():
        model.intrinsic_said.theta.normal_()
    folder = save_trained(model, info, tmp_path / "said")
    ids = torch.tensor([[1, 5, 9]])
    same = load_trained(apply_method(_tiny(), "intrinsic_said", _settings()), info, folder)
    with torch.no_grad():
        assert torch.equal(same(ids).logits, model(ids).logits)
    with pytest.raises(HarnessError, match="projection seed"):
        load_trained(apply_method(_tiny(), "intrinsic_said", _settings("intrinsic_dim=300,projection_seed=1")), info,
                     folder)
    with pytest.raises(HarnessError, match="shape"):
        load_trained(apply_method(_tiny(), "intrinsic_said", _settings("intrinsic_dim=400")), info, folder)


def test_bad_arguments_exit_2_before_any_model_loads(tmp_path):
    from click.testing import CliRunner

    from harness.cli import main

    for args, message in (("intrinsic_dim=1", "intrinsic_dim must be an integer >= 2"),
                          ("intrinsic_dims=5", "Did you mean 'intrinsic_dim'")):
        result = CliRunner().invoke(main, ["run", "--methods", "intrinsic_said", "--method-args", args, "--tasks",
                                           "cb", "--preset", "quick", "--store", str(tmp_path / "s.sqlite")])
        assert result.exit_code == 2 and message in result.output, result.output
