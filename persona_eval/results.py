"""Run outputs on disk: reports/<run-id>/ with cases.jsonl, summary.json, and reports/latest.

Each pytest case writes its own part file (parts/<task>__<model>__<persona>.jsonl), so pytest-xdist
workers never write the same file; the controller joins the parts into cases.jsonl once, at the end.

Every file is written through :func:`write_text` (or the JSON writers over it), which masks the
secrets the process knows of (persona_eval.redaction): a model's answer that quotes an API key is
written with the key masked, whatever file it ends up in. A folder that must appear whole (a prepared
model) is built in :func:`staged_directory`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from persona_eval.errors import DataError
from persona_eval.redaction import known_secrets, mask, scrub

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


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (a reader never sees half a file), secrets masked; the folder
    is created if need be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # Masked here, where every writer ends, so that no file can be written without it.
    staging.write_text(mask(text), encoding="utf-8")
    os.replace(staging, path)


def write_json(path: Path, document: Any) -> None:
    """Write `document` as indented JSON, secrets masked in its strings (keys too)."""
    write_text(path, json.dumps(scrub(json_safe(document)), indent=2, ensure_ascii=False, allow_nan=False)
               + "\n")


def write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Write `records` as JSON lines, secrets masked in their strings (keys too)."""
    # Masked as data before serializing, so that a secret holding a quote cannot break a line's JSON;
    # the secrets are read once for the whole file.
    secrets = known_secrets()
    write_text(path, "".join(json.dumps(scrub(json_safe(r), secrets), ensure_ascii=False, allow_nan=False)
                             + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; a damaged line (a run killed while writing, an edit) is a
    DataError naming the file and line."""
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"not valid JSON ({exc.msg} at column {exc.colno}); the file is damaged",
                                path=str(path), line=number) from None
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
    """Join the part files of `order` ((task, model, persona) triples) into run_dir/cases.jsonl."""
    records: list[dict[str, Any]] = []
    for task, model, persona in order:
        path = part_path(run_dir, task, model, persona)
        if path.exists():
            records.extend(read_jsonl(path))
    if not records:
        return None
    target = run_dir / filename
    write_jsonl(target, records)
    return target


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
