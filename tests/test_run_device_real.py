"""benchmarks/run_device_real.sh's grid stage without a GPU: a stand-in ``nvidia-smi`` reports an H100's memory and a
stand-in Python records when each ``harness run`` job starts and ends, so the queue's memory rule and what comes
back in $OUT (at most 8 files on the device machine) are checked in a few seconds."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = f"""#!/usr/bin/env bash
# a job (`python -m harness.cli run ...`): note its start and end; anything else: the real Python
if [ "$1 $2" = "-m harness.cli" ]; then
  job=$(grep -oE -- '--tasks [a-z]+' <<< "$*" | cut -d' ' -f2)
  echo "start $job" >> "$EVENTS"; echo "share $HARNESS_GPU_SHARE" >> "$SHARES"; sleep 6; echo "end $job" >> "$EVENTS"; exit 0
fi
exec {sys.executable} "$@"
"""

FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
case "$*" in
  *memory.total*) echo 81559 ;;            # an H100 80GB: 7 trainings of 11 GiB
  *) echo "2026/12/07 00:00:00.000, 1 MiB, 0 %" ;;
esac
"""


def test_queue_starts_a_job_only_while_its_workers_fit_and_logs_come_back_as_one_archive(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python", FAKE_PYTHON), ("nvidia-smi", FAKE_NVIDIA_SMI)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out, events, shares = tmp_path / "out", tmp_path / "events", tmp_path / "shares"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "python"),
               EVENTS=str(events), SHARES=str(shares), OUT=str(out), GPU_DIR=str(tmp_path / "gpu"), SRC=str(ROOT),
               STORE=str(tmp_path / "store" / "paper.sqlite"), RERUN_STORE=str(tmp_path / "none.sqlite"),
               HARNESS_CACHE_DIR=str(tmp_path / "cache"), HARNESS_GPU_SHARE="", GRID_SLOTS="3", GRID_MIN_START="0",
               GRID_TIMEOUT="60", CALL_DEADLINE="90",
               GRID_JOBS="--methods lokr --tasks wsc --workers 1; --methods adalora --tasks cb --workers 5; "
                         "--methods vera --tasks rte --workers 5")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_device_real.sh"), "grid"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert "at most 7 trainings at once" in proc.stdout, proc.stdout + proc.stderr
    order = events.read_text().split("\n")[:-1]
    # 1 + 5 workers fit in 7; the second 5-worker job waits for the first to end (11 would not fit: round 22)
    assert order.index("start rte") > order.index("end cb"), order
    assert order.index("start cb") < order.index("end wsc"), order  # wsc and cb side by side
    # evaluation batches sized for the 7 trainings that fit at once (11 asked for), not each job's own --workers
    assert set(shares.read_text().split("\n")[:-1]) == {"share 7"}
    assert not list(out.glob("*.log")) and not list(out.glob("*_gpumem.csv"))
    with tarfile.open(out / "grid_logs.tar.gz") as archive:
        assert sorted(archive.getnames()) == ["grid_gpumem.csv", "grid_job0.log", "grid_job1.log", "grid_job2.log"]
    assert len(list(out.iterdir())) <= 8
