"""Non-finite scores fail the run: a NaN or infinite log-prob (a bf16 overflow) never becomes a prediction."""

from __future__ import annotations

import math
import types

import pytest

from harness.errors import HarnessError
from harness.scoring import argmax_first, metrics_from_examples
from harness.store import ExampleScore, RunResult, Store


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_argmax_first_raises_on_non_finite(bad):
    with pytest.raises(HarnessError, match=r"non-finite log-prob .* example 'ex9', choice 1"):
        argmax_first([-5.0, bad, -1.0], example_id="ex9")
    with pytest.raises(HarnessError, match="choice 0"):
        argmax_first([bad, -5.0])


def test_argmax_first_ties_and_order():
    assert argmax_first([-1.0, -1.0, -2.0]) == 0 and argmax_first([-3.0, -1.0, -1.0]) == 1
    assert argmax_first([]) == 0


@pytest.mark.parametrize("prop", ["prediction", "prediction_norm", "prediction_norm_char"])
def test_every_prediction_names_the_example_and_choice(prop):
    ex = ExampleScore("cb-17", 0, [-1.0, -2.0, math.nan], [1, 1, 2], [4, 5, 7])
    with pytest.raises(HarnessError, match=r"example 'cb-17', choice 2"):
        getattr(ex, prop)


def test_metrics_from_examples_fails_on_a_planted_nan():
    good = [ExampleScore(str(i), 0, [-1.0, -2.0], [1, 1], [3, 2]) for i in range(5)]
    bad = ExampleScore("rte-3", 1, [math.nan, -0.5], [1, 1], [3, 2])
    assert metrics_from_examples(good)["accuracy"] == 1.0
    with pytest.raises(HarnessError, match=r"example 'rte-3', choice 0"):
        metrics_from_examples(good[:2] + [bad] + good[2:])


def test_accuracy_norm_char_divides_by_characters_without_delimiter():
    # summed: choice 0 (-2.0 > -3.0); per token (1 vs 3 tokens): choice 1 (-1.0 > -2.0); per character
    # (2 vs 10 characters): choice 1 (-0.3 > -1.0)
    ex = ExampleScore("x", 1, [-2.0, -3.0], [1, 3], [2, 10])
    assert (ex.prediction, ex.prediction_norm, ex.prediction_norm_char) == (0, 1, 1)
    ex = ExampleScore("y", 1, [-2.0, -3.0], [1, 3], [4, 5])  # per char: -0.5 vs -0.6 -> 0
    assert (ex.prediction, ex.prediction_norm, ex.prediction_norm_char) == (0, 1, 0)
    m = metrics_from_examples([ex])
    assert (m["accuracy"], m["accuracy_norm"], m["accuracy_norm_char"]) == (0.0, 1.0, 0.0)
    assert metrics_from_examples([])["accuracy_norm_char"] is None


def test_store_refuses_a_finished_run_with_nan_but_keeps_a_failed_one(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    exs = [ExampleScore("a", 0, [-1.0, -2.0], [1, 1], [1, 1]), ExampleScore("b", 1, [-1.0, math.inf], [1, 1], [1, 1])]
    with pytest.raises(HarnessError, match="example 'b', choice 1"):
        store.write(RunResult("r1", {"task": "cb"}, "finished", {"accuracy": 1.0}, exs))
    assert store.runs() == []
    store.write(RunResult("r1", {"task": "cb"}, "failed", {}, exs, error="HarnessError: non-finite"))
    rows = list(store.examples(["r1"]))
    assert [r["prediction"] for r in rows] == [0, -1] and math.isinf(rows[1]["choices"][1]["logprob"])


def test_icl_runner_records_a_nan_score_as_a_failed_run(monkeypatch, data_dir):
    """The runner's own exception handling turns the planted NaN into a failed row that names the example."""
    from harness import icl_runner
    from harness.scoring import ScoreOutput
    from harness.spec import RunSpec

    def fake_score(lm, prompts, prefix, use_cache, batch_size, progress, reuse=None):
        exs = [ExampleScore(p.example_id, p.label, [-1.0] * len(p.choices), [1] * len(p.choices),
                            [len(c) for c in p.choices]) for p in prompts]
        exs[1].logprobs[0] = math.nan
        return ScoreOutput(exs, [], None, 0)

    monkeypatch.setattr(icl_runner, "_score_with_backoff", fake_score)
    monkeypatch.setattr(icl_runner, "fit_demonstrations", lambda lm, task, template, demos, prompts, labels=None: ("", 0))
    import torch

    monkeypatch.setattr(icl_runner.costs.ModelDims, "from_model", staticmethod(lambda model: None))
    lm = types.SimpleNamespace(device=torch.device("cpu"), is_random=False, model=None)
    spec = RunSpec(task="cb", method="zeroshot", template="gpt3_style", seed=0, k=0, model="m", limit=4)
    result = icl_runner.run_icl(lm, spec, data_dir)
    assert result.status == "failed" and "non-finite log-prob nan" in result.error
    assert "choice 0" in result.error and result.examples == []
