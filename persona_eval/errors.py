"""The errors persona-eval raises: one base class, one subclass per kind of failure."""

from __future__ import annotations

from typing import Any

from persona_eval.redaction import mask

__all__ = [
    "BackendError",
    "ConfigError",
    "DataError",
    "MissingDependencyError",
    "PersonaEvalError",
    "describe_config_value",
]


class PersonaEvalError(Exception):
    """Base class of every error persona-eval raises on purpose.

    The message is written for the person running the suite: it names the file, line and field
    (or the endpoint) at fault, and says what was expected. It is masked when the error is made
    (persona_eval.redaction): a message may quote a server's reply, and a reply may quote the key, so
    no traceback, log line or report that shows the error can show the secret.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*(mask(arg) if isinstance(arg, str) else arg for arg in args))


class ConfigError(PersonaEvalError):
    """A bad option, persona, model spec or thresholds file."""


class DataError(PersonaEvalError):
    """A dataset that cannot be used as it is: malformed line, missing field, bad label, duplicate id.

    The message starts with where: ``path:line`` for a text file, ``path: row N`` for a table (Parquet, a
    ``datasets`` folder), whose rows have no line numbers; then the field, if any.
    """

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None, row: int | None = None) -> None:
        where = ""
        if path is not None:
            where = str(path)
            if line is not None:
                where += f":{line}"
            if row is not None:
                where += f": row {row}"
            if field is not None:
                where += f": field '{field}'"
            where += ": "
        super().__init__(where + message)
        self.path = path
        self.line = line
        self.row = row
        self.field = field


class BackendError(PersonaEvalError):
    """A model backend that failed: a server that stopped answering, a model that would not load."""

    def __init__(self, message: str, *, endpoint: str | None = None, status: int | str | None = None) -> None:
        parts = [message]
        if endpoint:
            parts.append(f"endpoint: {endpoint}")
        if status is not None:
            parts.append(f"last status: {status}")
        super().__init__("; ".join(parts))
        self.endpoint = None if endpoint is None else mask(endpoint)
        self.status = mask(status) if isinstance(status, str) else status


class MissingDependencyError(PersonaEvalError):
    """An optional package is needed for what was asked; the message gives the install command."""

    def __init__(self, package: str, purpose: str, install: str | None = None) -> None:
        command = install or f"pip install {package}"
        super().__init__(f"{purpose} needs the package '{package}', which is not installed. "
                         f"Install it with: {command}")
        self.package = package


def describe_config_value(value: Any) -> str:
    """A value read from a configuration file as a message quotes it: a scalar by its repr, anything
    else by its kind ("a dict", "a list"), which is what the reader needs to find it in the file."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return repr(value)
    return f"a {type(value).__name__}"
