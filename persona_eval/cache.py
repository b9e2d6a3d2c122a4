"""The on-disk result cache: model results in one SQLite file, keyed by everything that changes them.

A key is the SHA-256 of a canonical JSON encoding of the parts that determine a result (kind of call,
backend, model identity including its weights fingerprint, the rendered prompt, decoding and scoring
settings, template name); see :func:`cache_key`. A value is one JSON object per key.

Several processes (pytest-xdist workers) and several threads may share one cache file: the file is in
WAL mode with a 60 s busy timeout, every write is one ``BEGIN IMMEDIATE`` transaction retried when the
database stays locked, and a process holds one connection guarded by a lock. A batch is committed as a
whole or not at all, so Ctrl-C or ``kill -9`` loses at most the batch being written and never corrupts
the file.

Beside the results, a small ``notes`` table holds facts about models that the runner compares across
runs (:meth:`ResultCache.get_note` / :meth:`ResultCache.put_note`): the identity last seen at a model's
address, and the parameters a model refused. It is created in older cache files when they are opened;
readers that do not know it ignore it.

Secrets: keys and values must never contain API keys or other credentials. Nothing here needs one (a
model identity names the model, not the account that serves it), and as a last line of defence against
a server that echoes its request headers into a result, :meth:`ResultCache.put_many` and
:meth:`ResultCache.put_note` store every value with the secrets the process knows of masked (see
:mod:`persona_eval.redaction`): the result is kept, the secret never reaches the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from hashlib import sha256
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

from persona_eval.errors import ConfigError
from persona_eval.redaction import Secrets, known_secrets, mask_found, scrub

__all__ = [
    "CACHE_FILENAME",
    "Cache",
    "NullCache",
    "ResultCache",
    "cache_key",
    "default_cache_dir",
    "default_cache_path",
]

# The cache file's name inside a cache directory. Caches already on users' disks carry it: renaming it
# would silently start every user on an empty cache.
CACHE_FILENAME = "results.sqlite"

# Part of every key, so a change to the canonical encoding below can never reuse old entries.
_KEY_SCHEME = "persona-eval/cache-key/v1"

_APPLICATION_ID = 0x50455643  # "PEVC": marks a SQLite file as a persona-eval cache
_SCHEMA_VERSION = 1
_TABLE = "results"
_COLUMNS = ("key", "value", "created_at")
_NOTES = "notes"
_CREATE_NOTES = (f"CREATE TABLE IF NOT EXISTS {_NOTES} (name TEXT PRIMARY KEY, value TEXT NOT NULL, "
                 "updated_at REAL NOT NULL)")

_BUSY_TIMEOUT_S = 60.0
# SQLite waits up to the busy timeout by itself; these retries cover the cases where it returns
# "database is locked" at once instead (a WAL recovery in progress, a journal-mode change).
_LOCKED_RETRIES = 5
# Below SQLITE_MAX_VARIABLE_NUMBER on every SQLite version (999 before 3.32).
_QUERY_CHUNK = 500

_Result = TypeVar("_Result")


# --- keys --------------------------------------------------------------------------------------------


def cache_key(parts: Mapping[str, Any]) -> str:
    """The SHA-256 hex digest of the canonical JSON encoding of `parts`.

    The encoding sorts mapping keys, has no whitespace, writes tuples as lists, writes a float by its
    shortest round-trip form (an integral float within 2**53 as the integer, so ``temperature=0`` and
    ``temperature=0.0`` give one key; ``-0.0`` as ``0``) and keeps bools apart from integers. Mapping
    keys must be strings. A value of any other type raises TypeError, and a NaN or infinite float
    raises ValueError; both name the key path, e.g. ``model.revision[2]``.

    >>> cache_key({"b": 1, "a": (1.0, "x")}) == cache_key({"a": [1, "x"], "b": 1})
    True
    """
    if not isinstance(parts, Mapping):
        raise TypeError(f"cache_key() takes a mapping of key parts, got {type(parts).__name__}")
    canonical = _canonical(parts, "")
    text = json.dumps([_KEY_SCHEME, canonical], sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False)
    return sha256(text.encode("utf-8")).hexdigest()


def cache_keys(parts: Mapping[str, Any], name: str, values: Sequence[Any]) -> list[str]:
    """``cache_key({**parts, name: value})`` for each of `values`, the shared `parts` made canonical once
    (a run computes a key per request, and the parts hold the model's whole identity).

    >>> cache_keys({"model": "m"}, "prompt", ["a", "b"]) == [cache_key({"model": "m", "prompt": p}) for p in "ab"]
    True
    """
    if not isinstance(parts, Mapping):
        raise TypeError(f"cache_keys() takes a mapping of key parts, got {type(parts).__name__}")
    shared = _canonical({key: value for key, value in parts.items() if key != name}, "")
    keys = []
    for value in values:
        canonical = {**shared, name: _canonical(value, name)}
        text = json.dumps([_KEY_SCHEME, canonical], sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False, allow_nan=False)
        keys.append(sha256(text.encode("utf-8")).hexdigest())
    return keys


def _canonical(value: Any, path: str) -> Any:
    """`value` as plain JSON types in one canonical form; `path` names it in error messages."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)  # an IntEnum or other int subclass encodes as its number
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cache key part {path or '<root>'} is {value!r}; key parts must be finite")
        if value.is_integer() and abs(value) <= 2**53:
            return int(value)
        return value
    if isinstance(value, Mapping):
        encoded: dict[str, Any] = {}
        for name, item in value.items():
            if not isinstance(name, str):
                raise TypeError(f"cache key part {path or '<root>'} has a key {name!r} of type "
                                f"{type(name).__name__}; mapping keys must be strings")
            encoded[name] = _canonical(item, f"{path}.{name}" if path else name)
        return encoded
    if isinstance(value, (list, tuple)):
        return [_canonical(item, f"{path}[{index}]") for index, item in enumerate(value)]
    raise TypeError(f"cache key part {path or '<root>'} is a {type(value).__name__}, which has no "
                    "canonical JSON form; pass str, int, float, bool, None, or lists and mappings of them")


# --- locations ---------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """$PERSONA_EVAL_CACHE_DIR if set, else $XDG_CACHE_HOME/persona-eval, else ~/.cache/persona-eval.

    An empty variable counts as unset, and a relative $XDG_CACHE_HOME is ignored, as the XDG base
    directory specification asks.
    """
    configured = os.environ.get("PERSONA_EVAL_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    xdg_cache_home = os.environ.get("XDG_CACHE_HOME")
    if xdg_cache_home and Path(xdg_cache_home).is_absolute():
        return Path(xdg_cache_home) / "persona-eval"
    return Path.home() / ".cache" / "persona-eval"


def default_cache_path() -> Path:
    """The result cache file inside :func:`default_cache_dir`."""
    return default_cache_dir() / CACHE_FILENAME


# --- the interface -----------------------------------------------------------------------------------


class Cache(Protocol):
    """What the runner needs from a cache: :class:`ResultCache` and :class:`NullCache` both provide it."""

    hits: int
    misses: int

    def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]: ...

    def put_many(self, items: Mapping[str, Mapping[str, Any]]) -> None: ...

    def get(self, key: str) -> dict[str, Any] | None: ...

    def put(self, key: str, value: Mapping[str, Any]) -> None: ...

    def get_note(self, name: str) -> dict[str, Any] | None: ...

    def put_note(self, name: str, value: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...

    def __len__(self) -> int: ...


class _CacheBase:
    """The conveniences both caches share, written once over get_many and put_many."""

    hits: int
    misses: int

    def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    def put_many(self, items: Mapping[str, Mapping[str, Any]]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def get(self, key: str) -> dict[str, Any] | None:
        """The value stored under `key`, or None (counted as one hit or one miss)."""
        return self.get_many([key]).get(key)

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        """Store one value (its own transaction; prefer put_many for a batch)."""
        self.put_many({key: value})

    def __bool__(self) -> bool:
        # An empty cache is still a cache: `if cache:` must not turn into a COUNT(*) that says False.
        return True

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


_Self = TypeVar("_Self", bound=_CacheBase)


# --- the null cache ----------------------------------------------------------------------------------


class NullCache(_CacheBase):
    """A cache that stores nothing (``--pe-no-cache``): every lookup is a miss, every write is dropped."""

    path: Path | None = None

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Always empty; counts each distinct key as a miss."""
        _check_keys(keys)
        with self._lock:
            self.misses += len(set(keys))
        return {}

    def put_many(self, items: Mapping[str, Mapping[str, Any]]) -> None:
        """Drop `items`."""

    def get_note(self, name: str) -> dict[str, Any] | None:
        """No memory: always None."""
        return None

    def put_note(self, name: str, value: Mapping[str, Any]) -> None:
        """Drop the note."""

    def close(self) -> None:
        """Nothing to close."""

    def __len__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return f"NullCache(hits={self.hits}, misses={self.misses})"


# --- the SQLite cache --------------------------------------------------------------------------------


class ResultCache(_CacheBase):
    """Model results in a SQLite file, safe to share between processes and threads.

    ``hits`` and ``misses`` count distinct keys asked of :meth:`get_many` (and :meth:`get`) by this
    object. A cache that cannot be opened raises :class:`~persona_eval.errors.ConfigError`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self._connection = self._open(create=True)

    @classmethod
    def in_dir(cls, directory: str | os.PathLike[str]) -> ResultCache:
        """The cache file (:data:`CACHE_FILENAME`) in `directory`, opened or created."""
        return cls(Path(directory) / CACHE_FILENAME)

    # public API

    def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The stored values of those `keys` that are in the cache (hits only), by key."""
        _check_keys(keys)
        wanted = list(dict.fromkeys(keys))

        def read(connection: sqlite3.Connection) -> dict[str, dict[str, Any]]:
            found: dict[str, dict[str, Any]] = {}
            for start in range(0, len(wanted), _QUERY_CHUNK):
                chunk = wanted[start:start + _QUERY_CHUNK]
                placeholders = ",".join("?" * len(chunk))
                rows = connection.execute(
                    f"SELECT key, value FROM {_TABLE} WHERE key IN ({placeholders})", chunk)
                for key, value in rows:
                    found[key] = json.loads(value)
            return found

        found = self._run(read, write=False) if wanted else {}
        with self._lock:
            self.hits += len(found)
            self.misses += len(wanted) - len(found)
        return found

    def put_many(self, items: Mapping[str, Mapping[str, Any]]) -> None:
        """Store `items` (key -> JSON object) in one transaction, replacing existing values.

        Raises TypeError for a key that is not a string or a value that is not a JSON-serializable
        mapping, and then nothing of the batch is written. A secret in a value is stored masked (see
        the module docstring).
        """
        if not items:
            return
        _check_keys(list(items))
        secrets = known_secrets()
        now = time.time()
        rows = [(key, _encode_value(f"key {key}", value, secrets), now) for key, value in items.items()]

        def write(connection: sqlite3.Connection) -> None:
            connection.executemany(
                f"INSERT OR REPLACE INTO {_TABLE} (key, value, created_at) VALUES (?, ?, ?)", rows)

        self._run(write, write=True)

    def get_note(self, name: str) -> dict[str, Any] | None:
        """The note stored under `name`, or None (not counted as a hit or a miss)."""
        if not isinstance(name, str):
            raise TypeError(f"note names are strings, got {type(name).__name__}: {name!r}")

        def read(connection: sqlite3.Connection) -> dict[str, Any] | None:
            row = connection.execute(f"SELECT value FROM {_NOTES} WHERE name = ?", (name,)).fetchone()
            return None if row is None else dict(json.loads(row[0]))

        return self._run(read, write=False)

    def put_note(self, name: str, value: Mapping[str, Any]) -> None:
        """Store (or replace) the note `name`: a JSON object, its secrets masked as in results."""
        if not isinstance(name, str):
            raise TypeError(f"note names are strings, got {type(name).__name__}: {name!r}")
        text = _encode_value(f"note {name}", value)

        def write(connection: sqlite3.Connection) -> None:
            connection.execute(f"INSERT OR REPLACE INTO {_NOTES} (name, value, updated_at) VALUES (?, ?, ?)",
                               (name, text, time.time()))

        self._run(write, write=True)

    def close(self) -> None:
        """Close the connection; closing twice is fine."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._pid == os.getpid():
                self._connection.close()

    def __len__(self) -> int:
        def count(connection: sqlite3.Connection) -> int:
            (number,) = connection.execute(f"SELECT COUNT(*) FROM {_TABLE}").fetchone()
            return int(number)

        return self._run(count, write=False)

    def __repr__(self) -> str:
        return f"ResultCache({str(self.path)!r}, hits={self.hits}, misses={self.misses})"

    # opening

    def _open(self, *, create: bool) -> sqlite3.Connection:
        if self.path.is_dir():
            raise ConfigError(self._unusable("is a directory, not a cache file"))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(self._unusable(f"cannot be created: {error}")) from error
        try:
            connection = sqlite3.connect(str(self.path), timeout=_BUSY_TIMEOUT_S,
                                         isolation_level=None, check_same_thread=False)
        except sqlite3.Error as error:
            raise ConfigError(self._unusable(f"cannot be opened: {error}")) from error
        try:
            _with_locked_retries(lambda: self._prepare(connection, create=create), self.path)
        except BaseException:
            connection.close()
            raise
        return connection

    def _prepare(self, connection: sqlite3.Connection, *, create: bool) -> None:
        """Set the connection up, and create the table in a new file; refuse a file that is not ours."""
        try:
            connection.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
            # Check before changing anything, so a foreign database is left exactly as it was. One read
            # transaction, so the header and the table list come from one snapshot even while another
            # process is creating the file.
            connection.execute("BEGIN")
            try:
                self._check_identity(connection)
            finally:
                _rollback(connection)
            # WAL lets readers and one writer work at once. On a file system without shared memory
            # SQLite keeps its rollback journal, which is slower but as safe.
            connection.execute("PRAGMA journal_mode = WAL")
            # FULL: a committed batch survives a power cut too; one fsync per batch is nothing next to
            # model inference.
            connection.execute("PRAGMA synchronous = FULL")
            if not create:
                return
            connection.execute("BEGIN IMMEDIATE")
            try:
                # Checked again under the write lock: another process may have created it meanwhile.
                if not self._check_identity(connection):
                    connection.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
                    connection.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
                    connection.execute(f"CREATE TABLE {_TABLE} (key TEXT PRIMARY KEY, "
                                       "value TEXT NOT NULL, created_at REAL NOT NULL)")
                # Also in a file written before the notes existed: the results table is untouched.
                connection.execute(_CREATE_NOTES)
                connection.execute("COMMIT")
            except BaseException:
                _rollback(connection)
                raise
        except sqlite3.OperationalError as error:
            if _is_locked(error):
                raise  # retried by the caller
            raise ConfigError(self._unusable(f"cannot be used: {error}")) from error
        except sqlite3.DatabaseError as error:
            raise ConfigError(self._unusable(f"is not a SQLite database ({error})")) from error

    def _check_identity(self, connection: sqlite3.Connection) -> bool:
        """True if the file is a persona-eval cache, False if it is empty; ConfigError otherwise."""
        (application_id,) = connection.execute("PRAGMA application_id").fetchone()
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        tables = [name for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")]
        if application_id == 0 and version == 0 and not tables:
            return False
        if application_id != _APPLICATION_ID:
            raise ConfigError(self._unusable("is a SQLite database of another program, not a "
                                             "persona-eval cache"))
        if version != _SCHEMA_VERSION:
            raise ConfigError(self._unusable(f"has cache schema version {version}; this persona-eval "
                                             f"reads version {_SCHEMA_VERSION}"))
        columns = tuple(row[1] for row in connection.execute(f"PRAGMA table_info({_TABLE})"))
        if columns != _COLUMNS:
            raise ConfigError(self._unusable(f"has a '{_TABLE}' table with columns {list(columns)}, "
                                             f"expected {list(_COLUMNS)}"))
        return True

    def _unusable(self, problem: str) -> str:
        return (f"the result cache {self.path} {problem}. Delete it (or choose another path with "
                "$PERSONA_EVAL_CACHE_DIR), or run without the cache with --pe-no-cache")

    # running statements

    def _run(self, operation: Callable[[sqlite3.Connection], _Result], *, write: bool) -> _Result:
        """Run `operation` under the lock, as one transaction when `write`, retrying while locked."""
        if self._pid != os.getpid():
            self._reopen_after_fork()
        with self._lock:
            if self._closed:
                raise ValueError(f"the result cache {self.path} is closed")
            connection = self._connection

            def attempt() -> _Result:
                if not write:
                    return operation(connection)
                connection.execute("BEGIN IMMEDIATE")
                try:
                    result = operation(connection)
                    connection.execute("COMMIT")
                except BaseException:
                    # Ctrl-C lands here too: the batch is dropped whole and the file stays consistent.
                    _rollback(connection)
                    raise
                return result

            return _with_locked_retries(attempt, self.path)

    def _reopen_after_fork(self) -> None:
        # A SQLite connection must not be used across fork(). The child leaves the inherited one alone
        # (closing it could disturb the parent's locks) and opens its own; the inherited lock may have
        # been held by a thread that does not exist in the child, so it is replaced too.
        self._lock = threading.Lock()
        self._pid = os.getpid()
        if not self._closed:
            self._connection = self._open(create=False)


def _with_locked_retries(operation: Callable[[], _Result], path: Path) -> _Result:
    for attempt in range(_LOCKED_RETRIES + 1):
        try:
            return operation()
        except sqlite3.OperationalError as error:
            if not _is_locked(error):
                raise
            if attempt == _LOCKED_RETRIES:
                raise ConfigError(
                    f"the result cache {path} stayed locked by another process ({error}). If no other "
                    "persona-eval run is using it, a stale process may hold it; otherwise choose another "
                    "path with $PERSONA_EVAL_CACHE_DIR, or run without the cache with --pe-no-cache"
                ) from error
            time.sleep(0.05 * 2**attempt * (1 + random.random()))
    raise AssertionError("unreachable")


def _is_locked(error: sqlite3.OperationalError) -> bool:
    message = str(error).lower()
    return "locked" in message or "busy" in message


def _rollback(connection: sqlite3.Connection) -> None:
    if connection.in_transaction:
        # SQLite may have rolled back by itself already (e.g. after an I/O error).
        with contextlib.suppress(sqlite3.Error):
            connection.execute("ROLLBACK")


def _check_keys(keys: Sequence[str]) -> None:
    if isinstance(keys, str):
        raise TypeError("get_many() takes a sequence of keys, got a single string; use get(key)")
    for key in keys:
        if not isinstance(key, str):
            raise TypeError(f"cache keys are strings (see cache_key()), got {type(key).__name__}: {key!r}")


def _encode_value(what: str, value: Mapping[str, Any], secrets: Secrets | None = None) -> str:
    """`value` as stored: compact JSON with every secret masked; TypeError when it is not a JSON mapping.

    The value is serialized once and masked as data only when a secret shows in the text, so a batch
    without secrets (every batch, normally) costs one search per value."""
    if not isinstance(value, Mapping):
        raise TypeError(f"cache value for {what} must be a mapping, got {type(value).__name__}")
    secrets = known_secrets() if secrets is None else secrets
    try:
        # NaN and infinities are allowed: a log-probability can be -inf, and json reads them back.
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as error:
        raise TypeError(f"cache value for {what} is not JSON-serializable: {error}") from error
    if mask_found(text, secrets)[1]:
        # Masked in the data, not the text: a secret holding a quote must not break the JSON around it.
        text = json.dumps(scrub(value, secrets), ensure_ascii=False, separators=(",", ":"))
    return text
