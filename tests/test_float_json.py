"""harness.float_json: float32 values written short and read back to the same float32; others kept bit for bit."""

from __future__ import annotations

import json
import math
import sqlite3

import numpy
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


def test_ties_and_order_survive_and_float32_gives_the_original_back():
    a = float(torch.tensor(-1.2345678, dtype=torch.float32))
    b = float(torch.nextafter(torch.tensor(a, dtype=torch.float32), torch.tensor(0.0)))  # the next float32 up
    assert compact_float(a) < compact_float(b) and compact_float(a) == compact_float(a)
    back = json.loads(json.dumps(compact([a, b, a])))
    assert [float(numpy.float32(v)) for v in back] == [a, b, a]


def test_compact_store_rewrites_a_store_without_changing_a_float32(tmp_path):
    from benchmarks.compact_store import main

    store = Store(tmp_path / "s.sqlite")
    lps = [float(torch.tensor(v, dtype=torch.float32)) for v in (-1.2345678, -0.1, -7.0)]
    store.write(RunResult("r", {"task": "cb"}, "finished", {"accuracy": 1.0, "n_eval": 1},
                          [ExampleScore("e", 1, lps, [1, 1, 1], [3, 3, 3])], extra={"losses": lps, "wall": math.pi}))
    main(str(tmp_path / "s.sqlite"))
    row = next(store.examples(["r"]))
    assert [float(numpy.float32(c["logprob"])) for c in row["choices"]] == lps and row["prediction"] == 1
    run = store.get_run("r")
    assert [float(numpy.float32(v)) for v in run["losses"]] == lps and run["wall"] == math.pi
    text = sqlite3.connect(tmp_path / "s.sqlite").execute("SELECT logprobs_json FROM examples").fetchone()[0]
    assert text == "[-1.2345678, -0.1, -7.0]"
