"""bitsandbytes, whoever imports it, never reaches for a Hub kernel (harness.no_hub_kernels).

A stand-in ``kernels`` package on the path records every ``get_kernel`` call; bitsandbytes 0.50 calls it at import
on CPUs with AVX512-BF16 (this machine and CI's) unless the harness hides the package during that import.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

FAKE_KERNELS = '''
import os
def get_kernel(repo, *args, **kwargs):
    with open(os.environ["KERNEL_CALLS"], "a") as f:
        f.write(repo + "\\n")
    raise RuntimeError("no Hub here")
'''


def _import_bitsandbytes(tmp_path, first: str) -> str:
    (tmp_path / "fake").mkdir(exist_ok=True)
    (tmp_path / "fake" / "kernels.py").write_text(FAKE_KERNELS)
    calls = tmp_path / f"calls-{first or 'plain'}.txt"
    calls.write_text("")
    code = "\n".join(["import sys", f"sys.path.insert(0, {str(tmp_path / 'fake')!r})", first, "import bitsandbytes"])
    subprocess.run([sys.executable, "-c", code], check=True, env={"KERNEL_CALLS": str(calls), "PATH": "/usr/bin"},
                   capture_output=True)
    return calls.read_text()


def test_bitsandbytes_imported_after_harness_fetches_no_hub_kernel(tmp_path):
    pytest.importorskip("bitsandbytes")
    without = _import_bitsandbytes(tmp_path, "")
    if "bitsandbytes" not in without:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes asks for no Hub kernel here anyway")
    assert _import_bitsandbytes(tmp_path, "import harness") == ""


def test_importing_peft_after_harness_leaves_bitsandbytes_unloaded_until_needed():
    """peft.helpers' eager import is refused (~0.8 s of start-up); peft's 4-bit check still finds bitsandbytes."""
    pytest.importorskip("bitsandbytes")
    code = ("import sys, harness, peft, peft.helpers\n"
            "assert 'bitsandbytes' not in sys.modules and peft.helpers.bnb is None\n"
            "from peft.import_utils import is_bnb_4bit_available\n"
            "assert is_bnb_4bit_available() and 'bitsandbytes' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
