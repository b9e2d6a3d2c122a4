"""End to end through the real plugin, against the loopback stand-in server playing a model that thinks
before it answers: the answer budget is per model and task, a served model's default leaves room for the
thinking, and a run whose answers the budget cut fails on the truncation bound with a message naming it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from persona_eval.testing.standin import StandInServer

REPO = Path(__file__).resolve().parent.parent
NAME = "reasoner"
# About 60 whitespace tokens of thinking, then the answer: the stand-in counts whitespace tokens.
THINKING = "## Thinking\n" + " ".join(["The patient needs weighing carefully before I decide."] * 8)
ANSWER = f"{THINKING}\n## Final Response\nAnswer: C"

pytestmark = pytest.mark.slow


@pytest.fixture
def evals(pytester: pytest.Pytester) -> pytest.Pytester:
    shutil.copytree(REPO / "evals", pytester.path / "evals")
    return pytester


def run_triage(pytester: pytest.Pytester, server: StandInServer, budget: str | None) -> tuple[pytest.RunResult, Path]:
    models = pytester.path / "models.yaml"
    models.write_text(f"models:\n  {NAME}:\n    backend: openai\n    model: {NAME}\n"
                      f"    base_url: {server.base_url}\n" + (f"    max_new_tokens: {budget}\n" if budget else ""))
    result = pytester.runpytest_subprocess(
        "evals", "-p", "no:cacheprovider", "-k", "triage", "--pe-limit", "5", "--pe-persona", "ed_nurse",
        "--pe-models-file", str(models), "--pe-model", NAME,
        "--pe-dataset", f"triage={REPO / 'fixtures/triage/vignettes.jsonl'}",
        "--pe-cache-dir", str(pytester.path / "cache"), "--pe-reports-dir", str(pytester.path / "reports"),
        timeout=300)
    return result, (pytester.path / "reports" / "latest").resolve()


def read_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    summary = json.loads((run_dir / "summary.json").read_text())
    cases = [json.loads(line) for line in (run_dir / "cases.jsonl").read_text().splitlines()]
    return summary, cases


def sent_budgets(server: StandInServer) -> set[Any]:
    return {r.body.get("max_completion_tokens", r.body.get("max_tokens"))
            for r in server.requests_to("/v1/chat/completions", "POST") if r.body}


def test_a_served_thinking_model_gets_room_to_answer_by_default(evals):
    with StandInServer(served_name=NAME, answer=lambda messages: ANSWER) as server:
        result, run_dir = run_triage(evals, server, None)
        budgets = sent_budgets(server)
    summary, cases = read_run(run_dir)
    assert budgets == {1024}
    assert cases and all(c["finish_reason"] == "stop" and c["generated_label"] == "C" for c in cases)
    assert summary["metadata"]["decoding"]["requested"]["max_new_tokens"] == {NAME: {"triage": 1024}}
    rows = [r for r in summary["results"] if r["stratum"] == "all"]
    assert rows and all(r["metrics"]["truncated_rate"] == 0.0 for r in rows)
    assert not any(c["bound"]["metric"] == "truncated_rate" and c["status"] == "fail" for c in summary["checks"])
    assert "truncated-answer rate" not in result.stdout.str()


def test_answers_cut_at_the_model_s_budget_fail_the_run_on_the_truncation_bound(evals):
    with StandInServer(served_name=NAME, answer=lambda messages: ANSWER) as server:
        result, run_dir = run_triage(evals, server, "{triage: 32}")
        budgets = sent_budgets(server)
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    summary, cases = read_run(run_dir)
    assert budgets == {32}
    assert cases and all(c["finish_reason"] == "length" and c["generated_label"] is None for c in cases)
    assert summary["metadata"]["decoding"]["requested"]["max_new_tokens"] == {NAME: {"triage": 32}}
    failed = [c for c in summary["checks"] if c["bound"]["metric"] == "truncated_rate" and c["status"] == "fail"]
    assert len(failed) == 3 and all(c["blocking"] for c in failed)  # no_persona, placebo and ed_nurse
    out = result.stdout.str()
    assert (f"FAIL: truncated-answer rate (all) for ed_nurse on {NAME} is 1.000, above the maximum 0.050. "
            "Too many answers were cut at the token budget: raise max_new_tokens for this model.") in out
    assert "cut" in out.split("triage / reasoner / all cases")[1].splitlines()[1]  # the terminal's column
