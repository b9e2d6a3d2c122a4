"""Dataset loading and validation: triage cases and safety queries, with errors that cite file:line:field.

Triage cases come in two layouts, each as JSON lines (``.jsonl``), CSV with a header row (``.csv``), a
Parquet file (``.parquet``) or a folder written by Hugging Face ``datasets``' ``save_to_disk``:

``project``
    ``id``, ``stratum``, ``reference`` (A/B/C), ``rationale``, and either ``text`` (the vignette) or the
    structured intake fields of persona_eval.tasks.triage.INTAKE_FIELDS (at least
    ``presenting_symptoms``), rendered into the vignette by the intake template.
``vignette``
    the common vignette-benchmark layout: ``case_description`` and ``urgency_level`` (em -> C,
    ne -> B, sc -> A); ``id``, ``rationale`` and ``stratum`` are optional.

A stratum is any name the dataset uses (``paediatrics``, ``telehealth``): the study's two,
``emergency`` and ``primary_care``, are the fixture set's, not the only ones (see stratum_problem for
what a name may be). A file whose lines carry no stratum takes a default one (``stratum=``;
``--pe-dataset triage:STRATUM=PATH`` on the command line).

Safety queries come as ``.jsonl``, ``.parquet`` or a ``datasets`` folder.

Conventions shared by every loader here: blank lines (and all-empty CSV rows) are skipped, but line
numbers stay those of the file, 1-based (a CSV header is line 1; a CSV record that spans lines is
numbered by its first line). A field whose value is null or blank text counts as absent, so an empty
CSV cell is an absent field. Surrounding whitespace is removed from text values. Every problem raises
DataError naming the file, the line and the field.

Tables (Parquet, ``datasets`` folders) have rows, not lines: messages and ``source`` say "row N", the
row's 1-based position (all-null rows are skipped and keep their numbers). A column is a field; each row
goes through arrow's conversion to Python and the same validation as a JSON line, with a map as an
object, a struct without its null members (a struct column gives every row every member), and NaN as
null. A ``datasets`` folder is one Dataset: a DatasetDict folder is refused with its splits listed, and
each split's subfolder is a Dataset folder, so ``PATH/test`` names the test split (as a loader argument
and in ``--pe-dataset triage=PATH/test`` alike). Reading Parquet needs pyarrow (the ``parquet`` extra),
reading a folder needs ``datasets`` (the ``datasets`` extra); both are imported only when such a source
is read, and a missing one is a DataError giving the install command.

Fields a layout does not know: one that looks like a mistake for a field of the layout (another case,
``-`` or a space for ``_``, singular for plural, or a close spelling: ``Presenting Symptoms``,
``medication``, ``medicatons`` for ``medications``) is a DataError that says "did you mean ...?", unless
the field it resembles is given on the same line too, since otherwise its value would silently not reach
the model. Any other unknown field (``annotator``, ``source_url``) is ignored; pass a DatasetReport as
``report=`` to learn which were, on how many lines (lines where the field has a value).

Size: a file is read one line at a time, so memory holds one line beyond what is kept of the cases; a
table, ROW_BATCH rows at a time. A file over MAX_FILE_BYTES (a folder: its files together) is refused
before it is read, a line over MAX_LINE_BYTES (a CSV record: all its lines) when it is reached, and a
field over MAX_FIELD_CHARS when its line or row is read.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import hashlib
import importlib
import io
import json
import math
import os
import re
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persona_eval.errors import ConfigError, DataError
from persona_eval.registry import unknown_name_message
from persona_eval.tasks.safety import CATEGORIES, SafetyQuery
from persona_eval.tasks.triage import INTAKE_FIELDS, LABELS, STRATA, TriageCase, render_intake

__all__ = [
    "FORMATS",
    "MAX_FIELD_CHARS",
    "MAX_FILE_BYTES",
    "MAX_LINE_BYTES",
    "ROW_BATCH",
    "URGENCY_LEVELS",
    "DatasetReport",
    "csv_records",
    "dataset_fingerprint",
    "jsonl_records",
    "load_labelled_cases",
    "load_safety_queries",
    "load_triage_cases",
    "read_text",
    "stratum_problem",
]

FORMATS: tuple[str, ...] = ("project", "vignette")
# The vignette benchmark's urgency codes: emergency, non-emergency (see a doctor), self-care.
URGENCY_LEVELS: dict[str, str] = {"em": "C", "ne": "B", "sc": "A"}
_TRIAGE_SUFFIXES = (".jsonl", ".csv", ".parquet")
_SAFETY_SUFFIXES = (".jsonl", ".parquet")
# What a path names besides a file of one of those suffixes: a folder written by datasets' save_to_disk.
_FOLDER = "datasets folder"
_TABLES = (".parquet", _FOLDER)  # sources whose records are rows, numbered from 1, not lines of text
# The rows converted to Python at a time from a table: a bounded amount of memory per batch whatever the
# file's row groups, and few enough calls into arrow that the conversion costs nothing next to validation.
ROW_BATCH = 256
_VIGNETTE_FIELDS = ("case_description", "urgency_level")

# The most characters one field may hold. A clinical vignette is a few thousand characters and the
# longest benchmark query a few hundred; 100,000 leaves room for any real case while keeping a pasted
# document (or a corrupt line) away from the model, whose context it would overflow anyway.
MAX_FIELD_CHARS = 100_000
# The most bytes one line (one CSV record) may hold: room for a few fields at their limit, with JSON
# escapes, and still a bounded amount of memory per line (the line, its text, its parsed fields).
MAX_LINE_BYTES = 16 * 1024 * 1024
# The largest dataset file read at all: the study's datasets are well under a megabyte, and ten thousand
# vignettes under 50 MiB.
MAX_FILE_BYTES = 512 * 1024 * 1024

# The fields each layout reads; anything else on a line is unknown to it.
_LAYOUT_FIELDS: dict[str, tuple[str, ...]] = {
    "project": ("id", "stratum", "reference", "rationale", "text", *INTAKE_FIELDS),
    "vignette": ("id", "stratum", "rationale", *_VIGNETTE_FIELDS),
    "safety query": ("id", "content", "category"),
    "labelled case": ("id", "stratum", "reference", "rationale", "text"),
}
# A known field of at least this many characters is matched by spelling as well (difflib ratio at
# least _NEAR_MISS_CUTOFF); shorter ones ("id", "age", "sex", "text") only by case, separators and
# plural, since one letter off them is often another word ("page", "set").
_NEAR_MISS_MIN_CHARS = 5
_NEAR_MISS_CUTOFF = 0.8
_IRREGULAR_PLURALS = {"strata": "stratum"}
_STRATUM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
# How the size error names a field's value.
_FIELD_NOUNS = {"text": "case text", "case_description": "case text", "content": "query text"}

Record = dict[str, Any]


@dataclass(frozen=True)
class _Where:
    """A line of a data file (a row of a table), to build messages and ``source`` strings from."""

    path: str
    line: int
    unit: str = "line"  # or "row"

    @property
    def source(self) -> str:
        return f"{self.path}:{self.line}" if self.unit == "line" else f"{self.path}: row {self.line}"

    def error(self, message: str, field: str | None = None) -> DataError:
        if self.unit == "row":
            return DataError(message, path=self.path, row=self.line, field=field)
        return DataError(message, path=self.path, line=self.line, field=field)


@dataclass
class DatasetReport:
    """What a loader ignored in a file: each field no layout field matches -> on how many lines it has a
    value (``unknown_fields``) and the first of them (``first_lines``). Pass one as ``report=``; the
    loader fills it in (and sets ``path``, and ``unit`` to "row" for a table) when the file loads."""

    path: str = ""
    unknown_fields: dict[str, int] = field(default_factory=dict)
    first_lines: dict[str, int] = field(default_factory=dict)
    unit: str = "line"

    def message(self) -> str | None:
        """One line for people, or None when nothing was ignored.

        >>> DatasetReport("cases.jsonl", {"source_url": 104, "annotator": 1}, {}).message()
        'cases.jsonl: fields not used by persona-eval (ignored): annotator (1 line), source_url (104 lines)'
        """
        if not self.unknown_fields:
            return None
        listed = ", ".join(f"{name} ({count:,} {self.unit}{'' if count == 1 else 's'})"
                           for name, count in sorted(self.unknown_fields.items()))
        return f"{self.path}: fields not used by persona-eval (ignored): {listed}"


def _field_key(name: str) -> str:
    """A field name with case and separators folded: "Presenting Symptoms" -> "presenting_symptoms"."""
    return re.sub(r"[\s_.-]+", "_", name.strip().lower()).strip("_")


def _spellings(key: str) -> Iterator[str]:
    """`key` and its singular and plural forms."""
    yield key
    yield _IRREGULAR_PLURALS.get(key, key)
    yield key + "s"
    yield key + "es"
    if key.endswith("s"):
        yield key[:-1]
    if key.endswith("es"):
        yield key[:-2]
    if key.endswith("ies"):
        yield key[:-3] + "y"
    if key.endswith("y"):
        yield key[:-1] + "ies"


def _near_miss(name: str, known: Mapping[str, str]) -> str | None:
    """The field of `known` (folded key -> field) that `name` looks like a mistake for, if any."""
    key = _field_key(name)
    for spelling in _spellings(key):
        if spelling in known:
            return known[spelling]
    candidates = [k for k in known if len(k) >= _NEAR_MISS_MIN_CHARS]
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=_NEAR_MISS_CUTOFF)
    return known[close[0]] if close else None


def _text_size(value: Any) -> int:
    """The characters of text a field's value holds (a list's items, an object's names and values)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(len(item) for item in value if isinstance(item, str))
    if isinstance(value, Mapping):
        return sum(len(str(name)) + (len(item) if isinstance(item, str) else 0) for name, item in value.items())
    return 0


