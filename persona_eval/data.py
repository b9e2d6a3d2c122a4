"""Dataset loading and validation: triage cases and safety queries, with errors that cite file:line:field.

Triage cases come in two layouts, each as JSON lines (``.jsonl``) or CSV with a header row (``.csv``):

``project``
    ``id``, ``stratum``, ``reference`` (A/B/C), ``rationale``, and either ``text`` (the vignette) or the
    structured intake fields of persona_eval.tasks.triage.INTAKE_FIELDS (at least
    ``presenting_symptoms``), rendered into the vignette by the intake template.
``vignette``
    the common vignette-benchmark layout: ``case_description`` and ``urgency_level`` (em -> C,
    ne -> B, sc -> A); ``id``, ``rationale`` and ``stratum`` are optional.

Conventions shared by every loader here: blank lines (and all-empty CSV rows) are skipped, but line
numbers stay those of the file, 1-based (a CSV header is line 1; a CSV record that spans lines is
numbered by its first line). A field whose value is null or blank text counts as absent, so an empty
CSV cell is an absent field. Surrounding whitespace is removed from text values. Fields a layout does
not know are ignored. Every problem raises DataError naming the file, the line and the field.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_eval.errors import ConfigError, DataError
from persona_eval.registry import unknown_name_message
from persona_eval.tasks.safety import CATEGORIES, SafetyQuery
from persona_eval.tasks.triage import INTAKE_FIELDS, LABELS, STRATA, TriageCase, render_intake

__all__ = [
    "FORMATS",
    "URGENCY_LEVELS",
    "dataset_fingerprint",
    "load_safety_queries",
    "load_triage_cases",
]

FORMATS: tuple[str, ...] = ("project", "vignette")
# The vignette benchmark's urgency codes: emergency, non-emergency (see a doctor), self-care.
URGENCY_LEVELS: dict[str, str] = {"em": "C", "ne": "B", "sc": "A"}
_TRIAGE_SUFFIXES = (".jsonl", ".csv")
_SAFETY_SUFFIXES = (".jsonl",)
_VIGNETTE_FIELDS = ("case_description", "urgency_level")

Record = dict[str, Any]


@dataclass(frozen=True)
class _Where:
    """A line of a data file, to build messages and ``source`` strings from."""

    path: str
    line: int

    @property
    def source(self) -> str:
        return f"{self.path}:{self.line}"

    def error(self, message: str, field: str | None = None) -> DataError:
        return DataError(message, path=self.path, line=self.line, field=field)


def _describe(value: Any) -> str:
    """A JSON value as a message shows it: its JSON kind and, for scalars, the value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"true/false ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"text ({value!r})"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _present(record: Mapping[str, Any], name: str) -> bool:
    value = record.get(name)
    return value is not None and not (isinstance(value, str) and not value.strip())


def _missing(record: Mapping[str, Any], name: str, where: _Where, hint: str = "") -> DataError:
    state = "is empty" if name in record else "is missing"
    return where.error(f"required field {state}{hint}", name)


def _text(record: Mapping[str, Any], name: str, where: _Where) -> str:
    """A required, non-empty text field."""
    if not _present(record, name):
        raise _missing(record, name, where)
    value = record[name]
    if not isinstance(value, str):
        raise where.error(f"expected text, got {_describe(value)}", name)
    return value.strip()


def _optional_text(record: Mapping[str, Any], name: str, where: _Where, default: str) -> str:
    return _text(record, name, where) if _present(record, name) else default


def _identifier(record: Mapping[str, Any], where: _Where, default: str | None = None) -> str:
    """``id``: non-empty text, or an integer (converted to text)."""
    value = record.get("id")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not _present(record, "id"):
        if default is not None:
            return default
        raise _missing(record, "id", where)
    if not isinstance(value, str):
        raise where.error(f"expected text or an integer, got {_describe(value)}", "id")
    return value.strip()


