"""harness.float_json: float32 values written short and read back to the same float32; others kept bit for bit."""

from __future__ import annotations

import json
import math

import torch

from harness.float_json import compact, compact_float
from harness.store import ExampleScore, RunResult, Store


def test_float32_values_get_their_shortest_decimal_and_keep_their_value():
    values = torch.randn(2000, dtype=torch.float32).mul(30).tolist() + [0.1, -1e-30, 3.4e38, 0.0, -0.0]
    values = [float(torch.tensor(v, dtype=torch.float32)) for v in values]  # all float32-exact doubles
    out = compact(values)
    for x, y in zip(values, out):
        assert torch.tensor(y, dtype=torch.float32).item() == x  # the same float32
    assert len(json.dumps(out)) < 0.7 * len(json.dumps(values))
    assert json.dumps(compact([0.10000000149011612])) == "[0.1]"


def test_other_doubles_and_non_finite_values_are_kept_exactly():
    for x in (0.1, math.pi, 1e-310, -2.0 / 3.0):
        assert compact_float(x) == x and repr(compact_float(x)) == repr(x)
    assert compact_float(math.inf) == math.inf and math.isnan(compact_float(math.nan))
    assert compact({"losses": [1, "a", None, True], "n": 3}) == {"losses": [1, "a", None, True], "n": 3}


def test_ties_and_order_survive(tmp_path):
    a = float(torch.tensor(-1.2345678, dtype=torch.float32))
    b = float(torch.nextafter(torch.tensor(a, dtype=torch.float32), torch.tensor(0.0)))  # the next float32 up
    assert compact_float(a) < compact_float(b) and compact_float(a) == compact_float(a)
    store = Store(tmp_path / "s.sqlite")
    ex = ExampleScore("e", 1, [a, b, a], [1, 1, 1], [3, 3, 3])
    store.write(RunResult("r", {"task": "cb"}, "finished", {"accuracy": 1.0, "n_eval": 1},
                          [ex], extra={"losses": [a, b]}))
    row = next(store.examples(["r"]))
    stored = [float(torch.tensor(c["logprob"], dtype=torch.float32)) for c in row["choices"]]
    assert row["prediction"] == 1 and stored == [a, b, a]
    assert [float(torch.tensor(v, dtype=torch.float32)) for v in store.get_run("r")["losses"]] == [a, b]