class _LayoutFields:
    """The field names on each line checked against one layout: a near miss of a field is an error, any
    other unknown field is counted for the DatasetReport, and a known field over MAX_FIELD_CHARS is an
    error."""

    def __init__(self, layout: str) -> None:
        self.layout = layout
        self.known = frozenset(_LAYOUT_FIELDS[layout])
        self._folded = {_field_key(name): name for name in _LAYOUT_FIELDS[layout]}
        self._suggestions: dict[str, str | None] = {}  # one difflib call per distinct name, not per line
        self.unknown: dict[str, int] = {}
        self.first_lines: dict[str, int] = {}

    def check(self, record: Mapping[str, Any], where: _Where) -> None:
        for name in record:
            if not _present(record, name):
                continue
            if name in self.known:
                size = _text_size(record[name])
                if size > MAX_FIELD_CHARS:
                    noun = _FIELD_NOUNS.get(name, "the value")
                    raise where.error(f"{noun} is {size:,} characters; at most {MAX_FIELD_CHARS:,} are "
                                      "accepted (a vignette is a few thousand)", name)
                continue
            if name not in self._suggestions:
                self._suggestions[name] = _near_miss(name, self._folded)
            suggestion = self._suggestions[name]
            if suggestion is not None and not _present(record, suggestion):
                raise where.error(f"not a field of the {self.layout} layout; did you mean {suggestion!r}? "
                                  "(a field persona-eval does not know is ignored, so this value would not "
                                  "be used)", name)
            self.unknown[name] = self.unknown.get(name, 0) + 1
            self.first_lines.setdefault(name, where.line)

    def fill(self, report: DatasetReport | None, path: str, unit: str) -> None:
        if report is not None:
            report.path, report.unit = path, unit
            report.unknown_fields = dict(sorted(self.unknown.items()))
            report.first_lines = {name: self.first_lines[name] for name in report.unknown_fields}


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