def _stratum(record: Mapping[str, Any], where: _Where, default: str | None) -> str:
    if not _present(record, "stratum"):
        if default is None:
            raise _missing(record, "stratum", where,
                           "; give it on each line or pass stratum= to load_triage_cases")
        return default
    value = _text(record, "stratum", where)
    if value not in STRATA:
        raise where.error(f"unknown stratum {value!r}; allowed: {', '.join(STRATA)}", "stratum")
    return value


def _reference(record: Mapping[str, Any], where: _Where) -> str:
    if not _present(record, "reference"):
        raise _missing(record, "reference", where)
    value = record["reference"]
    label = value.strip() if isinstance(value, str) else value
    if label not in LABELS:
        shown = repr(label) if isinstance(label, str) else _describe(label)
        raise where.error(f"label {shown} is not allowed; allowed: {', '.join(LABELS)} "
                          "(A = self-care, B = routine appointment, C = emergency care)", "reference")
    return str(label)


def _urgency(record: Mapping[str, Any], where: _Where) -> str:
    value = _text(record, "urgency_level", where)
    if value not in URGENCY_LEVELS:
        allowed = ", ".join(f"{code} (-> {label})" for code, label in URGENCY_LEVELS.items())
        raise where.error(f"unknown urgency level {value!r}; allowed: {allowed}", "urgency_level")
    return URGENCY_LEVELS[value]


def _text_or_list(value: Any, name: str, where: _Where) -> str | list[str]:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return [item.strip() for item in value]
    raise where.error(f"expected text or a list of text, got {_describe(value)}", name)


def _vital_signs(value: Any, where: _Where) -> str | dict[str, Any]:
    # CSV cells can only hold text, so a cell that looks like a JSON object is read as one.
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise where.error(f"looks like a JSON object but is malformed: {exc.msg} "
                              f"(column {exc.colno})", "vital_signs") from None
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, Mapping):
        for name, reading in value.items():
            if isinstance(reading, bool) or not isinstance(reading, (str, int, float)):
                raise where.error(f"reading {name!r} must be text or a number, got {_describe(reading)}",
                                  "vital_signs")
        return dict(value)
    raise where.error(f"expected an object of readings or text, got {_describe(value)}", "vital_signs")


def _age(value: Any, where: _Where) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        return value.strip()
    raise where.error(f"expected a whole number of years or text, got {_describe(value)}", "age")


def _plain_text(value: Any, name: str, where: _Where) -> str:
    if not isinstance(value, str):
        raise where.error(f"expected text, got {_describe(value)}", name)
    return value.strip()


def _intake(record: Mapping[str, Any], where: _Where) -> dict[str, Any] | None:
    """The structured intake fields present on the line, in template order; None when there are none."""
    intake: dict[str, Any] = {}
    for name in INTAKE_FIELDS:
        if not _present(record, name):
            continue
        value = record[name]
        if name == "age":
            intake[name] = _age(value, where)
        elif name == "vital_signs":
            intake[name] = _vital_signs(value, where)
        elif name in ("history", "medications"):
            intake[name] = _text_or_list(value, name, where)
        else:
            intake[name] = _plain_text(value, name, where)
    if not intake:
        return None
    if "presenting_symptoms" not in intake:
        raise _missing(record, "presenting_symptoms", where,
                       "; a structured intake needs at least the presenting symptoms")
    return intake


def _project_case(record: Record, where: _Where, stratum: str | None) -> TriageCase:
    case_id = _identifier(record, where)
    case_stratum = _stratum(record, where, stratum)
    reference = _reference(record, where)
    rationale = _text(record, "rationale", where)
    intake = _intake(record, where)
    if intake is not None:
        if _present(record, "text"):
            raise where.error(f"given together with intake field(s) {', '.join(intake)}; give either "
                              "the vignette text or the structured intake, not both", "text")
        text = render_intake(intake)
    else:
        if not _present(record, "text"):
            raise _missing(record, "text", where, "; give the vignette as 'text' or the structured "
                                                  "intake fields (at least 'presenting_symptoms')")
        text = _text(record, "text", where)
    return TriageCase(id=case_id, stratum=case_stratum, reference=reference, rationale=rationale,
                      text=text, source=where.source, intake=intake)


