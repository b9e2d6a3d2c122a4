"""Reasoning replies end to end through the real plugin, against loopback stand-in servers: a candidate
that thinks before it answers (its trace returned apart, as vLLM's reasoning parser does, or inline under
"## Thinking" / "## Final Response" headings), two judges, triage and safety with the triage justification
judged.

- every triage answer is read in its final response (never the draft letter of the trace): parse rate 100%,
  each label the one the final response gives;
- cases.jsonl holds each reply whole, its trace (``reasoning``) and its final response apart;
- the safety judges are shown final responses only, the justification judge the trace and the final response;
- the report's drill-down shows the trace collapsed and escaped, the final response below it.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from persona_eval.testing.standin import Messages, StandInServer

REPO = Path(__file__).resolve().parent.parent
TRACE_MARK = "Private-trace"
RESPONSE = re.compile(r"Response \d+:\n<<<\n(.*?)\n>>>", re.DOTALL)

pytestmark = pytest.mark.slow


def _draw(messages: Messages) -> int:
    text = "\x1f".join(str(m.get("content", "")) for m in messages)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


def _is_triage(messages: Messages) -> bool:
    return bool(messages) and str(messages[-1].get("content", "")).startswith("Patient information:")


def final_letter(messages: Messages) -> str:
    return "ABC"[_draw(messages) % 3]


def think(messages: Messages) -> str:
    """A short trace that names another letter as a draft, and holds markup the report must escape."""
    draft = "ABC"[(_draw(messages) + 1) % 3]
    return f"{TRACE_MARK}: maybe {draft}? <b>weigh</b> the red flags first."


def answer(messages: Messages) -> str:
    if _is_triage(messages):
        return f"Answer: {final_letter(messages)} because that level of care fits."
    return f"Final advice {_draw(messages) % 89}: see your clinician before changing anything."


def judge(name: str) -> Any:
    def reply(messages: Messages) -> str:
        prompt = str(messages[-1].get("content", "")) if messages else ""
        k = len(RESPONSE.findall(prompt)) or 2
        numbers = sorted(range(1, k + 1), key=lambda n: hashlib.sha256(f"{name}{prompt}{n}".encode()).digest())
        return json.dumps({"ranking": numbers})
    return reply


def judge_prompts(server: StandInServer) -> list[str]:
    return [str(r.body["messages"][-1]["content"]) for r in server.requests_to("/v1/chat/completions", "POST")
            if r.body]


@pytest.mark.parametrize("style", ["reasoning_content", "headings"])
def test_reasoning_replies_through_the_plugin(pytester: pytest.Pytester, style: str):
    shutil.copytree(REPO / "evals", pytester.path / "evals")
    shutil.copytree(REPO / "fixtures", pytester.path / "fixtures")
    candidate = StandInServer(served_name="thinker", reasoning=style, think=think, answer=answer)
    judges = {name: StandInServer(served_name=name, answer=judge(name)) for name in ("j1", "j2")}
    servers = {"thinker": candidate, **judges}
    for server in servers.values():
        server.start()
    try:
        models = pytester.path / "models.yaml"
        models.write_text("models:\n" + "".join(
            f"  {name}:\n    backend: openai\n    model: {name}\n    base_url: {server.base_url}\n"
            for name, server in servers.items()))
        result = pytester.runpytest_subprocess(
            "evals", "-p", "no:cacheprovider", "--pe-models-file", str(models), "--pe-model", "thinker",
            "--pe-judge", "j1", "--pe-judge", "j2", "--pe-judge-triage", "--pe-limit", "2",
            "--pe-persona", "ed_nurse", "--pe-allow-unchecked", "--pe-bootstrap-resamples", "200",
            "--pe-cache-dir", str(pytester.path / "cache"), "--pe-reports-dir", str(pytester.path / "reports"),
            timeout=600)
        prompts = {name: judge_prompts(server) for name, server in judges.items()}
    finally:
        for server in servers.values():
            server.stop()
    run = (pytester.path / "reports" / "latest").resolve()
    assert (run / "summary.json").is_file(), result.stdout.str() + result.stderr.str()
    summary = json.loads((run / "summary.json").read_text())
    cases = [json.loads(line) for line in (run / "cases.jsonl").read_text().splitlines()]

    # Triage: every answer read in its final response, never the trace's draft letter.
    triage = [c for c in cases if c["task"] == "triage"]
    assert triage
    for case in triage:
        assert case["reasoning"] is not None and case["reasoning"].startswith(TRACE_MARK)
        assert case["final_response"].endswith("because that level of care fits.")
        assert case["generated_text"].index(TRACE_MARK) < case["generated_text"].index(case["final_response"])
        expected = case["final_response"][len("Answer: ")]
        assert case["generated_label"] == expected, case
        assert case["probs_source"] == "answer"
        assert max(case["label_probs"], key=case["label_probs"].get) == expected
    triage_rows = [r for r in summary["results"] if r["task"] == "triage" and r["stratum"] == "all"]
    assert triage_rows and all(r["metrics"]["parse_rate"] == 1.0 for r in triage_rows)

    # Safety: each reply whole, with its trace and its final response apart.
    safety = [c for c in cases if c["task"] == "safety"]
    assert safety
    for record in safety:
        assert record["reasoning"].startswith(TRACE_MARK) and record["final_response"].startswith("Final advice")
        assert TRACE_MARK in record["response"]

    # The safety panel never sees a trace; the justification judge sees the trace, then the final response.
    for name, asked_prompts in prompts.items():
        safety_prompts = [p for p in asked_prompts if "Patient's message:" in p]
        triage_prompts = [p for p in asked_prompts if "Patient's situation:" in p]
        assert safety_prompts and triage_prompts, name
        for prompt in safety_prompts:
            assert TRACE_MARK not in prompt and "think>" not in prompt
            assert all(text.startswith("Final advice") for text in RESPONSE.findall(prompt))
        for prompt in triage_prompts:
            for text in RESPONSE.findall(prompt):
                assert text.startswith(f"Reasoning:\n{TRACE_MARK}")
                assert re.search(r"\n\nFinal response:\nAnswer: [ABC] because that level of care fits\.\Z", text), text
    judgments = [json.loads(line) for line in (run / "judgments.jsonl").read_text().splitlines()]
    assert {j["criterion"] for j in judgments} == {"safety", "helpfulness", "factual_accuracy", "justification"}
    assert all(j["valid"] for j in judgments)

    # The report: the trace collapsed and escaped above the final response.
    report = (run / "report.html").read_text()
    drill = report[report.index('id="case-table"'):]
    trace = html.escape(triage[0]["reasoning"])
    words = len(triage[0]["reasoning"].split())
    assert (f'<details class="trace"><summary>Reasoning ({words} words)</summary><pre>{trace}</pre></details>'
            f"<pre>{html.escape(triage[0]['final_response'])}</pre>") in drill
    assert "<b>weigh</b>" not in report and "&lt;b&gt;weigh&lt;/b&gt;" in drill


def _triage_run(pytester: pytest.Pytester, server: StandInServer, options: str, label: str) -> Path:
    """A triage run of the stand-in `server` named `thinker` in a models file with `options` (YAML lines)."""
    models = pytester.path / f"models-{label}.yaml"
    models.write_text(f"models:\n  thinker:\n    backend: openai\n    model: thinker\n    base_url: {server.base_url}\n"
                      + options)
    result = pytester.runpytest_subprocess(
        "evals", "-p", "no:cacheprovider", "-k", "triage", "--pe-models-file", str(models), "--pe-model", "thinker",
        "--pe-limit", "2", "--pe-persona", "ed_nurse", "--pe-allow-unchecked", "--pe-bootstrap-resamples", "200",
        "--pe-cache-dir", str(pytester.path / "cache"), "--pe-reports-dir", str(pytester.path / f"reports-{label}"),
        timeout=300)
    run = (pytester.path / f"reports-{label}" / "latest").resolve()
    assert (run / "summary.json").is_file(), result.stdout.str() + result.stderr.str()
    return run


def test_thinking_off_and_stop_sequences_from_the_models_file(pytester: pytest.Pytester):
    """`reasoning: false` reaches the server as the chat template's switch, `stop` as stop sequences; both are
    in the summary and in the cache key (the same cases with thinking on are asked anew)."""
    shutil.copytree(REPO / "evals", pytester.path / "evals")
    shutil.copytree(REPO / "fixtures", pytester.path / "fixtures")
    with StandInServer(served_name="thinker", reasoning="reasoning_content", think=think, answer=answer) as server:
        off = _triage_run(pytester, server, "    reasoning: false\n    stop: {triage: [' because']}\n", "off")
        sent_off = [r.body for r in server.requests_to("/v1/chat/completions", "POST") if r.body]
        on = _triage_run(pytester, server, "    reasoning: true\n", "on")
        sent_on = [r.body for r in server.requests_to("/v1/chat/completions", "POST") if r.body][len(sent_off):]
    assert sent_off and all(body["chat_template_kwargs"] == {"enable_thinking": False}
                            and body["stop"] == [" because"] for body in sent_off)
    cases = [json.loads(line) for line in (off / "cases.jsonl").read_text().splitlines()]
    assert cases
    for case in cases:
        assert case["reasoning"] is None and TRACE_MARK not in case["generated_text"]
        assert re.fullmatch(r"Answer: [ABC]", case["generated_text"]) and case["finish_reason"] == "stop"
        assert case["generated_label"] == case["generated_text"][-1]
    summary = json.loads((off / "summary.json").read_text())
    requested = summary["metadata"]["decoding"]["requested"]
    assert requested["stop"] == {"thinker": {"triage": [" because"]}} and requested["reasoning"] == {"thinker": False}
    assert all(r["metrics"]["truncated_rate"] == 0.0 for r in summary["results"] if r["task"] == "triage")
    # Thinking on: not served from the first run's cache; every case thinks, nothing is cut.
    assert len(sent_on) == len(sent_off)
    assert all(body["chat_template_kwargs"] == {"enable_thinking": True} and "stop" not in body for body in sent_on)
    cases_on = [json.loads(line) for line in (on / "cases.jsonl").read_text().splitlines()]
    assert all(case["reasoning"].startswith(TRACE_MARK) for case in cases_on)
    requested_on = json.loads((on / "summary.json").read_text())["metadata"]["decoding"]["requested"]
    assert "stop" not in requested_on and requested_on["reasoning"] == {"thinker": True}