def stratum_problem(name: str) -> str | None:
    """Why `name` cannot be a triage stratum, or None when it can.

    A dataset may use any strata of its own (``paediatrics``, ``telehealth``, ``site-b``): letters,
    digits, ``_`` and ``-``, at most 64 characters, but not ``all`` (the report's row over every case),
    and not a near miss of the study's strata (``Emergency``, ``primary care``, ``emergancy``), which
    would otherwise split the cases of one stratum in two and leave its bounds unchecked.

    >>> stratum_problem("paediatrics") is None, stratum_problem("primary-care")
    (True, "looks like a mistake for the stratum 'primary_care'; write it as 'primary_care'")
    """
    if not _STRATUM_NAME.match(name):
        return ("a stratum is letters, digits, '_' and '-' (at most 64 characters, starting with a letter or "
                "a digit)")
    if name.lower() == "all":
        return "'all' is the report's row over every case, not a stratum"
    for known in STRATA:
        if name != known and (_field_key(name) == known
                              or difflib.SequenceMatcher(None, name.lower(), known).ratio() >= _NEAR_MISS_CUTOFF):
            return f"looks like a mistake for the stratum {known!r}; write it as {known!r}"
    return None


class _Strata:
    """The strata one file uses: each name checked once, and two spellings of one name refused."""

    def __init__(self) -> None:
        self.first: dict[str, tuple[str, str]] = {}  # folded name -> (name, where first seen)
        self.checked: set[str] = set()

    def check(self, name: str, where: _Where) -> str:
        if name not in self.checked:
            problem = stratum_problem(name)
            if problem is not None:
                raise where.error(f"stratum {name!r}: {problem}", "stratum")
            self.checked.add(name)
        seen, at = self.first.setdefault(_field_key(name), (name, where.source))
        if seen != name:
            raise where.error(f"stratum {name!r} is another spelling of {seen!r} (first seen at {at}); "
                              "one stratum needs one name", "stratum")
        return name


