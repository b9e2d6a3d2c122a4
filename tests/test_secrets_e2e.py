"""End to end through the real plugin: a server that echoes the Authorization header into every answer
(a misbehaving proxy) leaks the API key into nothing the run prints or writes.

The run completes with and without the result cache; each answer is kept with the key masked, its record
in cases.jsonl says which secret was masked, and report.html says so beside the answer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from persona_eval.testing.standin import StandInServer

REPO = Path(__file__).resolve().parent.parent
NAME = "echoing"
KEY = "sk-e2e-7f3a9c1d5b2e8f4a6c0d"
MASKED = "[secret $OPENAI_API_KEY masked]"

pytestmark = pytest.mark.slow


def files_under(*folders: Path) -> list[Path]:
    return [path for folder in folders if folder.exists() for path in sorted(folder.rglob("*")) if path.is_file()]


def run_triage(pytester: pytest.Pytester, base_url: str, *options: str) -> tuple[str, list[dict[str, Any]]]:
    """Run the triage evals on two vignettes per stratum; their output and the run's cases.jsonl."""
    result = pytester.runpytest_subprocess(
        "evals", "-p", "no:cacheprovider", "-k", "triage", "--pe-limit", "2", "--pe-persona", "ed_nurse",
        "--pe-model", f"openai:{NAME}@{base_url}",
        "--pe-dataset", f"triage={REPO / 'fixtures/triage/vignettes.jsonl'}",
        "--pe-cache-dir", str(pytester.path / "cache"), "--pe-reports-dir", str(pytester.path / "reports"),
        "-rA", *options, timeout=300)
    output = result.stdout.str() + result.stderr.str()
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), output
    run_dir = (pytester.path / "reports" / "latest").resolve()
    return output, [json.loads(line) for line in (run_dir / "cases.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("cache", ["cache", "no-cache"])
def test_an_echoed_key_reaches_no_file_and_no_output(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                                     cache: str) -> None:
    shutil.copytree(REPO / "evals", pytester.path / "evals")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    options = ["--pe-no-cache"] if cache == "no-cache" else []
    with StandInServer(served_name=NAME, echo_headers=True, answer=lambda messages: "Answer: B") as server:
        output, cases = run_triage(pytester, server.base_url, *options)
        sent = {request.headers.get("authorization") for request in server.requests_to("/v1/chat/completions")}
        outputs = [output]
        if cache == "cache":  # answered from the cache the second time, with the same note
            output, again = run_triage(pytester, server.base_url)
            outputs.append(output)
            assert all(record["cached"] for record in again) and again == [
                {**record, "run_id": again[0]["run_id"], "cached": True} for record in cases]
    assert sent == {f"Bearer {KEY}"}  # the server did see the key, and echoed it

    assert len(cases) == 3 * 4  # two vignettes per stratum, for no_persona, the placebo and ed_nurse
    for record in cases:
        assert record["generated_text"] == f"Answer: B Bearer {MASKED}"
        assert record["secrets_masked"] == ["OPENAI_API_KEY"]
        assert record["generated_label"] == "B"
    reports_dir, cache_dir = pytester.path / "reports", pytester.path / "cache"
    assert "a secret in this answer was masked" in (reports_dir / "latest" / "report.html").read_text()

    files = files_under(reports_dir, cache_dir)
    names = {path.name for path in files}
    assert {"cases.jsonl", "summary.json", "summary.md", "report.html"} <= names
    assert any(name.endswith(".jsonl") and name != "cases.jsonl" for name in names)  # the parts
    assert any(name.startswith("results.sqlite") for name in names) == (cache == "cache")
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path
    for output in outputs:
        assert KEY not in output


def test_a_failure_or_captured_output_holding_the_key_is_masked_in_the_terminal_and_junit(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    # Any test of the session (a team's own check beside the evals) that prints or fails with the key.
    pytester.makepyfile(test_leak="""
        import os

        def test_prints_and_fails():
            print("token in use:", os.environ["OPENAI_API_KEY"])
            assert os.environ["OPENAI_API_KEY"] == "something else"
    """)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    junit = pytester.path / "junit.xml"
    result = pytester.runpytest_subprocess("test_leak.py", "-p", "no:cacheprovider", "-rA", f"--junitxml={junit}",
                                           "--pe-reports-dir", str(pytester.path / "reports"))
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    output = result.stdout.str() + result.stderr.str()
    assert KEY not in output and KEY not in junit.read_text()
    assert MASKED in output and MASKED in junit.read_text()
