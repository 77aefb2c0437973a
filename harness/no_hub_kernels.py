"""bitsandbytes without its Hub kernels: the harness downloads nothing at run time.

On CPUs with AVX512-BF16, bitsandbytes 0.50 tries at import to fetch a CPU kernel from the Hugging Face Hub through
the ``kernels`` package (a dependency of transformers), and logs a warning when it cannot. It is imported by whoever
imports it first: peft does as soon as bitsandbytes is installed (the ``qlora`` extra), for any method. So
:func:`install` (called when the ``harness`` package is imported) puts a one-shot finder on ``sys.meta_path`` that,
when ``bitsandbytes`` is imported, hides ``kernels`` for the length of that import only (``from kernels import
get_kernel`` then raises ImportError and bitsandbytes keeps its built-in kernels) and silences that warning.

The same finder refuses the one import of bitsandbytes that nothing in the harness needs: peft's ``peft.helpers``
imports it when ``peft`` is imported (``try: import bitsandbytes ... except ImportError: bnb = None``), for a
condition-number helper the harness never calls, and that import costs ~0.8 s of every process's start-up (most of
it ``torch._inductor``). Any other importer (peft's 4-bit LoRA layers for qlora, :func:`harness.models.load_model`)
gets bitsandbytes as usual. No torch import here.
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


EAGER_IMPORTERS = frozenset({"peft.helpers"})  # modules whose import of bitsandbytes is refused (module docstring)


def _importer() -> str | None:
    """The module whose ``import`` statement is being executed (the first frame outside importlib)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen_importlib")):
        frame = frame.f_back
    return frame.f_globals.get("__name__") if frame is not None else None


class BitsandbytesFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of the top-level ``bitsandbytes`` package (its submodules load inside that exec); refuses it
    to :data:`EAGER_IMPORTERS`."""

    def find_spec(self, name, path=None, target=None):
        if name != "bitsandbytes":
            return None
        if _importer() in EAGER_IMPORTERS:
            raise ImportError("bitsandbytes is imported when needed (harness.no_hub_kernels)", name=name)
        sys.meta_path.remove(self)  # find the real spec without this finder
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
