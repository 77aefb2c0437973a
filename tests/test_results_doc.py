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


def _cell_count(part: str) -> int:
    """``20 + 20`` -> 40, ``20 (+w)`` -> 20, ``-`` -> 0: the integers of a coverage cell outside parentheses."""
    import re

    return sum(int(n) for n in re.findall(r"\d+", re.sub(r"\([^)]*\)", "", part)))


def test_the_hand_written_coverage_table_matches_the_committed_stores(tmp_path):
    """docs/results.md's header is written by hand, so the golden test above cannot see it go stale (session 38
    found it at 2,100 runs with round 25's wic cells missing while the stores held 2,240). Its "Covered" line and
    every cell of its runs-per-cell table (SmolLM2 / Gemma 3, finished runs per method and task) must be the
    committed stores' counts."""
    import lzma
    import re
    import sqlite3

    counts = {}  # (model, method, task) -> finished runs
    for name in ("smollm2-135m", "gemma3-270m"):
        store = tmp_path / f"{name}.sqlite"
        with lzma.open(ROOT / f"results/paper/{name}.sqlite.xz") as src, open(store, "wb") as dst:
            shutil.copyfileobj(src, dst)
        db = sqlite3.connect(store)
        for method, task, n in db.execute("SELECT method, task, COUNT(*) FROM runs WHERE status = 'finished' "
                                          "GROUP BY method, task"):
            counts[name, method, task] = n
        db.close()
    text = (ROOT / "docs/results.md").read_text()
    header = text[:text.index("## When does PEFT beat in-context learning?")]
    total = {m: sum(n for (model, _, _), n in counts.items() if model == m) for m in ("smollm2-135m", "gemma3-270m")}
    covered = re.search(r"\*\*Covered: ([\d,]+) finished runs reported \(SmolLM2 ([\d,]+), Gemma 3 ([\d,]+)\)", header)
    assert covered, "the Covered line of docs/results.md's header is missing"
    assert [int(g.replace(",", "")) for g in covered.groups()] == [
        total["smollm2-135m"] + total["gemma3-270m"], total["smollm2-135m"], total["gemma3-270m"]]
    table = header[header.index("| method | rte | cb | copa | wic | wsc |"):].splitlines()
    tasks, checked = ("rte", "cb", "copa", "wic", "wsc"), set()
    for line in table[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        methods = [m.strip() for m in re.sub(r"\([^)]*\)", "", cells[0]).split(",")]
        for method in methods:
            for task, cell in zip(tasks, cells[1:], strict=True):
                smol, gemma = cell.split(" / ")
                assert _cell_count(smol) == counts.get(("smollm2-135m", method, task), 0), (method, task, "SmolLM2")
                assert _cell_count(gemma) == counts.get(("gemma3-270m", method, task), 0), (method, task, "Gemma")
            checked.add(method)
    assert checked == {method for (_, method, _) in counts}  # every stored method has its row