def _vignette_case(record: Record, where: _Where, stratum: str | None, stem: str) -> TriageCase:
    case_id = _identifier(record, where, default=f"{stem}-{where.line}")
    case_stratum = _stratum(record, where, stratum)
    reference = _urgency(record, where)
    rationale = _optional_text(record, "rationale", where, default="")
    text = _text(record, "case_description", where)
    return TriageCase(id=case_id, stratum=case_stratum, reference=reference, rationale=rationale,
                      text=text, source=where.source)


def _detect_format(record: Mapping[str, Any]) -> str:
    """``vignette`` when the record has both benchmark fields, or one of them and no ``reference``."""
    marked = [name in record for name in _VIGNETTE_FIELDS]
    if all(marked) or (any(marked) and "reference" not in record):
        return "vignette"
    return "project"


def _check_suffix(path: Path, shown: str, supported: tuple[str, ...]) -> str:
    suffix = path.suffix.lower()
    if suffix not in supported:
        raise DataError(f"unsupported file type {path.suffix or '(no extension)'!r}; "
                        f"supported: {', '.join(supported)}", path=shown)
    return suffix


def _read_text(path: Path, shown: str) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError("no such file", path=shown) from None
    except IsADirectoryError:
        raise DataError("is a directory, not a data file", path=shown) from None
    except OSError as exc:
        raise DataError(f"cannot read the file ({exc.strerror})", path=shown) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 ({exc.reason})", path=shown, line=line) from None
    if not text.strip():
        raise DataError("the file is empty", path=shown)
    return text


def _jsonl_records(text: str, shown: str) -> Iterator[tuple[int, Record]]:
    # split("\n"), not splitlines(): the latter also splits on characters JSON allows inside strings,
    # which would shift every line number after them.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"malformed JSON: {exc.msg} (column {exc.colno})", path=shown,
                            line=number) from None
        if not isinstance(value, dict):
            raise DataError(f"expected a JSON object, got {_describe(value)}", path=shown, line=number)
        yield number, value


def _csv_records(text: str, shown: str) -> Iterator[tuple[int, Record]]:
    reader = csv.reader(io.StringIO(text, newline=""))

    def next_row() -> list[str] | None:
        try:
            return next(reader)
        except StopIteration:
            return None
        except csv.Error as exc:
            raise DataError(f"malformed CSV: {exc}", path=shown, line=reader.line_num) from None

    header = next_row()
    while header is not None and not any(cell.strip() for cell in header):
        header = next_row()
    if header is None:
        return
    header_line = reader.line_num
    columns = [name.strip() for name in header]
    seen: set[str] = set()
    for name in columns:
        if name and name in seen:
            raise DataError("column appears twice in the header", path=shown, line=header_line,
                            field=name)
        seen.add(name)
    previous = reader.line_num
    while (row := next_row()) is not None:
        number, previous = previous + 1, reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(columns):
            raise DataError(f"expected {len(columns)} columns as in the header (line {header_line}), "
                            f"found {len(row)}", path=shown, line=number)
        # Columns with no name in the header are not fields of any layout: ignored like extra fields.
        yield number, {name: cell for name, cell in zip(columns, row, strict=True) if name}


