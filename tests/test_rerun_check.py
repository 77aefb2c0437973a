"""benchmarks/rerun_check.py: a rerun of stored runs from another code tree passes only when every per-example
log-prob is the same float32; it fails on the real evidence of round 20 (the committed store against the
withdrawn runs of 292a898) and on a single planted ulp."""

from __future__ import annotations

import json
import lzma
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from benchmarks import rerun_check

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "results/paper"


def _plain(xz: Path, dest: Path) -> Path:
    with lzma.open(xz) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return dest


def _rerun_of(store: Path, dest: Path, where: str) -> Path:
    """A fresh store holding copies of STORE's runs matching WHERE (what a rerun of those runs writes)."""
    shutil.copy(store, dest)
    db = sqlite3.connect(dest)
    keep = [r for (r,) in db.execute(f"SELECT run_id FROM runs WHERE {where}")]
    db.execute(f"DELETE FROM examples WHERE run_id NOT IN ({','.join('?' * len(keep))})", keep)
    db.execute(f"DELETE FROM runs WHERE run_id NOT IN ({','.join('?' * len(keep))})", keep)
    db.commit()
    db.close()
    return dest


def test_compare_rows_counts_float32_differences():
    rows = [("[-1.5, -2.25]", 0), ("[-0.1, -3.0]", 0)]
    assert rerun_check.compare_rows(rows, rows) == (2, 0.0, 0)
    # a 17-digit double and its shortest float32 decimal are the same float32 (stores keep either)
    long = json.dumps([float(np.float32(-0.1)), -3.0])
    assert rerun_check.compare_rows(rows, [rows[0], (long, 0)]) == (2, 0.0, 0)
    moved = [rows[0], ("[-3.5, -3.0]", 1)]
    equal, worst, n_moved = rerun_check.compare_rows(rows, moved)
    assert (equal, n_moved) == (1, 1) and abs(worst - 3.4) < 1e-6


def test_round_20s_tree_fails_against_the_committed_store(capsys):
    """The committed SmolLM2 store (round 21's runs, bde8a16) against round 20's runs of the same ids from 292a898
    (8817784's scoring path): the check must fail, and the template whose scoring took no other path must not."""
    assert rerun_check.main([str(PAPER / "smollm2-135m.sqlite.xz"),
                             str(PAPER / "rerun_scoring_path.sqlite.xz")]) == 1
    out = capsys.readouterr().out
    assert "FAIL:" in out
    assert "wsc lokr seed 0 gpt3_style c68fceeaa113: max |d log-prob| 0, rows equal 104/104" in out
    assert "wsc lokr seed 0 does_the_pronoun_refer_to 9ced8ff3f3c3: max |d log-prob| 1.89" in out


def test_a_faithful_rerun_passes_and_one_ulp_fails(tmp_path, capsys):
    store = _plain(PAPER / "smollm2-135m.sqlite.xz", tmp_path / "store.sqlite")
    rerun = _rerun_of(store, tmp_path / "rerun.sqlite", "task='wsc' AND method='lokr' AND seed=0")
    assert rerun_check.main([str(store), str(rerun)]) == 0
    assert "PASS: 4 runs, 416 rows" in capsys.readouterr().out
    assert rerun_check.main([str(rerun), str(store)]) == 0  # the other way round: the store's other runs are noted
    err = capsys.readouterr().err
    assert "are not in" in err and "not compared" in err

    db = sqlite3.connect(rerun)  # plant the smallest possible change: one choice of one example, one float32 ulp
    run_id, position, logprobs = db.execute("SELECT run_id, position, logprobs_json FROM examples "
                                            "ORDER BY run_id, position LIMIT 1").fetchone()
    values = np.asarray(json.loads(logprobs), dtype=np.float32)
    values[0] = np.nextafter(values[0], np.float32(0))
    db.execute("UPDATE examples SET logprobs_json=? WHERE run_id=? AND position=?",
               (json.dumps([float(v) for v in values]), run_id, position))
    db.commit()
    db.close()
    assert rerun_check.main([str(store), str(rerun)]) == 1
    out = capsys.readouterr().out
    assert "rows equal 103/104, predictions moved 0" in out and "FAIL: 1 of 4 runs differ" in out


def test_bad_input_exits_2(tmp_path, capsys):
    store = _plain(PAPER / "smollm2-135m.sqlite.xz", tmp_path / "store.sqlite")
    with pytest.raises(SystemExit) as exit_:
        rerun_check.main([str(store), str(tmp_path / "absent.sqlite.gz")])
    assert exit_.value.code == 2 and "no results store" in capsys.readouterr().err
    other = _rerun_of(store, tmp_path / "none.sqlite", "0")  # no run at all: nothing to compare
    assert rerun_check.main([str(store), str(other)]) == 2
    assert "no run of" in capsys.readouterr().err
