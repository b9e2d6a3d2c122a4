"""Name lookup that fails helpfully: an unknown name says "did you mean ...?" and lists what exists."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["close_matches", "did_you_mean", "unknown_name_message"]


def close_matches(name: str, known: Iterable[str], *, n: int = 3) -> list[str]:
    """The names of `known` closest to `name`, best first (none when nothing is close)."""
    return difflib.get_close_matches(name, sorted(known), n=n, cutoff=0.5)


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """" Did you mean 'x'?" for the close matches of `name` in `known`, or "" when there are none."""
    close = close_matches(name, known)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def unknown_name_message(kind: str, name: str, known: Iterable[str]) -> str:
    """The message for an unknown `name` of `kind`, with close matches and the full list."""
    known = sorted(known)
    return f"unknown {kind} {name!r}.{did_you_mean(name, known)} Known: {', '.join(known) or '(none)'}."
