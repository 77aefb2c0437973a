"""--calibrate (issue 15 item 4): contextual calibration (Zhao et al. 2021) and lm-eval's acc_mutual_info, stored
beside the run with what recomputes them by hand; on the real model, CPU, fp32, --limit."""

from __future__ import annotations

import math

import pytest

from harness import api
from harness.calibration import CONTENT_FREE, content_free_example
from harness.errors import HarnessError
from harness.store import Store


def _argmax(values):
    return max(range(len(values)), key=lambda i: (values[i], -i))


def test_calibrated_accuracies_recomputed_by_hand(tmp_path, data_dir, smollm, cb):
    store = Store(tmp_path / "s.sqlite")
    specs = api.plan(["cb"], ["icl", "zeroshot"], k=2, templates=["gpt3_style"], seeds=[0], limit=8,
                     data_dir=data_dir, device="cpu", dtype="float32", calibrate=True)
    results = api.run(specs, store=store, data_dir=data_dir, progress=False, loader=lambda s: smollm)
    assert [r.status for r in results] == ["finished", "finished"], [r.error for r in results]
    for run in store.runs():
        record = run["calibration"]
        assert record["content_free_inputs"] == list(CONTENT_FREE) and len(record["content_free"]) == 3
        # p_cf by hand: softmax over the choices per content-free input, mean, normalized
        probs = []
        for lps in record["content_free"]:
            exps = [math.exp(x) for x in lps]
            probs.append([e / sum(exps) for e in exps])
        mean = [sum(col) / 3 for col in zip(*probs)]
        p_cf = [m / sum(mean) for m in mean]
        assert p_cf == pytest.approx(record["p_cf"], abs=1e-12)
        rows = list(store.examples([run["run_id"]]))
        choices = [" True", " False", " Neither"]  # gpt3_style's continuations (target delimiter " ")
        assert set(record["unconditional"]) == set(choices)
        cal = mi = 0
        for row in rows:
            lps = [c["logprob"] for c in row["choices"]]
            cal += _argmax([lp / 1.0 - math.log(p) for lp, p in zip(lps, p_cf)]) == row["label"]
            mi += _argmax([lp - record["unconditional"][c] for lp, c in zip(lps, choices)]) == row["label"]
        assert run["accuracy_calibrated"] == pytest.approx(cal / len(rows))
        assert run["accuracy_mutual_info"] == pytest.approx(mi / len(rows))
        assert run["calibration_flops_per_example"] > 0
        assert run["infer_flops_per_example"] > 0  # the run's own figure, calibration not in it
    # an uncalibrated plan finds them finished; a calibrated plan reruns a run stored without calibration
    plain = api.plan(["cb"], ["zeroshot"], templates=["gpt3_style"], seeds=[0], limit=8, data_dir=data_dir,
                     device="cpu", dtype="float32")
    assert plain[0].run_id == specs[1].run_id  # calibrate is not part of the run id
    assert api.run(plain, store=store, data_dir=data_dir, progress=False, loader=lambda s: smollm) == []
    other = Store(tmp_path / "t.sqlite")
    api.run(plain, store=other, data_dir=data_dir, progress=False, loader=lambda s: smollm)
    again = api.run(specs[1:], store=other, data_dir=data_dir, progress=False, loader=lambda s: smollm)
    assert len(again) == 1 and other.runs()[0]["accuracy_calibrated"] is not None and len(other.runs()) == 1


def test_content_free_example_keeps_id_label_and_choices(cb):
    row = {"premise": "p", "hypothesis": "h", "idx": 3, "label": 1}
    assert content_free_example(cb, row, "N/A") == {"premise": "N/A", "hypothesis": "N/A", "idx": 3, "label": 1}


def test_calibrate_validated_before_any_model_loads(data_dir):
    with pytest.raises(HarnessError, match="--calibrate applies to in-context runs"):
        api.plan(["cb"], ["lora"], calibrate=True, data_dir=data_dir, limit=2, seeds=[0])