def _stratum(record: Mapping[str, Any], where: _Where, default: str | None, strata: _Strata) -> str:
    if not _present(record, "stratum"):
        if default is None:
            raise _missing(record, "stratum", where,
                           "; give it on each line, or a default for the file: --pe-dataset triage:STRATUM=PATH "
                           "(stratum= of load_triage_cases)")
        return default
    return strata.check(_text(record, "stratum", where), where)


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


def _project_case(record: Record, where: _Where, stratum: str | None, strata: _Strata) -> TriageCase:
    case_id = _identifier(record, where)
    case_stratum = _stratum(record, where, stratum, strata)
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


def _vignette_case(record: Record, where: _Where, stratum: str | None, stem: str, strata: _Strata) -> TriageCase:
    case_id = _identifier(record, where, default=f"{stem}-{where.line}")
    case_stratum = _stratum(record, where, stratum, strata)
    reference = _urgency(record, where)
    rationale = _optional_text(record, "rationale", where, default="")
    text = _text(record, "case_description", where)
    return TriageCase(id=case_id, stratum=case_stratum, reference=reference, rationale=rationale,
                      text=text, source=where.source)


def _detect_format(record: Mapping[str, Any]) -> str:
    """``vignette`` when the record has both benchmark fields, or one of them and no ``reference``
    (names compared with case and separators folded, so that a misspelled header is reported as such)."""
    keys = {_field_key(name) for name in record}
    marked = [name in keys for name in _VIGNETTE_FIELDS]
    if all(marked) or (any(marked) and "reference" not in keys):
        return "vignette"
    return "project"


def _source_kind(path: Path, shown: str, supported: tuple[str, ...]) -> str:
    """The suffix of a data file `path` names, or _FOLDER for a folder without one of those suffixes (a
    folder named like a data file is reported as a directory where a file was expected)."""
    suffix = path.suffix.lower()
    if suffix in supported:
        return suffix
    if path.is_dir():
        return _FOLDER
    if not suffix and not path.exists():
        raise DataError("no such file or folder", path=shown)
    raise DataError(f"unsupported file type {path.suffix or '(no extension)'!r}; supported: "
                    f"{', '.join(supported)}, or a folder written by datasets' save_to_disk", path=shown)


def _mib(size: int) -> str:
    return f"{size / (1 << 20):,.0f} MiB" if size >= 1 << 20 else f"{size:,} bytes"


def _too_large(size: int, shown: str, what: str = "file is") -> DataError:
    return DataError(f"the {what} {_mib(size)}; at most {_mib(MAX_FILE_BYTES)} are read (ten thousand "
                     "vignettes are under 50 MiB)", path=shown)


