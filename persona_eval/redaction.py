"""Secrets out of everything the suite prints or writes: API keys from the environment, URL credentials.

A served model, or a proxy in front of it, may echo the request's ``Authorization`` header into its
answer, and a server's error text may quote it. The suite cannot stop a server from doing that, so every
writer (result files, reports, the cache, error messages) passes its text through :func:`mask`, which
replaces each secret the process knows of with ``[secret $NAME masked]``.

The secrets known are read again at every call, because the environment may change during a run (and
does in tests): every environment variable whose name ends in ``_API_KEY``, ``_TOKEN``, ``_SECRET`` or
``_PASSWORD`` (``OPENAI_API_KEY`` and ``HF_TOKEN`` among them), plus every value given to
:func:`register_secret`, which is how a backend names a key read from a variable of any name, or a
password found in a base URL. A value shorter than 8 characters is never looked for: it is too likely to
be an ordinary word of a clinical answer ("EMPTY", a PIN), and masking it would damage the text without
protecting anything worth the name.

Each secret is also looked for as JSON and HTML would escape it, so that masking text that is already
serialized (a JSON line, an HTML page) finds a secret holding a quote or a backslash.
"""

from __future__ import annotations

import functools
import html
import json
import os
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["find_secrets", "known_secrets", "mask", "mask_found", "placeholder", "register_secret", "scrub"]

SECRET_MIN_LENGTH = 8
_SECRET_SUFFIXES = ("_API_KEY", "_TOKEN", "_SECRET", "_PASSWORD")
_SECRET_NAMES = frozenset({"OPENAI_API_KEY", "HF_TOKEN"})
_ENVIRONMENT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

_registered: dict[str, str] = {}  # value -> name, for the life of the process
_registered_lock = threading.Lock()

Secrets = Sequence[tuple[str, str]]


def register_secret(value: str, name: str) -> None:
    """Mask `value` from now on wherever it appears, as ``[secret NAME masked]``.

    `name` says what the secret is, never what it holds: an environment variable's name (shown as
    ``$NAME``) or a description such as ``base_url password``. A value under 8 characters is ignored
    (see the module docstring); registering a value twice keeps the first name.
    """
    if not isinstance(value, str) or len(value) < SECRET_MIN_LENGTH:
        return
    with _registered_lock:
        _registered.setdefault(value, name)


def known_secrets() -> list[tuple[str, str]]:
    """(name, value) of every secret to mask now: the environment's secret-looking variables, then
    the registered values that no such variable holds."""
    found: dict[str, str] = {}
    for name, value in os.environ.items():
        if len(value) >= SECRET_MIN_LENGTH and (name in _SECRET_NAMES or name.endswith(_SECRET_SUFFIXES)):
            found.setdefault(value, name)
    with _registered_lock:
        for value, name in _registered.items():
            found.setdefault(value, name)
    return [(name, value) for value, name in found.items()]


def placeholder(name: str) -> str:
    """What stands in the text for the secret called `name`."""
    shown = f"${name}" if _ENVIRONMENT_NAME.match(name) else name
    return f"[secret {shown} masked]"


def find_secrets(text: str, secrets: Secrets | None = None) -> list[tuple[int, int, str]]:
    """(start, end, name) of each secret in `text`, left to right, never overlapping; where two
    secrets start at the same place the longer one is taken. `secrets` defaults to
    :func:`known_secrets` (pass it to look for the same secrets in many strings)."""
    pattern = _pattern(tuple(sorted(known_secrets() if secrets is None else secrets)))
    if pattern is None:
        return []
    names = pattern[1]
    return [(match.start(), match.end(), names[match.group()]) for match in pattern[0].finditer(text)]


def mask_found(text: str, secrets: Secrets | None = None) -> tuple[str, list[str]]:
    """`text` with every secret replaced by its :func:`placeholder`, and the sorted names of those
    found (empty when the text holds none, and then the text is returned as it was)."""
    spans = find_secrets(text, secrets)
    if not spans:
        return text, []
    pieces: list[str] = []
    position = 0
    for start, end, name in spans:
        pieces += [text[position:start], placeholder(name)]
        position = end
    pieces.append(text[position:])
    return "".join(pieces), sorted({name for _, _, name in spans})


def mask(text: str, secrets: Secrets | None = None) -> str:
    """`text` with every secret replaced by its :func:`placeholder`."""
    return mask_found(text, secrets)[0]


def scrub(value: Any, secrets: Secrets | None = None) -> Any:
    """A copy of JSON-like `value` (mappings, lists, tuples, strings, other scalars) with every string,
    mapping keys included, masked. Mappings come back as dicts; anything else is returned as it is."""
    known = known_secrets() if secrets is None else secrets
    if not known:
        return _copy(value)
    return _scrub(value, known)


def _scrub(value: Any, secrets: Secrets) -> Any:
    if isinstance(value, str):
        return mask(value, secrets)
    if isinstance(value, Mapping):
        return {(mask(key, secrets) if isinstance(key, str) else key): _scrub(item, secrets)
                for key, item in value.items()}
    if isinstance(value, list):
        return [_scrub(item, secrets) for item in value]
    if isinstance(value, tuple):
        return tuple(_scrub(item, secrets) for item in value)
    return value


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_copy(item) for item in value)
    return value


@functools.lru_cache(maxsize=16)
def _pattern(secrets: tuple[tuple[str, str], ...]) -> tuple[re.Pattern[str], dict[str, str]] | None:
    """One regular expression for every spelling of `secrets`, longest first (an alternation tries its
    branches in order, so at any position the longest spelling wins), and the name of each spelling.
    Cached: the secrets rarely change within a run, and every write asks for them."""
    names: dict[str, str] = {}
    for name, value in secrets:
        for spelling in (value, json.dumps(value, ensure_ascii=False)[1:-1], json.dumps(value)[1:-1],
                         html.escape(value, quote=True)):
            names.setdefault(spelling, name)
    if not names:
        return None
    ordered = sorted(names, key=len, reverse=True)
    return re.compile("|".join(re.escape(spelling) for spelling in ordered)), names
