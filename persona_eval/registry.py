"""Name lookup that fails helpfully: an unknown name says "did you mean ...?" and lists what exists."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def unknown_name_message(kind: str, name: str, known: Iterable[str]) -> str:
    """The message for an unknown `name` of `kind`, with close matches and the full list."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown {kind} {name!r}.{hint} Known: {', '.join(known) or '(none)'}."
