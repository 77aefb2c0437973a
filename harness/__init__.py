"""harness: when does parameter-efficient fine-tuning beat k-shot in-context learning, and at what cost.

The public Python API lives in :mod:`harness.api`; the command line in :mod:`harness.cli` is a thin layer over it.
"""

__version__ = "0.1.0"
