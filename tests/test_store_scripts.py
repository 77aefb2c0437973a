"""The store scripts of benchmarks/ refuse bad arguments before sqlite3 can create a file of that name.

``sqlite3.connect("--help")`` creates an empty database called ``--help``; both scripts once did that and then
failed with "no such table". Run as a user would (``python -m``), in a scratch directory.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["results_sanity", "compact_store"])
@pytest.mark.parametrize("arg", ["--help", "missing.sqlite"])
def test_bad_store_argument_exits_2_and_creates_nothing(script, arg, tmp_path):
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{script}", arg], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and ("usage:" in proc.stderr or "no results store" in proc.stderr)
    assert list(tmp_path.iterdir()) == []
