"""The one command-line argument of the store scripts (``results_sanity``, ``compact_store``; ``grid_plan``'s check): an existing store.

``sqlite3.connect`` creates an empty database under any name it is given, so ``--help`` or a typo would leave a
file named ``--help`` behind and fail later with "no such table". This checks first and exits 2 with a usage line.
"""

from __future__ import annotations

import os
import sys


def store_path(argv: list[str], doc: str) -> str:
    """``argv[1]`` when it names an existing file; else a usage line (the docstring's last line) or an error on
    stderr and exit status 2."""
    if len(argv) != 2 or argv[1].startswith("-"):
        print(doc.strip().splitlines()[-1].strip().replace("python", "usage: python", 1), file=sys.stderr)
        sys.exit(2)
    require_store(argv[1])
    return argv[1]


def require_store(path: str) -> None:
    """Exit 2 with a one-line error unless ``path`` is an existing file (for scripts that parse their own
    options, e.g. ``benchmarks.grid_plan``)."""
    if not os.path.isfile(path):
        print(f"error: no results store at {path}: give the path of a .sqlite store (gunzip/unxz it first)",
              file=sys.stderr)
        sys.exit(2)