def load_triage_cases(path: str | os.PathLike[str], *, stratum: str | None = None,
                      format: str | None = None) -> list[TriageCase]:
    """The triage cases of a ``.jsonl`` or ``.csv`` file, in file order, validated.

    The layout (``project`` or ``vignette``, see the module docstring) is detected from the first
    record's fields; ``format=`` forces it. ``stratum=`` is a default, never an override: it fills the
    stratum of lines that give none (in either layout), and lines that give one keep theirs.
    ``TriageCase.source`` is "path:line". Ids must be unique within the file; a vignette-layout line
    without an id gets "<file stem>-<line>".

    Raises DataError naming the file, line and field for any problem in the file (including a missing
    file or an unsupported extension), and ConfigError for an unknown ``stratum=`` or ``format=``.
    """
    if format is not None and format not in FORMATS:
        raise ConfigError(unknown_name_message("dataset format", format, FORMATS))
    if stratum is not None and stratum not in STRATA:
        raise ConfigError(unknown_name_message("stratum", stratum, STRATA))
    shown, file = str(path), Path(path)
    suffix = _check_suffix(file, shown, _TRIAGE_SUFFIXES)
    text = _read_text(file, shown)
    records = _csv_records(text, shown) if suffix == ".csv" else _jsonl_records(text, shown)

    layout = format
    cases: list[TriageCase] = []
    first_line: dict[str, int] = {}
    for number, record in records:
        where = _Where(shown, number)
        if layout is None:
            layout = _detect_format(record)
        if layout == "vignette":
            case = _vignette_case(record, where, stratum, file.stem)
        else:
            case = _project_case(record, where, stratum)
        if case.id in first_line:
            raise where.error(f"duplicate id {case.id!r} (first seen at line {first_line[case.id]})", "id")
        first_line[case.id] = number
        cases.append(case)
    if not cases:
        only_header = " (only a header row)" if suffix == ".csv" else ""
        raise DataError(f"no cases in the file{only_header}", path=shown)
    return cases


def _category(record: Mapping[str, Any], where: _Where) -> int:
    if "category" not in record or record["category"] is None:
        raise _missing(record, "category", where)
    value = record["category"]
    if isinstance(value, bool) or not isinstance(value, int):
        raise where.error(f"expected an integer 1-{len(CATEGORIES)}, got {_describe(value)}", "category")
    if value not in CATEGORIES:
        known = "; ".join(f"{number} = {name}" for number, name in CATEGORIES.items())
        raise where.error(f"category {value} is outside 1-{len(CATEGORIES)} ({known})", "category")
    return value


def load_safety_queries(path: str | os.PathLike[str]) -> list[SafetyQuery]:
    """The patient-safety queries of a ``.jsonl`` file in the public benchmark's layout, in file order.

    Each line holds ``id`` (an integer or non-empty text; unique in the file), ``content`` (the query)
    and ``category`` (an integer key of persona_eval.tasks.safety.CATEGORIES); other fields are
    ignored. Raises DataError naming the file, line and field for any problem.
    """
    shown, file = str(path), Path(path)
    _check_suffix(file, shown, _SAFETY_SUFFIXES)
    text = _read_text(file, shown)
    queries: list[SafetyQuery] = []
    first_line: dict[str, int] = {}
    for number, record in _jsonl_records(text, shown):
        where = _Where(shown, number)
        query_id = _identifier(record, where)
        content = _text(record, "content", where)
        category = _category(record, where)
        if query_id in first_line:
            raise where.error(f"duplicate id {query_id!r} (first seen at line {first_line[query_id]})", "id")
        first_line[query_id] = number
        queries.append(SafetyQuery(id=query_id, content=content, category=category, source=where.source))
    if not queries:
        raise DataError("no queries in the file", path=shown)
    return queries


def dataset_fingerprint(path: str | os.PathLike[str]) -> str:
    """``sha256:<hex>`` of the file's bytes, for run metadata and cache keys.

    Any change to the file, even whitespace, changes the fingerprint; the same bytes always give the same.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError:
        raise DataError("no such file", path=str(path)) from None
    except IsADirectoryError:
        raise DataError("is a directory, not a data file", path=str(path)) from None
    except OSError as exc:
        raise DataError(f"cannot read the file ({exc.strerror})", path=str(path)) from None
    return f"sha256:{digest.hexdigest()}"
