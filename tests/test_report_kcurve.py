"""Report sections of issue 15: ICL accuracy per k (a k-curve) and calibrated accuracies, present only when the
store holds such runs (the existing report is otherwise unchanged)."""

from __future__ import annotations

import hashlib
import json

from harness.report.document import report_tables
from harness.report.format import to_markdown
from harness.report.plots import plot_icl_vs_k
from harness.report.tables import calibration_table, k_curve_table, select_runs
from harness.store import ExampleScore, RunResult, Store

N = 10


def _write(store, method, k, n_correct, calibrated=None, mutual_info=None, template="t0"):
    config = {"task": "cb", "method": method, "model": "m", "template": template, "seed": 0, "k": k,
              "preset": "quick", "limit": None, "dtype": "float32", "device": "cpu", "kv_cache": True,
              "calibrate": calibrated is not None}
    run_id = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    examples = [ExampleScore(f"e{i}", 0, [-1.0, -2.0] if i < n_correct else [-2.0, -1.0], [1, 1], [3, 3])
                for i in range(N)]
    metrics = {"n_eval": N, "accuracy": n_correct / N, "accuracy_norm": n_correct / N,
               "accuracy_norm_char": n_correct / N, "infer_flops_per_example": 1e9 * (k + 1), "k_used": k}
    if calibrated is not None:
        metrics |= {"accuracy_calibrated": calibrated, "accuracy_mutual_info": mutual_info,
                    "calibration_flops_per_example": 1e8}
    store.write(RunResult(run_id, config, "finished", metrics, examples))


def test_sections_only_with_such_runs(tmp_path):
    plain = Store(tmp_path / "plain.sqlite")
    _write(plain, "icl", 32, 5)
    _write(plain, "zeroshot", 0, 3)
    runs = select_runs(plain.runs())
    assert k_curve_table(runs) is None and calibration_table(runs) is None
    assert len(report_tables(runs)) == 5  # summary, task, cost, break-even, methods by family

    curve = Store(tmp_path / "curve.sqlite")
    for k, c in ((0, 3), (1, 4), (4, 6), (8, 7)):
        _write(curve, "icl", k, c, calibrated=(c + 1) / N, mutual_info=(c + 2) / N)
    runs = select_runs(curve.runs())
    table = k_curve_table(runs)
    assert [row[2] for row in table.rows] == ["0", "1", "4", "8"]
    assert [row[3] for row in table.rows] == ["30.0", "40.0", "60.0", "70.0"]
    cal = calibration_table(runs)
    assert [(r[2], r[3], r[4], r[5]) for r in cal.rows] == [
        ("icl k=0", "30.0", "40.0", "50.0"), ("icl k=1", "40.0", "50.0", "60.0"),
        ("icl k=4", "60.0", "70.0", "80.0"), ("icl k=8", "70.0", "80.0", "90.0")]
    text = "\n".join(to_markdown(t) for t in report_tables(runs))
    assert "number of demonstrations k" in text and "Calibrated accuracy per task and method" in text
    plot = plot_icl_vs_k(runs, tmp_path / "plots")
    assert plot.paths and not plot.notes
