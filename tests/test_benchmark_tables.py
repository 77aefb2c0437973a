"""benchmarks.tables renders the recorded benchmark JSON; a run whose identity check did not finish prints no
empty identity table."""

from __future__ import annotations

import json

from benchmarks import tables

ROW = {"model": "t0-3b", "k": 0, "path": "cached", "prefix_tokens": 0, "seconds": 1.0, "examples_per_s": 9.0,
       "speedup_vs_naive": 2.0, "speedup_vs_lmeval": 2.0, "peak_gib": 1.0, "memory_vs_naive": 1.0, "tflops": 1.0,
       "agree_vs_naive": 1.0, "max_abs_dlogprob_vs_naive": 0.0}
IDENTITY = {"model": "t0-3b", "k": 32, "n": 8, "identical": True,
            **{p: {"agree": 1.0, "max_abs_dlogprob": 1e-6} for p in ("cached_shared", "cached_copy", "lmeval")}}


def _render(tmp_path, capsys, identity: list) -> str:
    (tmp_path / "icl_t5.json").write_text(json.dumps({"results": [ROW], "identity": identity}))
    tables.main(["--results", str(tmp_path)])
    return capsys.readouterr().out


def test_t5_identity_table_only_when_the_check_ran(tmp_path, capsys):
    without = _render(tmp_path, capsys, [])
    assert "| t0-3b | 0 | cached |" in without
    assert "cached (shared prefix)" not in without
    with_rows = _render(tmp_path, capsys, [IDENTITY])
    assert "| t0-3b | 32 | 8 | 100% / 1.0e-06 |" in with_rows
