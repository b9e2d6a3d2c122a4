"""End to end through the real plugin, against the loopback stand-in server: the model under test is the
model that answered, and the decoding record says what was sent.

- a candidate redeployed under the same served name at the same port (blue/green) gets none of the
  previous model's cached answers, and the run says that the cache missed because the model changed;
- a server that refuses `temperature` completes the run; summary.json and the terminal say that it was
  not sent and why, and a rerun finds every answer in the cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from persona_eval.testing.standin import TEMPERATURE_REFUSAL, StandInServer

REPO = Path(__file__).resolve().parent.parent
NAME = "candidate"

pytestmark = pytest.mark.slow


@pytest.fixture
def evals(pytester: pytest.Pytester) -> pytest.Pytester:
    shutil.copytree(REPO / "evals", pytester.path / "evals")
    return pytester


def run_triage(pytester: pytest.Pytester, base_url: str, reports: str) -> tuple[pytest.RunResult, Path]:
    result = pytester.runpytest_subprocess(
        "evals", "-p", "no:cacheprovider", "-k", "triage", "--pe-limit", "2", "--pe-persona", "ed_nurse",
        "--pe-model", f"openai:{NAME}@{base_url}",
        "--pe-dataset", f"triage={REPO / 'fixtures/triage/vignettes.jsonl'}",
        "--pe-cache-dir", str(pytester.path / "cache"), "--pe-reports-dir", str(pytester.path / reports),
        timeout=300)
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), result.stdout.str()
    return result, (pytester.path / reports / "latest").resolve()


def read_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    summary = json.loads((run_dir / "summary.json").read_text())
    cases = [json.loads(line) for line in (run_dir / "cases.jsonl").read_text().splitlines()]
    return summary, cases


def test_a_model_redeployed_under_the_same_name_and_port_gets_none_of_the_old_answers(evals):
    with StandInServer(served_name=NAME, root="/models/X", started=1796119200.0,
                       answer=lambda messages: "C") as blue:
        first, first_dir = run_triage(evals, blue.base_url, "reports-1")
        port, blue_asked = blue.port, blue.chat_completions
    summary, cases = read_run(first_dir)
    assert cases and all(c["generated_label"] == "C" for c in cases) and blue_asked == len(cases)
    assert (summary["metadata"].get("identity_changes") or {}).get(NAME) is None
    assert summary["metadata"]["models"][NAME]["root"] == "/models/X"

    # Green: another process on the same port, serving other weights under the same name.
    with StandInServer(port=port, served_name=NAME, root="/models/Y", started=1796122800.0,
                       answer=lambda messages: "A") as green:
        second, second_dir = run_triage(evals, green.base_url, "reports-2")
        green_asked = green.chat_completions
    summary, cases = read_run(second_dir)
    assert len(cases) == blue_asked and green_asked == len(cases)  # every case asked of the new model
    assert all(c["generated_label"] == "A" and not c["cached"] for c in cases)
    assert summary["metadata"]["models"][NAME]["root"] == "/models/Y"
    note = (f"model '{NAME}' at {green.base_url} is not the model cached before (the server now reports root "
            "/models/Y, was /models/X; process started 2026-12-01T11:00:00.000Z, was 2026-12-01T10:00:00.000Z): "
            "its cached answers are not used")
    assert summary["metadata"]["identity_changes"][NAME] == note
    assert f"persona-eval: {note}" in second.stdout.str()
    assert "is not the model cached before" not in first.stdout.str()


def test_a_server_that_refuses_temperature_is_reported_and_the_rerun_is_cached(evals):
    with StandInServer(served_name=NAME, root="/models/reasoner", reject_temperature=True,
                       answer=lambda messages: "Answer: B") as server:
        result, run_dir = run_triage(evals, server.base_url, "reports-1")
        sent = server.requests_to("/v1/chat/completions")
        rerun, rerun_dir = run_triage(evals, server.base_url, "reports-2")
        asked_by_rerun = server.chat_completions - len(sent)
    summary, cases = read_run(run_dir)
    assert cases and all(c["generated_label"] == "B" for c in cases)
    refused = sum("temperature" in (r.body or {}) for r in sent)
    assert 1 <= refused <= 4 and len(sent) == len(cases) + refused  # each refused request sent again, once
    reason = f"HTTP 400: {TEMPERATURE_REFUSAL}"
    decoding = summary["metadata"]["decoding_sent"][NAME]["triage"]
    assert decoding["temperature"] is None and decoding["logprobs"] is True
    assert decoding["dropped"] == {"temperature": reason}
    line = f"persona-eval: model '{NAME}': the server refused temperature ({reason}); it was not sent"
    assert line in result.stdout.str()

    # The refusal is remembered with the model: the rerun computes the keys of what is sent, and hits.
    rerun_summary, rerun_cases = read_run(rerun_dir)
    assert asked_by_rerun == 0 and all(c["cached"] for c in rerun_cases)
    assert rerun_summary["metadata"]["decoding_sent"][NAME]["triage"]["dropped"] == {"temperature": reason}
    assert line in rerun.stdout.str()
