"""Tests of persona_eval.results: run ids, strict JSON, part files joined in order, reports/latest, folders
built whole."""

from __future__ import annotations

import calendar
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from persona_eval.results import (
    finalize_cases,
    new_run_id,
    read_jsonl,
    staged_directory,
    update_latest,
    write_json,
    write_part,
)


def _strict_loads(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


# --- run ids -----------------------------------------------------------------------------------------


def test_run_id_is_utc_time_and_a_random_suffix() -> None:
    before = int(time.time())
    run_id = new_run_id()
    after = int(time.time())
    match = re.fullmatch(r"(\d{8}-\d{6})-([0-9a-f]{6})", run_id)
    assert match, run_id
    stamp = calendar.timegm(time.strptime(match.group(1), "%Y%m%d-%H%M%S"))
    assert before <= stamp <= after


def test_run_ids_are_unique_and_safe_as_directory_names() -> None:
    ids = [new_run_id() for _ in range(300)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f-]+", run_id) for run_id in ids)


# --- JSON --------------------------------------------------------------------------------------------


def test_write_json_turns_nan_and_infinities_into_null(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "summary.json"
    write_json(path, {"accuracy": math.nan, "n": 3, "nested": {"ece": math.inf, "ok": 0.25},
                      "values": [1.0, -math.inf, (math.nan, 2)], 7: "int key"})
    text = path.read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    assert _strict_loads(text) == {"accuracy": None, "n": 3, "nested": {"ece": None, "ok": 0.25},
                                   "values": [1.0, None, [None, 2]], "7": "int key"}
    assert text.endswith("\n")


def test_write_json_replaces_the_file_and_leaves_no_staging_file(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    write_json(path, {"version": 1})
    write_json(path, {"version": 2, "persona": "ed_nurse — médico"})
    assert _strict_loads(path.read_text(encoding="utf-8")) == {"version": 2, "persona": "ed_nurse — médico"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_write_json_refuses_what_json_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        write_json(tmp_path / "bad.json", {"path": tmp_path})


# --- folders built whole -----------------------------------------------------------------------------


def test_a_staged_folder_appears_whole_at_its_target(tmp_path: Path) -> None:
    target = tmp_path / "models" / "tiny"
    with staged_directory(target, complete="weights") as staging:
        assert staging.parent == target.parent and not any(staging.iterdir())
        (staging / "config").write_text("{}")
        (staging / "weights").write_text("w")
        assert not target.exists()
    assert sorted(p.name for p in target.iterdir()) == ["config", "weights"]
    assert [p.name for p in target.parent.iterdir()] == ["tiny"]


def test_a_failed_build_leaves_neither_target_nor_staging(tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    with pytest.raises(RuntimeError), staged_directory(target, complete="weights") as staging:
        (staging / "weights").write_text("half")
        raise RuntimeError("the build failed")
    assert list(tmp_path.iterdir()) == []


def test_a_copy_finished_first_elsewhere_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    target.mkdir()
    (target / "weights").write_text("theirs")
    with staged_directory(target, complete="weights") as staging:
        (staging / "weights").write_text("ours")
    assert (target / "weights").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_an_unfinished_folder_at_the_target_is_an_error(tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    target.mkdir()
    (target / "partial").write_text("")
    with pytest.raises(OSError), staged_directory(target, complete="weights") as staging:
        (staging / "weights").write_text("ours")
    assert [p.name for p in target.iterdir()] == ["partial"]
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


# --- part files and cases.jsonl ----------------------------------------------------------------------


def _records(persona: str, count: int) -> list[dict[str, Any]]:
    return [{"persona": persona, "case_id": f"c{i}", "label_probs": None if i else {"A": math.nan}}
            for i in range(count)]


def test_parts_are_joined_in_the_given_order(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # Written in one order (as xdist workers finish), joined in another (the report's order).
    write_part(run_dir, "triage", "tiny", "ed_nurse", _records("ed_nurse", 2))
    write_part(run_dir, "triage", "tiny", "no_persona", _records("no_persona", 3))
    path = write_part(run_dir, "triage", "tiny", "helpful_assistant", _records("helpful_assistant", 1))
    assert path == run_dir / "parts" / "triage__tiny__helpful_assistant.jsonl"

    order = [("triage", "tiny", "no_persona"), ("triage", "tiny", "helpful_assistant"),
             ("triage", "other", "no_persona"),  # never written: skipped
             ("triage", "tiny", "ed_nurse")]
    target = finalize_cases(run_dir, order)
    assert target == run_dir / "cases.jsonl"
    lines = target.read_text(encoding="utf-8").splitlines()
    assert all(_strict_loads(line) for line in lines)
    joined = read_jsonl(target)
    assert [(r["persona"], r["case_id"]) for r in joined] == [
        ("no_persona", "c0"), ("no_persona", "c1"), ("no_persona", "c2"),
        ("helpful_assistant", "c0"), ("ed_nurse", "c0"), ("ed_nurse", "c1")]
    assert joined[0]["label_probs"] == {"A": None}


def test_finalize_cases_with_no_part_writes_nothing(tmp_path: Path) -> None:
    assert finalize_cases(tmp_path, [("triage", "tiny", "no_persona")]) is None
    assert not (tmp_path / "cases.jsonl").exists()


def test_finalize_cases_can_write_another_file(tmp_path: Path) -> None:
    write_part(tmp_path, "safety", "tiny", "no_persona", [{"id": 1}])
    target = finalize_cases(tmp_path, [("safety", "tiny", "no_persona")], filename="safety_cases.jsonl")
    assert target == tmp_path / "safety_cases.jsonl"
    assert read_jsonl(target) == [{"id": 1}]


def test_read_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "cases.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\n', encoding="utf-8")
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


# --- reports/latest ----------------------------------------------------------------------------------


def test_update_latest_points_at_the_run_with_a_relative_link(tmp_path: Path) -> None:
    run_dir = tmp_path / "20250101-000000-abcdef"
    run_dir.mkdir()
    update_latest(tmp_path, run_dir)
    latest = tmp_path / "latest"
    assert latest.is_symlink()
    assert os.readlink(latest) == run_dir.name
    assert latest.resolve() == run_dir.resolve()


def test_update_latest_replaces_an_older_link(tmp_path: Path) -> None:
    old, new = tmp_path / "20250101-000000-aaaaaa", tmp_path / "20250102-000000-bbbbbb"
    old.mkdir()
    new.mkdir()
    (new / "summary.json").write_text("{}")
    update_latest(tmp_path, old)
    update_latest(tmp_path, new)
    latest = tmp_path / "latest"
    assert os.readlink(latest) == new.name
    assert (latest / "summary.json").exists()
    assert old.is_dir()  # the older run itself is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([old.name, new.name, "latest"])


def test_update_latest_writes_a_text_file_where_links_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    def no_symlinks(self: Path, target: Any, target_is_directory: bool = False) -> None:
        raise OSError("symlinks not supported")

    monkeypatch.setattr(Path, "symlink_to", no_symlinks)
    run_dir = tmp_path / "20250101-000000-cccccc"
    run_dir.mkdir()
    update_latest(tmp_path, run_dir)
    assert (tmp_path / "latest.txt").read_text(encoding="utf-8") == run_dir.name + "\n"


def test_a_damaged_jsonl_line_names_the_file_and_line(tmp_path: Path) -> None:
    from persona_eval.errors import DataError

    path = tmp_path / "cases.jsonl"
    path.write_text('{"a": 1}\n\n{"b": 2\n')
    with pytest.raises(DataError, match=r"cases\.jsonl:3: not valid JSON .*the file is damaged"):
        read_jsonl(path)


def test_a_truncated_summary_is_a_data_error_for_report_and_the_cli(tmp_path: Path) -> None:
    import subprocess
    import sys

    from persona_eval.errors import DataError
    from persona_eval.report.html import write_report
    from persona_eval.results import read_json

    (tmp_path / "summary.json").write_text('{"run_id": "r1",\n "verdict": {"passed": tr')
    with pytest.raises(DataError, match=r"summary\.json:2: not valid JSON .*damaged or truncated"):
        read_json(tmp_path / "summary.json")
    cli = subprocess.run([sys.executable, "-m", "persona_eval.cli", "report", str(tmp_path)], capture_output=True,
                         text=True, timeout=120, check=False)
    assert cli.returncode == 2
    assert f"{tmp_path / 'summary.json'}:2: not valid JSON" in cli.stderr and "Traceback" not in cli.stderr
    (tmp_path / "summary.json").write_text('["not", "a", "summary"]')
    with pytest.raises(DataError, match="not a persona-eval summary"):
        write_report(tmp_path)


# --- secrets -----------------------------------------------------------------------------------------

KEY = "sk-test-0123456789abcdef"
MASKED = "[secret $OPENAI_API_KEY masked]"


def _all_bytes(folder: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file())


def test_every_writer_masks_the_secrets_it_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from persona_eval.results import write_text

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    run_dir = tmp_path / "run"
    echoed = {"case_id": "t1", "generated_text": f"Answer: B Bearer {KEY}", KEY: [KEY], "secrets_masked": []}
    write_part(run_dir, "triage", "m", "ed_nurse", [echoed])
    write_json(run_dir / "summary.json", {"notes": [f"the server said {KEY}"]})
    write_text(run_dir / "report.html", f"<pre>{KEY}</pre>")
    # A part that holds the key however it got there (written by hand, by an older version) is masked when joined.
    (run_dir / "parts" / "triage__m__no_persona.jsonl").write_text(json.dumps({"case_id": "t0", "text": KEY}) + "\n")
    target = finalize_cases(run_dir, [("triage", "m", "no_persona"), ("triage", "m", "ed_nurse")])
    assert target is not None
    records = read_jsonl(target)
    assert records[0] == {"case_id": "t0", "text": MASKED}
    assert records[1] == {"case_id": "t1", "generated_text": f"Answer: B Bearer {MASKED}", MASKED: [MASKED],
                          "secrets_masked": []}
    assert json.loads((run_dir / "summary.json").read_text()) == {"notes": [f"the server said {MASKED}"]}
    assert (run_dir / "report.html").read_text() == f"<pre>{MASKED}</pre>"
    (run_dir / "parts" / "triage__m__no_persona.jsonl").unlink()  # the planted file, not a writer's
    assert KEY.encode() not in _all_bytes(run_dir)


def test_a_secret_holding_a_quote_is_masked_and_the_line_stays_json(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXY_PASSWORD", 'pa"ss\\word-1234')
    path = write_part(tmp_path, "triage", "m", "ed_nurse", [{"text": 'user:pa"ss\\word-1234@proxy'}])
    assert read_jsonl(path) == [{"text": "user:[secret $PROXY_PASSWORD masked]@proxy"}]


def test_the_latest_text_file_and_the_ci_step_summary_are_masked(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from persona_eval.report.markdown import append_step_summary

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    run_dir = tmp_path / f"run-{KEY}"
    run_dir.mkdir()

    def no_links(self: Path, target: Any, target_is_directory: bool = False) -> None:
        raise OSError("symlinks are not supported here")

    monkeypatch.setattr(Path, "symlink_to", no_links)
    update_latest(tmp_path, run_dir)
    assert (tmp_path / "latest.txt").read_text() == f"run-{MASKED}\n"
    step_summary = tmp_path / "step_summary.md"
    step_summary.write_text("## an earlier step\n")
    append_step_summary(step_summary, f"model at http://proxy/{KEY}")
    assert step_summary.read_text() == f"## an earlier step\nmodel at http://proxy/{MASKED}\n"


def test_compare_on_a_damaged_run_names_the_file_and_the_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    for name in ("approved", "candidate"):
        run = tmp_path / name
        run.mkdir()
        (run / "summary.json").write_text(json.dumps({"run_id": name, "metadata": {"models": {}, "datasets": {}}}))
        (run / "cases.jsonl").write_text('{"task": "triage", "model": "m", "persona": "no_persona"}\n')
    (tmp_path / "approved" / "cases.jsonl").write_text('{"task": "triage", "model": "m"}\n{"task": "tri')
    cli = subprocess.run([sys.executable, "-m", "persona_eval.cli", "compare", str(tmp_path / "approved"),
                          str(tmp_path / "candidate")], capture_output=True, text=True, timeout=120, check=False)
    assert cli.returncode == 2
    assert f"{tmp_path / 'approved' / 'cases.jsonl'}:2: not valid JSON" in cli.stderr
    assert "Traceback" not in cli.stderr


# --- streaming: cases.jsonl copied line by line, the same file as before -----------------------------


def _joined_as_before(run_dir: Path, order: list[tuple[str, str, str]]) -> bytes:
    """cases.jsonl as finalize_cases wrote it before it streamed: every record loaded, then each
    serialized again (masked, NaN as null)."""
    from persona_eval.redaction import scrub
    from persona_eval.results import json_safe

    records: list[Any] = []
    for triple in order:
        path = run_dir / "parts" / ("__".join(triple) + ".jsonl")
        if path.exists():
            records += read_jsonl(path)
    return "".join(json.dumps(scrub(json_safe(r)), ensure_ascii=False, allow_nan=False) + "\n"
                   for r in records).encode()


def _varied_records(persona: str) -> list[dict[str, Any]]:
    return [{"persona": persona, "case_id": "c0", "generated_text": 'She said "chest pain"\n\tC\\D — médico 🩺',
             "label_probs": {"A": math.nan, "B": 0.1 + 0.2, "C": 1e-300}, "latency": -0.0, "tokens": 12345678},
            {"persona": persona, "case_id": "c1", "control": "\x1b[0m\x00", "nested": [[], {}, [None, True]]}]


ORDER = [("triage", "m", "no_persona"), ("triage", "m", "ed_nurse"), ("triage", "m", "never_ran")]


@pytest.mark.parametrize("a_secret_is_known", [False, True])
def test_cases_jsonl_is_the_file_it_was_before_streaming(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          a_secret_is_known: bool) -> None:
    if a_secret_is_known:  # one that no record holds: every line is copied as it is
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
    for _, model, persona in ORDER[:2]:
        write_part(tmp_path, "triage", model, persona, _varied_records(persona))
    target = finalize_cases(tmp_path, ORDER)
    assert target is not None
    assert target.read_bytes() == _joined_as_before(tmp_path, ORDER)
    assert [r["case_id"] for r in read_jsonl(target)] == ["c0", "c1", "c0", "c1"]


def test_a_hand_written_part_is_joined_strict_and_masked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "triage__m__no_persona.jsonl").write_text(
        '{"score": NaN, "worst": -Infinity}\n'
        + json.dumps({"text": f"key {KEY} é"}) + "\n"  # ensure_ascii: the é is a \u escape
        # Every letter of the key escaped: only a reader of the JSON sees the key.
        + '{"text": "' + "".join(f"\\u{ord(c):04x}" for c in KEY) + '"}\n', encoding="utf-8")
    target = finalize_cases(tmp_path, ORDER)
    assert target is not None
    assert [_strict_loads(line) for line in target.read_text(encoding="utf-8").splitlines()] == [
        {"score": None, "worst": None}, {"text": f"key {MASKED} é"}, {"text": MASKED}]
    assert target.read_bytes() == _joined_as_before(tmp_path, ORDER)


def test_a_secret_known_only_after_the_part_was_written_is_masked_when_joined(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A key of this test's own: one that another test of this process made known would be masked from the start.
    late = "sk-test-known-late-5a1f9c0e7d"
    write_part(tmp_path, "triage", "m", "no_persona", [{"text": f"Bearer {late}", late: 1, "n": 2}])
    assert late in (tmp_path / "parts" / "triage__m__no_persona.jsonl").read_text()
    monkeypatch.setenv("OPENAI_API_KEY", late)
    target = finalize_cases(tmp_path, ORDER)
    assert target is not None
    assert read_jsonl(target) == [{"text": f"Bearer {MASKED}", MASKED: 1, "n": 2}]
    assert late not in target.read_text()


@pytest.mark.parametrize(("secret", "record"), [
    # Its JSON spelling (pa\"ss...) is in the line: masked as data, the line stays JSON.
    ('pa"ss\\word-1234', {"text": 'user:pa"ss\\word-1234@proxy', "n": 1}),
    # Matches the JSON around two strings, not a string: masking the line's text would break it.
    ('1234", "key', {"a": "1234", "key": 1}),
    # Matches the tail of the \n escape of a newline: masking the text would leave a lone backslash.
    ("nsecret-value", {"text": "line\nsecret-value"}),
    # A secret of digits matches a number: masking the text would put an unquoted word in its place.
    ("98765432", {"tokens": 98765432, "text": "the PIN 98765432"}),
])
def test_a_secret_is_masked_as_data_never_as_the_lines_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             secret: str, record: dict[str, Any]) -> None:
    write_part(tmp_path, "triage", "m", "no_persona", [record])  # before the secret is known
    monkeypatch.setenv("PROXY_PASSWORD", secret)
    target = finalize_cases(tmp_path, ORDER)
    assert target is not None
    [joined] = [_strict_loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    masked = "[secret $PROXY_PASSWORD masked]"
    assert joined == {key: value.replace(secret, masked) if isinstance(value, str) else value
                      for key, value in record.items()}


# --- streaming: files appear whole -------------------------------------------------------------------


def test_a_damaged_part_line_names_the_part_and_leaves_cases_jsonl_as_it_was(tmp_path: Path) -> None:
    from persona_eval.errors import DataError

    write_part(tmp_path, "triage", "m", "no_persona", _records("no_persona", 3))
    damaged = write_part(tmp_path, "triage", "m", "ed_nurse", _records("ed_nurse", 2))
    damaged.write_text(damaged.read_text() + '{"persona": "ed_nurse", "case_id": "c2", "label\n')
    (tmp_path / "cases.jsonl").write_text('{"from": "an earlier join"}\n')
    with pytest.raises(DataError, match=r"triage__m__ed_nurse\.jsonl:3: not valid JSON .*the file is damaged"):
        finalize_cases(tmp_path, ORDER)
    assert read_jsonl(tmp_path / "cases.jsonl") == [{"from": "an earlier join"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cases.jsonl", "parts"]


def test_write_jsonl_shows_no_half_file_and_leaves_none_when_it_fails(tmp_path: Path) -> None:
    from persona_eval.results import write_jsonl

    target = tmp_path / "cases.jsonl"

    def records() -> Any:
        for number in range(3):
            assert not target.exists()  # nothing at the target while it is written
            yield {"case_id": f"c{number}"}
        raise RuntimeError("the run was stopped")

    with pytest.raises(RuntimeError):
        write_jsonl(target, records())
    assert list(tmp_path.iterdir()) == []
    write_jsonl(target, ({"case_id": f"c{number}"} for number in range(3)))
    assert [r["case_id"] for r in read_jsonl(target)] == ["c0", "c1", "c2"]
    assert [p.name for p in tmp_path.iterdir()] == ["cases.jsonl"]


def test_parts_with_only_blank_lines_write_nothing(tmp_path: Path) -> None:
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "triage__m__no_persona.jsonl").write_text("\n  \n")
    assert finalize_cases(tmp_path, ORDER) is None
    assert [p.name for p in tmp_path.iterdir()] == ["parts"]


# --- streaming: memory does not grow with the run ----------------------------------------------------


@pytest.mark.parametrize("a_secret_is_known", [False, True])
def test_writing_and_joining_parts_takes_memory_of_one_record_not_of_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, a_secret_is_known: bool) -> None:
    import tracemalloc

    from persona_eval.results import write_jsonl

    if a_secret_is_known:
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
    personas, per_part, text = 8, 200, "Answer: C. " * 400  # 4 KiB of text per record, 6.5 MiB in all

    def records(persona: str) -> Any:
        return ({"persona": persona, "case_id": f"c{i}", "generated_text": text + str(i)} for i in range(per_part))

    order = [("triage", "m", f"persona{p}") for p in range(personas)]
    tracemalloc.start()
    try:
        for _, _, persona in order:
            write_jsonl(tmp_path / "parts" / f"triage__m__{persona}.jsonl", records(persona))
        written_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        target = finalize_cases(tmp_path, order)
        joined_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert target is not None
    total = target.stat().st_size
    assert total > 6 * 2**20
    # A few records' worth at most (the file buffers, one line and its JSON), not the run's 6.5 MiB.
    assert written_peak < total / 20, (written_peak, total)
    assert joined_peak < total / 20, (joined_peak, total)