def _open(path: Path, shown: str) -> io.BufferedReader:
    """`path` opened for reading, after its size is checked."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise DataError("no such file", path=shown) from None
    except IsADirectoryError:
        raise DataError("is a directory, not a data file", path=shown) from None
    except OSError as exc:
        raise DataError(f"cannot read the file ({exc.strerror})", path=shown) from None
    size = os.fstat(handle.fileno()).st_size
    if size > MAX_FILE_BYTES:
        handle.close()
        raise _too_large(size, shown)
    return handle


def _line_too_long() -> str:
    return (f"the line is longer than {MAX_LINE_BYTES:,} bytes and is not read; a line holds one case, "
            f"and a field at most {MAX_FIELD_CHARS:,} characters (a vignette is a few thousand)")


def _file_lines(path: Path, shown: str) -> Generator[tuple[int, str], None, None]:
    """(line number, text) of each line of `path`, read and decoded one at a time, each with its "\n".

    Lines end at "\n" only (as JSON lines do: a JSON string may hold other line separators). Raises
    DataError for a line over MAX_LINE_BYTES (before holding more of it), a line that is not UTF-8, and,
    once every line is read, a file with nothing but blank lines.
    """
    with _open(path, shown) as handle:
        number, read, content = 0, 0, False
        while chunk := handle.readline(MAX_LINE_BYTES + 1):
            number += 1
            read += len(chunk)
            if len(chunk) - chunk.endswith(b"\n") > MAX_LINE_BYTES:
                raise DataError(_line_too_long(), path=shown, line=number)
            if read > MAX_FILE_BYTES:  # a file that grows while read, or a device
                raise _too_large(read, shown)
            try:
                line = chunk.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"not valid UTF-8 ({exc.reason})", path=shown, line=number) from None
            content = content or bool(line.strip())
            yield number, line
    if not content:
        raise DataError("the file is empty", path=shown)


def read_text(path: Path, shown: str) -> str:
    """The whole text of a small file (persona_eval.review reads annotation files with it)."""
    with _open(path, shown) as handle:
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise _too_large(len(data), shown)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 ({exc.reason})", path=shown, line=line) from None
    if not text.strip():
        raise DataError("the file is empty", path=shown)
    return text


def _parse_jsonl(lines: Iterable[tuple[int, str]], shown: str) -> Iterator[tuple[int, Record]]:
    for number, line in lines:
        if not line.strip():
            continue
        if line.endswith("\n"):
            line = line[:-1]  # so that the column of an error at the end of the line is on the line
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"malformed JSON: {exc.msg} (column {exc.colno})", path=shown,
                            line=number) from None
        except RecursionError:
            raise DataError("malformed JSON: nested too deeply", path=shown, line=number) from None
        except ValueError as exc:  # e.g. an integer of more digits than Python converts
            raise DataError(f"malformed JSON: {exc}", path=shown, line=number) from None
        if not isinstance(value, dict):
            raise DataError(f"expected a JSON object, got {_describe(value)}", path=shown, line=number)
        yield number, value


def jsonl_records(text: str, shown: str) -> Iterator[tuple[int, Record]]:
    # split("\n"), not splitlines(): the latter also splits on characters JSON allows inside strings,
    # which would shift every line number after them.
    return _parse_jsonl(enumerate(text.split("\n"), start=1), shown)


class _CsvLines:
    """The lines fed to the CSV reader: split as ``newline=""`` splits them (at "\r", "\n" or "\r\n"),
    and counted per record, so that a record spanning lines is bounded like a line (MAX_LINE_BYTES)."""

    _LONE_CR = re.compile(r"(?<=\r)(?!\n)")

    def __init__(self, lines: Iterable[str], shown: str) -> None:
        self._lines = iter(lines)
        self._pending: list[str] = []
        self._shown = shown
        self.line_num = 0
        self.record: list[str] = []  # the text of the record being read, for error messages
        self.record_line = 1  # the first line of that record
        self._record_chars = 0

    def start_record(self) -> None:
        self.record, self._record_chars, self.record_line = [], 0, self.line_num + 1

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        while not self._pending:
            line = next(self._lines)
            self._pending = [piece for piece in self._LONE_CR.split(line) if piece] if "\r" in line else [line]
        piece = self._pending.pop(0)
        self.line_num += 1
        self._record_chars += len(piece)
        if self._record_chars > MAX_LINE_BYTES:
            raise DataError(f"the CSV record is longer than {MAX_LINE_BYTES:,} characters and is not read; a "
                            f"record holds one case, and a field at most {MAX_FIELD_CHARS:,} characters",
                            path=self._shown, line=self.record_line)
        self.record.append(piece)
        return piece


def _oversized_column(record: str, limit: int) -> int | None:
    """The 0-based column of the first field over `limit` characters in the text of a CSV record."""
    column, length, quoted = 0, 0, False
    for char in record:
        if char == '"':
            quoted = not quoted  # a doubled quote inside quotes toggles twice
        elif char == "," and not quoted:
            column, length = column + 1, 0
        else:
            length += 1
            if length > limit:
                return column
    return None


def _parse_csv(lines: Iterable[str], shown: str) -> Iterator[tuple[int, Record]]:
    feed = _CsvLines(lines, shown)
    reader = csv.reader(feed)
    columns: list[str] = []

    def next_row() -> list[str] | None:
        feed.start_record()
        try:
            return next(reader)
        except StopIteration:
            return None
        except csv.Error as exc:
            if "field larger than field limit" in str(exc):
                limit = csv.field_size_limit()
                column = _oversized_column("".join(feed.record), limit)
                name = columns[column] if column is not None and column < len(columns) else None
                raise DataError(f"{_FIELD_NOUNS.get(name or '', 'a field')} is over {limit:,} characters; "
                                f"at most {MAX_FIELD_CHARS:,} are accepted (a vignette is a few thousand)",
                                path=shown, line=feed.record_line, field=name) from None
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


def csv_records(text: str, shown: str) -> Iterator[tuple[int, Record]]:
    return _parse_csv(io.StringIO(text, newline=""), shown)


def _records(lines: Iterator[tuple[int, str]], suffix: str, shown: str) -> Iterator[tuple[int, Record]]:
    if suffix == ".csv":
        return _parse_csv((line for _, line in lines), shown)
    return _parse_jsonl(lines, shown)


def _optional_module(name: str, shown: str, purpose: str, package: str, extra: str) -> Any:
    """The module `name`, imported now (never when persona_eval.data is), or a DataError that names the
    file and the extra that installs it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise DataError(f'{purpose} needs {package}: pip install "persona-eval[{extra}]"', path=shown) from None


