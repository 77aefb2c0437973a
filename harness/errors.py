"""User-facing errors: one class, one line, a suggested fix.

Anything raised as :class:`HarnessError` is a problem with the user's input or environment (unknown name,
missing data, malformed task file, unloadable model). The CLI prints it as a single line on stderr and exits 2.
"""

from __future__ import annotations

import difflib


class HarnessError(Exception):
    """A user error whose message says what is wrong and how to fix it."""


def suggest(name: str, known: list[str] | tuple[str, ...], what: str) -> HarnessError:
    """Return an error for an unknown ``name`` that names the closest known ones."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return HarnessError(f"unknown {what} {name!r}.{hint} Known: {', '.join(sorted(known))}.")
