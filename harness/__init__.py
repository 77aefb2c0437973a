"""harness: when does parameter-efficient fine-tuning beat k-shot in-context learning, and at what cost.

The public Python API lives in :mod:`harness.api`; the command line in :mod:`harness.cli` is a thin layer over it.
"""

__version__ = "0.1.0"

from harness import no_hub_kernels as _no_hub_kernels

_no_hub_kernels.install()  # bitsandbytes, whoever imports it, fetches no kernel from the Hub (module docstring)
