"""Run outputs on disk: reports/<run-id>/ with cases.jsonl, summary.json, and reports/latest.

Each pytest case writes its own part file (parts/<task>__<model>__<persona>.jsonl), so pytest-xdist
workers never write the same file; the controller joins the parts into cases.jsonl once, at the end.

Every file is written through :func:`write_text` or the JSON writers, which mask the secrets the
process knows of (persona_eval.redaction): a model's answer that quotes an API key is written with the
key masked, whatever file it ends up in. Every file appears whole: it is written to a staging file in
its folder and renamed into place (``_staged_file``, private because it leaves the masking to its
caller). A folder that must appear whole (a prepared model) is built in :func:`staged_directory`.

The JSON-lines writers stream, one record at a time, so that their memory does not grow with the run:
:func:`write_jsonl` serializes record by record, and :func:`finalize_cases` copies the part files' lines
into cases.jsonl rather than loading every record first.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from persona_eval.errors import DataError
from persona_eval.redaction import Secrets, find_secrets, known_secrets, mask, scrub

__all__ = [
    "finalize_cases",
    "json_safe",
    "new_run_id",
    "read_json",
    "read_jsonl",
    "staged_directory",
    "update_latest",
    "write_json",
    "write_jsonl",
    "write_part",
    "write_text",
]


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus a random suffix."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def json_safe(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


@contextlib.contextmanager
def _staged_file(path: Path) -> Iterator[IO[str]]:
    """A text file to write `path` through: a staging file in the same folder (the folder is created if
    need be), renamed to `path` when the block ends without an error, removed when it raises; so a reader
    never sees half a file, and a failed write leaves `path` as it was. The caller masks what it writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with staging.open("w", encoding="utf-8") as handle:
            yield handle
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (a reader never sees half a file), secrets masked; the folder
    is created if need be."""
    with _staged_file(path) as handle:
        # Masked here, where every text writer ends, so that no file can be written without it.
        handle.write(mask(text))


def write_json(path: Path, document: Any) -> None:
    """Write `document` as indented JSON, secrets masked in its strings (keys too)."""
    write_text(path, json.dumps(scrub(json_safe(document)), indent=2, ensure_ascii=False, allow_nan=False)
               + "\n")


def _json_line(record: Any, secrets: Secrets) -> str:
    # Masked as data before serializing, never as text: a secret holding a quote or a backslash cannot
    # break the line's JSON, and a secret made of digits cannot replace a number.
    return json.dumps(scrub(json_safe(record), secrets), ensure_ascii=False, allow_nan=False) + "\n"


def write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Write `records` as JSON lines, one at a time (`records` may be a generator), secrets masked in
    their strings (keys too); atomically, as :func:`write_text`."""
    secrets = known_secrets()  # read once for the whole file
    with _staged_file(path) as handle:
        for record in records:
            handle.write(_json_line(record, secrets))


def _parse_line(path: Path, number: int, line: str, parse_constant: Any = None) -> Any:
    try:
        return json.loads(line, parse_constant=parse_constant)
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON ({exc.msg} at column {exc.colno}); the file is damaged",
                        path=str(path), line=number) from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; a damaged line (a run killed while writing, an edit) is a
    DataError naming the file and line."""
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                records.append(_parse_line(path, number, line))
    return records


def read_json(path: Path) -> Any:
    """The JSON document at `path`; a damaged one is a DataError naming the file, line and column."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON ({exc.msg} at column {exc.colno}); the file is damaged or truncated",
                        path=str(path), line=exc.lineno) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text (byte {exc.start})", path=str(path)) from None


def part_path(run_dir: Path, task: str, model: str, persona: str) -> Path:
    return run_dir / "parts" / f"{task}__{model}__{persona}.jsonl"


def write_part(run_dir: Path, task: str, model: str, persona: str, records: Sequence[Mapping[str, Any]]) -> Path:
    path = part_path(run_dir, task, model, persona)
    write_jsonl(path, records)
    return path


def finalize_cases(run_dir: Path, order: Sequence[tuple[str, str, str]], filename: str = "cases.jsonl"
                   ) -> Path | None:
    """Join the part files of `order` ((task, model, persona) triples) into run_dir/cases.jsonl (or
    `filename`) and return its path; None, and no file written, when none of the parts exists or they
    hold no record. A damaged part line is a DataError naming the part and the line.

    The lines are copied one at a time, so memory does not grow with the run. A part was masked when it
    was written, but a secret may have become known since (a key registered later in the run), so each
    line is checked again; see :func:`_joined_line`."""
    secrets = known_secrets()  # read once for the whole file
    lines = _part_lines([part_path(run_dir, *triple) for triple in order])
    first = next(lines, None)
    if first is None:
        return None
    target = run_dir / filename
    with _staged_file(target) as handle:
        for path, number, line in itertools.chain([first], lines):
            handle.write(_joined_line(path, number, line, secrets))
    return target


def _part_lines(parts: Iterable[Path]) -> Iterator[tuple[Path, int, str]]:
    """(part, line number, line) of every line that is not blank, in order; parts that do not exist are
    skipped (a case that never ran)."""
    for path in parts:
        if not path.exists():
            continue
        with path.open(encoding="utf-8") as part:
            for number, line in enumerate(part, start=1):
                if line.strip():
                    yield path, number, line


def _joined_line(path: Path, number: int, line: str, secrets: Secrets) -> str:
    """The line of a part as it goes into cases.jsonl: the line itself when it needs nothing, else its
    record written again as :func:`write_jsonl` would (masked, NaN as null).

    Masking the line's text would be wrong: a secret holding a quote can match the JSON around a string
    (``1234", "key`` in ``{"a": "1234", "key": 1}``), one of digits a number, one starting with ``n`` the
    tail of a ``\\n`` escape, and the masked line is then no longer the record's JSON, or no JSON at
    all. So the text is only searched, to decide which lines to mask as data. That search misses no
    secret the record holds: with no ``\\u`` or ``\\/`` escape in the line, every character of every
    string is spelled as ``json.dumps(..., ensure_ascii=False)`` spells it, one character at a time, so
    a string that holds a secret holds that spelling of it, which redaction looks for (a false match
    only costs the rewrite)."""
    finite = True

    def non_finite(constant: str) -> None:
        nonlocal finite
        finite = False
        return None  # NaN and infinities are written as null, as json_safe writes them

    record = _parse_line(path, number, line, parse_constant=non_finite)
    if finite and not (secrets and ("\\u" in line or "\\/" in line or find_secrets(line, secrets))):
        return line.strip() + "\n"
    return _json_line(record, secrets)


def update_latest(reports_dir: Path, run_dir: Path) -> None:
    """Point reports/latest at `run_dir` (a relative symlink, replaced atomically)."""
    link = reports_dir / "latest"
    staging = reports_dir / f".latest.{os.getpid()}"
    try:
        if staging.is_symlink() or staging.exists():
            staging.unlink()
        staging.symlink_to(run_dir.name)
        os.replace(staging, link)
    except OSError:
        # Filesystems without symlinks get a text file naming the run instead.
        write_text(link.with_suffix(".txt"), run_dir.name + "\n")


@contextlib.contextmanager
def staged_directory(target: Path, *, complete: str) -> Iterator[Path]:
    """A new empty folder beside `target` to build in, renamed to `target` when the block ends without an
    error, so no process ever sees a half-built `target`. `complete` names the file whose presence marks a
    finished copy: when another process has put its copy in place first, that copy is kept and this one
    dropped. The staging folder is removed whatever happens."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{target.name}-", dir=target.parent))
    try:
        yield staging
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished first: its copy is as good as ours.
            if not (target / complete).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
