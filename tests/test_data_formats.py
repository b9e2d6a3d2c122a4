"""Datasets as Parquet files and as folders written by Hugging Face datasets' save_to_disk: the same
validation as JSON lines, rows where a text file has lines, and the optional libraries' messages."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from persona_eval import data
from persona_eval.data import (
    URGENCY_LEVELS,
    DatasetReport,
    dataset_fingerprint,
    load_labelled_cases,
    load_safety_queries,
    load_triage_cases,
)
from persona_eval.errors import DataError

REPO = Path(__file__).resolve().parent.parent
TRIAGE_FIXTURE = REPO / "fixtures" / "triage" / "vignettes.jsonl"
SAFETY_FIXTURE = REPO / "fixtures" / "safety" / "queries.jsonl"
CODES = {label: code for code, label in URGENCY_LEVELS.items()}


def fixture_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def triage_records() -> list[dict[str, Any]]:
    """The triage fixture's records with ``history`` always a list: an arrow column has one type, and the
    fixture gives some histories as text and others as lists."""
    records = fixture_records(TRIAGE_FIXTURE)
    for record in records:
        if isinstance(record.get("history"), str):
            record["history"] = [record["history"]]
    return records


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def columns(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Records as columns: every field of any record, None where a record lacks it."""
    names = list(dict.fromkeys(name for record in records for name in record))
    return {name: [record.get(name) for record in records] for name in names}


def write_parquet(path: Path, records: list[dict[str, Any]], **options: Any) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table(columns(records)), path, **options)
    return path


def write_folder(path: Path, records: list[dict[str, Any]], *, format: str | None = None) -> Path:
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict(columns(records))
    if format is not None:
        dataset.set_format(format)  # saved with the folder, and restored by load_from_disk
    dataset.save_to_disk(str(path))
    return path


def without_source(cases: list[Any]) -> list[Any]:
    return [dataclasses.replace(case, source="") for case in cases]


def load_error(path: Path, loader: Any = load_triage_cases, **options: Any) -> str:
    with pytest.raises(DataError) as excinfo:
        loader(path, **options)
    return str(excinfo.value)


TEXT_CASE: dict[str, Any] = {"id": "chest-1", "stratum": "emergency", "reference": "C",
                             "rationale": "Crushing chest pain.", "text": "A 58-year-old man has chest pain."}


# --- the same cases from every source ------------------------------------------------------------------

def test_the_triage_fixture_loads_alike_from_jsonl_parquet_and_a_folder(tmp_path: Path) -> None:
    records = triage_records()
    from_jsonl = load_triage_cases(write_jsonl(tmp_path / "cases.jsonl", records))
    parquet = write_parquet(tmp_path / "cases.parquet", records)
    folder = write_folder(tmp_path / "cases", records)
    from_parquet, from_folder = load_triage_cases(parquet), load_triage_cases(folder)
    assert len(from_jsonl) == len(records) == 104
    assert without_source(from_parquet) == without_source(from_jsonl)
    assert without_source(from_folder) == without_source(from_jsonl)
    assert any(case.intake and case.intake.get("vital_signs") for case in from_parquet)  # structs became dicts
    assert [case.source for case in from_parquet[:2]] == [f"{parquet}: row 1", f"{parquet}: row 2"]
    assert from_folder[-1].source == f"{folder}: row 104"


def test_the_vignette_layout_from_parquet(tmp_path: Path) -> None:
    cases = load_triage_cases(TRIAGE_FIXTURE)
    records = [{"id": case.id, "case_description": case.text, "urgency_level": CODES[case.reference],
                "stratum": case.stratum} for case in cases]
    records[1]["id"] = None  # an id is optional in this layout: the file's stem and the row number
    path = write_parquet(tmp_path / "bench.parquet", records)
    loaded = load_triage_cases(path)
    assert [(c.id, c.text, c.reference, c.stratum) for c in loaded] == [
        ("bench-2" if i == 1 else c.id, c.text, c.reference, c.stratum) for i, c in enumerate(cases)]
    assert loaded[0].source == f"{path}: row 1"


def test_labelled_cases_from_parquet_and_a_folder(tmp_path: Path) -> None:
    records = [{"id": 1, "text": "a sore throat", "reference": "mild", "stratum": "adult"},
               {"id": 2, "text": "a rash", "reference": "severe", "stratum": "child", "rationale": "spreading"}]
    options: dict[str, Any] = {"labels": ["mild", "severe"], "strata": ["adult", "child"]}
    expected = without_source(load_labelled_cases(write_jsonl(tmp_path / "cases.jsonl", records), **options))
    for path in (write_parquet(tmp_path / "cases.parquet", records), write_folder(tmp_path / "cases", records)):
        assert without_source(load_labelled_cases(path, **options)) == expected
    assert [case.id for case in expected] == ["1", "2"]


