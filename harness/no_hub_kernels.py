"""bitsandbytes without its Hub kernels: the harness downloads nothing at run time.

On CPUs with AVX512-BF16, bitsandbytes 0.50 tries at import to fetch a CPU kernel from the Hugging Face Hub through
the ``kernels`` package (a dependency of transformers), and logs a warning when it cannot. It is imported by whoever
imports it first: peft does as soon as bitsandbytes is installed (the ``qlora`` extra), for any method. So
:func:`install` (called when the ``harness`` package is imported) puts a one-shot finder on ``sys.meta_path`` that,
when ``bitsandbytes`` is imported, hides ``kernels`` for the length of that import only (``from kernels import
get_kernel`` then raises ImportError and bitsandbytes keeps its built-in kernels) and silences that warning. Nothing
else sees a difference; no torch import here.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import sys


@contextlib.contextmanager
def kernels_hidden():
    """``kernels`` unimportable and bitsandbytes' logger quiet below errors, for the duration."""
    before = sys.modules.get("kernels", False)
    sys.modules["kernels"] = None  # type: ignore[assignment]
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
        if before is False:
            sys.modules.pop("kernels", None)
        else:
            sys.modules["kernels"] = before


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with kernels_hidden():
            self.loader.exec_module(module)


class BitsandbytesFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of the top-level ``bitsandbytes`` package (its submodules load inside that exec)."""

    def find_spec(self, name, path=None, target=None):
        if name != "bitsandbytes":
            return None
        sys.meta_path.remove(self)  # one shot; find the real spec without this finder
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once; nothing to do when bitsandbytes is already imported)."""
    if "bitsandbytes" in sys.modules or any(isinstance(f, BitsandbytesFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, BitsandbytesFinder())
