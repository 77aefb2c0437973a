"""docs/results.md is what the committed result stores generate: a golden-file test of the published numbers.

Everything below docs/results.md's marker line is written by ``benchmarks/results_doc.sh`` from
``results/paper/*.sqlite.xz``; a stale table (a store updated without regenerating the doc, or a report change
that moves a published figure) or a broken generator fails here. The script regenerates into a copy of the doc
(its hand-written header kept), and the copy must equal the committed file byte for byte.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("xz") is None, reason="the committed stores are .xz")
def test_committed_results_doc_is_what_the_committed_stores_generate(tmp_path):
    doc = tmp_path / "results.md"
    shutil.copy(ROOT / "docs/results.md", doc)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "DOC": str(doc), "PLOTS": str(tmp_path / "plots"), "PYTHON": sys.executable,
           "HARNESS": str(bin_dir / "harness"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", "benchmarks/results_doc.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(
        p.name for p in (ROOT / "docs/results/plots").iterdir())
    assert not (tmp_path / "results.md.new").exists()
    expected, got = (ROOT / "docs/results.md").read_text(), doc.read_text()
    if got != expected:
        diff = [f"line {i + 1}:\n- {a}\n+ {b}" for i, (a, b) in
                enumerate(zip(expected.splitlines(), got.splitlines())) if a != b][:5]
        pytest.fail("docs/results.md is not what `bash benchmarks/results_doc.sh` generates from the committed "
                    "stores (run it and commit the result):\n" + "\n".join(diff))