def _plain(value: Any) -> Any:
    """A value arrow converted to Python, as JSON would give it: a map (which arrow gives as a list of
    (key, value) pairs) as a dict; a struct without its null members, since a struct column has every
    member on every row and null is how a row leaves one out; NaN, pandas' missing value, as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {name: item for name, item in ((name, _plain(item)) for name, item in value.items())
                if item is not None}
    if isinstance(value, list):
        if value and all(isinstance(item, tuple) for item in value):
            return _plain(dict(value))
        return [_plain(item) for item in value]
    return value


def _table_rows(batches: Iterable[Any], shown: str, errors: tuple[type[BaseException], ...],
                broken: str) -> Iterator[tuple[int, Record]]:
    """(row number from 1, record) of each row of arrow record batches (or tables). Rows whose fields
    are all null or blank text are skipped, as all-empty CSV rows are, and keep their numbers; an
    exception of `errors` while reading is a DataError saying `broken`."""
    number = 0
    batches = iter(batches)
    while True:
        try:
            batch = next(batches, None)
        except errors as exc:
            raise DataError(f"{broken} ({exc})", path=shown, row=number + 1) from None
        if batch is None:
            return
        for row in batch.to_pylist():
            number += 1
            record = {str(name): _plain(item) for name, item in row.items()}
            if any(_present(record, name) for name in record):
                yield number, record


def _parquet_rows(path: Path, shown: str) -> Generator[tuple[int, Record], None, None]:
    parquet = _optional_module("pyarrow.parquet", shown, "reading Parquet", "pyarrow", "parquet")
    arrow = importlib.import_module("pyarrow")
    errors = (arrow.ArrowException, OSError)
    with _open(path, shown) as handle:
        try:
            table = parquet.ParquetFile(handle)
        except errors as exc:
            raise DataError(f"not a readable Parquet file ({exc})", path=shown) from None
        yield from _table_rows(table.iter_batches(batch_size=ROW_BATCH), shown, errors,
                               "the Parquet file is damaged from about this row on")


def _folder_files(path: Path) -> list[Path]:
    """The files under `path`, in sorted order of their paths relative to it."""
    files = (item for item in path.rglob("*") if item.is_file())
    return sorted(files, key=lambda item: item.relative_to(path).as_posix())


def _folder_rows(path: Path, shown: str) -> Generator[tuple[int, Record], None, None]:
    if not (path / "state.json").is_file() and not (path / "dataset_dict.json").is_file():
        raise DataError("is a directory, not a data file nor a folder written by datasets' save_to_disk "
                        "(it holds no state.json or dataset_dict.json)", path=shown)
    size = sum(item.stat().st_size for item in _folder_files(path))
    if size > MAX_FILE_BYTES:
        raise _too_large(size, shown, "folder's files are")
    datasets = _optional_module("datasets", shown, "reading a datasets folder", "datasets", "datasets")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets documents no error kinds, and a damaged folder raises many
        raise DataError(f"cannot read the datasets folder ({type(exc).__name__}: {exc})", path=shown) from None
    if isinstance(loaded, datasets.DatasetDict):
        # Each split of a DatasetDict folder is a Dataset folder of its own, so a path names one.
        splits = sorted(loaded)
        if not splits:
            raise DataError("holds a DatasetDict with no splits", path=shown)
        raise DataError(f"holds a DatasetDict with the splits {', '.join(map(repr, splits))}; give the "
                        f"folder of one, e.g. {Path(shown) / splits[0]}", path=shown)
    # Arrow tables, whatever format the dataset was saved with (numpy, pandas, torch), so that every
    # value reaches validation as plain Python, as it comes from a Parquet file.
    arrow = importlib.import_module("pyarrow")
    yield from _table_rows(loaded.with_format("arrow").iter(batch_size=ROW_BATCH), shown,
                           (arrow.ArrowException, OSError), "the datasets folder is damaged from about this row on")


def _unit(kind: str) -> str:
    return "row" if kind in _TABLES else "line"


def _noun(kind: str) -> str:
    return "folder" if kind == _FOLDER else "file"


def _read(path: Path, shown: str, kind: str) -> Generator[tuple[int, Record], None, None]:
    """(line or row number, record) of each record of the data file or folder `path` of kind `kind`
    (see _source_kind); close it to release the file."""
    if kind == ".parquet":
        yield from _parquet_rows(path, shown)
    elif kind == _FOLDER:
        yield from _folder_rows(path, shown)
    else:
        with contextlib.closing(_file_lines(path, shown)) as lines:
            yield from _records(lines, kind, shown)


def load_triage_cases(path: str | os.PathLike[str], *, stratum: str | None = None,
                      format: str | None = None, report: DatasetReport | None = None) -> list[TriageCase]:
    """The triage cases of a ``.jsonl``, ``.csv`` or ``.parquet`` file or a ``datasets`` folder, in file
    order, validated.

    The layout (``project`` or ``vignette``, see the module docstring) is detected from the first
    record's fields; ``format=`` forces it. ``stratum=`` is a default, never an override: it fills the
    stratum of lines that give none (in either layout), and lines that give one keep theirs.
    ``TriageCase.source`` is "path:line" ("path: row N" for a table). Ids must be unique within the file;
    a vignette-layout line without an id gets "<file stem>-<line or row>". ``report``, when given, is
    filled in with the fields that were ignored.

    Raises DataError naming the file, line and field for any problem in the file (including a missing
    file, an unsupported extension, a field name that looks like a mistake for one of the layout, and a
    field or file over the size limits), and ConfigError for an unknown ``stratum=`` or ``format=``.
    """
    if format is not None and format not in FORMATS:
        raise ConfigError(unknown_name_message("dataset format", format, FORMATS))
    if stratum is not None and (problem := stratum_problem(stratum)) is not None:
        raise ConfigError(f"default stratum {stratum!r}: {problem}")
    shown, file = str(path), Path(path)
    kind = _source_kind(file, shown, _TRIAGE_SUFFIXES)
    unit = _unit(kind)

    layout = format
    fields: _LayoutFields | None = None
    cases: list[TriageCase] = []
    first_line: dict[str, int] = {}
    strata = _Strata()
    with contextlib.closing(_read(file, shown, kind)) as records:
        for number, record in records:
            where = _Where(shown, number, unit)
            if layout is None:
                layout = _detect_format(record)
            if fields is None:
                fields = _LayoutFields(layout)
            fields.check(record, where)
            if layout == "vignette":
                case = _vignette_case(record, where, stratum, file.stem, strata)
            else:
                case = _project_case(record, where, stratum, strata)
            if case.id in first_line:
                raise where.error(f"duplicate id {case.id!r} (first seen at {unit} {first_line[case.id]})", "id")
            first_line[case.id] = number
            cases.append(case)
    if not cases or fields is None:
        only_header = " (only a header row)" if kind == ".csv" else ""
        raise DataError(f"no cases in the {_noun(kind)}{only_header}", path=shown)
    fields.fill(report, shown, unit)
    return cases


def load_labelled_cases(path: str | os.PathLike[str], *, labels: Sequence[str], strata: Sequence[str],
                        report: DatasetReport | None = None) -> list[TriageCase]:
    """The cases of a classification task of your own, from a ``.jsonl``, ``.csv`` or ``.parquet`` file or a
    ``datasets`` folder, in file order:
    ``id`` (unique), ``text`` (what the model reads), ``reference`` (one of `labels`), ``stratum`` (one of
    `strata`) and an optional ``rationale``. Raises DataError naming the file, line and field for any
    problem, as load_triage_cases does (other fields are reported in `report`)."""
    shown, file = str(path), Path(path)
    kind = _source_kind(file, shown, _TRIAGE_SUFFIXES)
    unit = _unit(kind)
    fields = _LayoutFields("labelled case")
    cases: list[TriageCase] = []
    first_line: dict[str, int] = {}
    with contextlib.closing(_read(file, shown, kind)) as records:
        for number, record in records:
            where = _Where(shown, number, unit)
            fields.check(record, where)
            case_id = _identifier(record, where)
            for name, allowed in (("reference", labels), ("stratum", strata)):
                value = _text(record, name, where)
                if value not in allowed:
                    raise where.error(f"{value!r} is not allowed; allowed: {', '.join(allowed)}", name)
            if case_id in first_line:
                raise where.error(f"duplicate id {case_id!r} (first seen at {unit} {first_line[case_id]})", "id")
            first_line[case_id] = number
            cases.append(TriageCase(id=case_id, stratum=_text(record, "stratum", where),
                                    reference=_text(record, "reference", where),
                                    rationale=_optional_text(record, "rationale", where, default=""),
                                    text=_text(record, "text", where), source=where.source))
    if not cases:
        raise DataError(f"no cases in the {_noun(kind)}", path=shown)
    fields.fill(report, shown, unit)
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


def load_safety_queries(path: str | os.PathLike[str], *, report: DatasetReport | None = None
                        ) -> list[SafetyQuery]:
    """The patient-safety queries of a ``.jsonl`` or ``.parquet`` file or a ``datasets`` folder, in the
    public benchmark's layout, in file order.

    Each line holds ``id`` (an integer or non-empty text; unique in the file), ``content`` (the query)
    and ``category`` (an integer key of persona_eval.tasks.safety.CATEGORIES). Other fields are ignored
    (``report``, when given, is filled in with them), except one that looks like a mistake for one of
    these (see the module docstring). Raises DataError naming the file, line and field for any problem.
    """
    shown, file = str(path), Path(path)
    kind = _source_kind(file, shown, _SAFETY_SUFFIXES)
    unit = _unit(kind)
    fields = _LayoutFields("safety query")
    queries: list[SafetyQuery] = []
    first_line: dict[str, int] = {}
    with contextlib.closing(_read(file, shown, kind)) as records:
        for number, record in records:
            where = _Where(shown, number, unit)
            fields.check(record, where)
            query_id = _identifier(record, where)
            content = _text(record, "content", where)
            category = _category(record, where)
            if query_id in first_line:
                raise where.error(f"duplicate id {query_id!r} (first seen at {unit} {first_line[query_id]})", "id")
            first_line[query_id] = number
            queries.append(SafetyQuery(id=query_id, content=content, category=category, source=where.source))
    if not queries:
        raise DataError(f"no queries in the {_noun(kind)}", path=shown)
    fields.fill(report, shown, unit)
    return queries


def _hash_file(path: Path, digest: Any) -> None:
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)


def dataset_fingerprint(path: str | os.PathLike[str]) -> str:
    """``sha256:<hex>`` of the file's bytes, for run metadata and cache keys.

    Any change to the file, even whitespace, changes the fingerprint; the same bytes always give the same.
    For a folder (a ``datasets`` folder): of its files in sorted order of their relative paths, each
    given by that path and its length before its bytes, so a renamed, moved or added file changes it too.
    """
    digest = hashlib.sha256()
    folder = Path(path)
    try:
        if folder.is_dir():
            for item in _folder_files(folder):
                name = item.relative_to(folder).as_posix().encode()
                digest.update(b"%d:%s:%d:" % (len(name), name, item.stat().st_size))
                _hash_file(item, digest)
        else:
            _hash_file(folder, digest)
    except FileNotFoundError:
        raise DataError("no such file", path=str(path)) from None
    except OSError as exc:
        raise DataError(f"cannot read the file ({exc.strerror})", path=str(path)) from None
    return f"sha256:{digest.hexdigest()}"