def test_safety_queries_from_parquet_and_a_folder(tmp_path: Path) -> None:
    records = fixture_records(SAFETY_FIXTURE)
    expected = without_source(load_safety_queries(SAFETY_FIXTURE))
    for path in (write_parquet(tmp_path / "queries.parquet", records), write_folder(tmp_path / "queries", records)):
        report = DatasetReport()
        queries = load_safety_queries(path, report=report)
        assert without_source(queries) == expected
        assert queries[0].id == "1" and queries[0].category == 1  # int64 columns as Python integers
        assert report.unit == "row"
        assert report.message() == (f"{path}: fields not used by persona-eval (ignored): "
                                    f"category_name ({len(records)} rows)")


def test_a_folder_saved_in_numpy_format_reads_as_plain_values(tmp_path: Path) -> None:
    records = [{"id": 7, "content": "Can I double my dose?", "category": 2}]
    folder = write_folder(tmp_path / "queries", records, format="numpy")
    [query] = load_safety_queries(folder)
    assert (query.id, query.category) == ("7", 2)
    assert type(query.category) is int


def test_arrow_values_reach_validation_as_json_values(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    schema = pa.schema([("id", pa.int64()), ("stratum", pa.string()), ("reference", pa.string()),
                        ("rationale", pa.string()), ("presenting_symptoms", pa.string()),
                        ("age", pa.int32()), ("vital_signs", pa.map_(pa.string(), pa.string())),
                        ("history", pa.list_(pa.string())), ("notes", pa.float64())])
    rows = [{"id": 1, "stratum": "emergency", "reference": "C", "rationale": "r", "presenting_symptoms": "chest pain",
             "age": 58, "vital_signs": [("HR", "120"), ("BP", "90/60")], "history": ["angina"],
             "notes": float("nan")},
            {"id": 2, "stratum": "emergency", "reference": "C", "rationale": "r", "presenting_symptoms": "faint",
             "age": None, "vital_signs": None, "history": None, "notes": 1.5}]
    path = tmp_path / "cases.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    report = DatasetReport()
    first, second = load_triage_cases(path, report=report)
    assert first.id == "1" and first.intake == {"age": 58, "presenting_symptoms": "chest pain",
                                                 "vital_signs": {"HR": "120", "BP": "90/60"}, "history": ["angina"]}
    assert type(first.intake["age"]) is int
    assert second.intake == {"presenting_symptoms": "faint"}  # nulls are absent fields
    assert report.unknown_fields == {"notes": 1}  # NaN is null: a value on one row only
    assert report.first_lines == {"notes": 2}


def test_struct_members_a_row_lacks_are_left_out(tmp_path: Path) -> None:
    records = [{**TEXT_CASE, "id": "a", "text": None, "presenting_symptoms": "cough", "vital_signs": {"HR": 80}},
               {**TEXT_CASE, "id": "b", "text": None, "presenting_symptoms": "fever", "vital_signs": {"Temp": "39 C"}}]
    first, second = load_triage_cases(write_parquet(tmp_path / "cases.parquet", records))
    assert first.intake is not None and first.intake["vital_signs"] == {"HR": 80}
    assert second.intake is not None and second.intake["vital_signs"] == {"Temp": "39 C"}


def test_all_null_rows_are_skipped_and_keep_their_numbers(tmp_path: Path) -> None:
    blank = dict.fromkeys(TEXT_CASE, None) | {"text": "  "}
    path = write_parquet(tmp_path / "cases.parquet", [TEXT_CASE, blank, {**TEXT_CASE, "id": "chest-2"}])
    assert [case.source for case in load_triage_cases(path)] == [f"{path}: row 1", f"{path}: row 3"]


# --- errors cite the row -------------------------------------------------------------------------------

def test_a_malformed_row_cites_row_and_field(tmp_path: Path) -> None:
    records = [TEXT_CASE, {**TEXT_CASE, "id": "chest-2", "reference": "D"}]
    for path in (write_parquet(tmp_path / "cases.parquet", records), write_folder(tmp_path / "cases", records)):
        assert load_error(path).startswith(f"{path}: row 2: field 'reference': label 'D' is not allowed; "
                                           "allowed: A, B, C")


def test_row_errors_of_every_kind(tmp_path: Path) -> None:
    duplicate = write_parquet(tmp_path / "duplicate.parquet", [TEXT_CASE, TEXT_CASE])
    assert load_error(duplicate) == (f"{duplicate}: row 2: field 'id': duplicate id 'chest-1' "
                                     "(first seen at row 1)")
    missing = write_parquet(tmp_path / "missing.parquet", [{**TEXT_CASE, "rationale": None}])
    assert load_error(missing) == f"{missing}: row 1: field 'rationale': required field is empty"
    near_miss = write_parquet(tmp_path / "near.parquet", [{**TEXT_CASE, "Reference": "C", "reference": None}])
    assert load_error(near_miss).startswith(f"{near_miss}: row 1: field 'Reference': not a field of the project "
                                            "layout; did you mean 'reference'?")
    queries = write_parquet(tmp_path / "queries.parquet", [{"id": 1, "content": "q", "category": 1},
                                                          {"id": 2, "content": "q", "category": 9}])
    assert load_error(queries, load_safety_queries).startswith(f"{queries}: row 2: field 'category': category 9 "
                                                               "is outside 1-5")
    # A column of fractions is one of floats, 1.0 on the first row included: not an integer, as in JSON.
    floats = write_parquet(tmp_path / "floats.parquet", [{"id": 1, "content": "q", "category": 1},
                                                         {"id": 2, "content": "q", "category": 2.5}])
    assert load_error(floats, load_safety_queries) == (f"{floats}: row 1: field 'category': expected an "
                                                       "integer 1-5, got a number (1.0)")


def test_a_file_that_is_not_parquet(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    path = tmp_path / "cases.parquet"
    path.write_text("id,text\n1,not parquet\n", encoding="utf-8")
    assert load_error(path).startswith(f"{path}: not a readable Parquet file (")
    assert load_error(tmp_path / "absent.parquet") == f"{tmp_path / 'absent.parquet'}: no such file"


def test_a_parquet_file_without_rows_has_no_cases(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "cases.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.string())}), path)
    assert load_error(path) == f"{path}: no cases in the file"
    assert load_error(path, load_safety_queries) == f"{path}: no queries in the file"


def test_a_damaged_datasets_folder(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "cases", [TEXT_CASE])
    (folder / "state.json").write_text("{not json", encoding="utf-8")
    assert load_error(folder).startswith(f"{folder}: cannot read the datasets folder (JSONDecodeError: ")


def test_the_unsupported_suffix_message_lists_the_table_sources(tmp_path: Path) -> None:
    path = tmp_path / "cases.xlsx"
    path.write_bytes(b"PK")
    assert load_error(path) == (f"{path}: unsupported file type '.xlsx'; supported: .jsonl, .csv, .parquet, "
                                "or a folder written by datasets' save_to_disk")
    assert load_error(path, load_safety_queries) == (f"{path}: unsupported file type '.xlsx'; supported: "
                                                     ".jsonl, .parquet, or a folder written by datasets' "
                                                     "save_to_disk")
    assert load_error(tmp_path / "absent") == f"{tmp_path / 'absent'}: no such file or folder"


# --- folders -------------------------------------------------------------------------------------------

def test_a_dataset_dict_folder_needs_a_split_named_by_its_subfolder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_dict(columns([TEXT_CASE]))
    test = datasets.Dataset.from_dict(columns([{**TEXT_CASE, "id": "chest-9", "reference": "B"}]))
    folder = tmp_path / "cases"
    datasets.DatasetDict(train=train, test=test).save_to_disk(str(folder))
    assert load_error(folder) == (f"{folder}: holds a DatasetDict with the splits 'test', 'train'; give the "
                                  f"folder of one, e.g. {folder / 'test'}")
    [case] = load_triage_cases(folder / "test")
    assert (case.id, case.reference, case.source) == ("chest-9", "B", f"{folder / 'test'}: row 1")


def test_a_folder_not_written_by_datasets(tmp_path: Path) -> None:
    folder = tmp_path / "cases"
    folder.mkdir()
    write_jsonl(folder / "cases.jsonl", [TEXT_CASE])
    assert load_error(folder) == (f"{folder}: is a directory, not a data file nor a folder written by datasets' "
                                  "save_to_disk (it holds no state.json or dataset_dict.json)")
    # A folder named like a data file is still a directory where a file was expected.
    named = tmp_path / "cases.parquet"
    named.mkdir()
    assert load_error(named) == f"{named}: is a directory, not a data file"


# --- the optional libraries ----------------------------------------------------------------------------

def test_reading_parquet_without_pyarrow_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "cases.parquet"
    path.write_bytes(b"PAR1")  # never read: the import fails first
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    expected = f'{path}: reading Parquet needs pyarrow: pip install "persona-eval[parquet]"'
    assert load_error(path) == expected
    assert load_error(path, load_safety_queries) == expected


def test_reading_a_folder_without_datasets_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "cases"
    folder.mkdir()
    (folder / "state.json").write_text("{}", encoding="utf-8")
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert load_error(folder) == (f"{folder}: reading a datasets folder needs datasets: "
                                  'pip install "persona-eval[datasets]"')


def test_importing_persona_eval_imports_neither_library() -> None:
    code = "import sys, persona_eval, persona_eval.data; print(sorted({'pyarrow', 'datasets'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert result.stdout.strip() == "[]"


# --- size ----------------------------------------------------------------------------------------------

def test_size_limits_apply_to_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parquet = write_parquet(tmp_path / "cases.parquet", [TEXT_CASE])
    folder = write_folder(tmp_path / "cases", [TEXT_CASE])
    folder_bytes = sum(item.stat().st_size for item in folder.iterdir())
    monkeypatch.setattr(data, "MAX_FILE_BYTES", 100)
    assert load_error(parquet) == (f"{parquet}: the file is {parquet.stat().st_size:,} bytes; at most 100 bytes "
                                   "are read (ten thousand vignettes are under 50 MiB)")
    assert load_error(folder) == (f"{folder}: the folder's files are {folder_bytes:,} bytes; at most 100 bytes "
                                  "are read (ten thousand vignettes are under 50 MiB)")
    monkeypatch.undo()
    long_text = write_parquet(tmp_path / "long.parquet", [TEXT_CASE, {**TEXT_CASE, "id": "b", "text": "t" * 100_001}])
    assert load_error(long_text) == (f"{long_text}: row 2: field 'text': case text is 100,001 characters; at most "
                                     "100,000 are accepted (a vignette is a few thousand)")


def test_parquet_is_read_a_batch_of_rows_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 400 rows each carrying a 50,000-character ignored field: 20 MB once converted to Python, little of it
    # held at once when rows are converted a few at a time.
    records = [{**TEXT_CASE, "id": f"c{i}", "notes": "n" * 50_000} for i in range(400)]
    path = write_parquet(tmp_path / "cases.parquet", records, row_group_size=400)
    monkeypatch.setattr(data, "ROW_BATCH", 8)
    tracemalloc.start()
    try:
        cases = load_triage_cases(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(cases) == 400
    assert peak < 4_000_000


# --- fingerprint ---------------------------------------------------------------------------------------

def test_the_fingerprint_of_a_folder(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "cases", [TEXT_CASE])
    fingerprint = dataset_fingerprint(folder)
    assert fingerprint.startswith("sha256:") and dataset_fingerprint(str(folder)) == fingerprint
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert dataset_fingerprint(copy) == fingerprint
    (copy / "state.json").rename(copy / "state2.json")
    renamed = dataset_fingerprint(copy)
    (copy / "extra").write_bytes(b"")
    added_empty = dataset_fingerprint(copy)
    assert len({fingerprint, renamed, added_empty}) == 3
    parquet = write_parquet(tmp_path / "cases.parquet", [TEXT_CASE])
    assert dataset_fingerprint(parquet) == "sha256:" + hashlib.sha256(parquet.read_bytes()).hexdigest()



# --- end to end through the plugin ---------------------------------------------------------------------

def test_pe_dataset_names_a_split_by_its_folder(pytester: pytest.Pytester) -> None:
    datasets = pytest.importorskip("datasets")
    shutil.copytree(REPO / "evals", pytester.path / "evals")
    folder = pytester.path / "cases"
    good = datasets.Dataset.from_dict(columns([TEXT_CASE]))
    bad = datasets.Dataset.from_dict(columns([{**TEXT_CASE, "reference": "D"}]))
    datasets.DatasetDict(train=good, test=bad).save_to_disk(str(folder))

    def usage_error(dataset: Path) -> str:
        result = pytester.runpytest_subprocess(
            "evals", "-p", "no:cacheprovider", "-k", "triage", "--pe-cache-dir", str(pytester.path / "cache"),
            "--pe-reports-dir", str(pytester.path / "reports"), "--pe-dataset", f"triage={dataset}")
        out = result.stdout.str() + result.stderr.str()
        assert result.ret == pytest.ExitCode.USAGE_ERROR, out
        assert "Traceback" not in out, out
        return out

    assert (f"{folder}: holds a DatasetDict with the splits 'test', 'train'; give the folder of one, "
            f"e.g. {folder / 'test'}") in usage_error(folder)
    assert f"{folder / 'test'}: row 1: field 'reference': label 'D' is not allowed" in usage_error(folder / "test")
