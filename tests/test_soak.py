"""Soak, through the real plugin: `pytest evals -k triage` on 834 cases x 7 personas (5,838 chat
completions) against a faulty server: 5% HTTP 500, 2% requests that never get an answer (the client's
timeout fires first), and one 30 s outage midway (every request 503). Every case is answered exactly
once at the server (none lost, none answered twice), stored once in the cache, and written to
cases.jsonl with the answer to its own prompt. About 100 s on 2 cores, most of it the outage and the
backoff that rides it out."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from persona_eval.backends.openai_payload import transcript
from persona_eval.prompts import RenderedMessages
from persona_eval.results import read_jsonl
from persona_eval.testing.standin import Messages, StandInServer
from persona_eval.testing.tiny_model import synthetic_triage_records

pytestmark = pytest.mark.soak

REPO = Path(__file__).resolve().parent.parent
PER_STRATUM = 417  # 834 cases x 7 personas (the study's six and the placebo) = 5,838 chat completions
PERSONAS = 7
OUTAGE_SECONDS = 30.0


def _digest(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:12]


def _answer(messages: Messages) -> str:
    """"Answer: B" and a digest of the prompt as the backend writes it down, so that each record's
    answer can be checked to be the answer to its own prompt."""
    prompt = transcript(RenderedMessages(tuple((m["role"], m["content"]) for m in messages), None))
    return f"Answer: B ({_digest(prompt)})"


def _start_outage_at(server: StandInServer, answers: int, seconds: float) -> threading.Thread:
    def watch() -> None:
        while server.answered < answers:
            time.sleep(0.05)
        server.outage(seconds)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


def test_pytest_evals_answers_every_case_once_through_errors_timeouts_and_an_outage(tmp_path: Path) -> None:
    shutil.copytree(REPO / "evals", tmp_path / "evals")
    records = synthetic_triage_records(PER_STRATUM, seed=11)
    dataset = tmp_path / "cases.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in records))
    total = len(records) * PERSONAS
    # The server's timeouts hang 2 s, the client gives up after 1.5 s: a timed-out request is never
    # answered at the server, and a loaded machine has half a second of margin before a slow answer
    # would be taken for a timeout (and answered twice).
    with StandInServer(served_name="soak", answer=_answer, error_rate=0.05, timeout_rate=0.02,
                       hang_seconds=2.0, seed=11) as server:
        # The backend's default backoff (0.5 s doubling to 30 s, times [0.5, 1]): 12 retries wait at
        # least 105 s, which outlasts the outage.
        models = tmp_path / "models.yaml"
        models.write_text(f"models:\n  soak:\n    backend: openai\n    model: soak\n"
                          f"    base_url: {server.base_url}\n    timeout: 1.5\n    max_retries: 12\n")
        watcher = _start_outage_at(server, total // 2, OUTAGE_SECONDS)
        started = time.monotonic()
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "evals", "-p", "no:cacheprovider", "-k", "triage",
             "--pe-models-file", str(models), "--pe-model", "soak", "--pe-dataset", f"triage={dataset}",
             "--pe-cache-dir", str(tmp_path / "cache"), "--pe-reports-dir", str(tmp_path / "reports")],
            cwd=tmp_path, capture_output=True, text=True, timeout=600)
        took = time.monotonic() - started
        watcher.join(0)
        answers, faults = server.answers, server.faults
    print(f"soak through the plugin: {total} cases in {took:.1f} s; faults served {dict(faults)}")
    assert run.returncode in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), run.stdout + run.stderr
    assert faults["error"] > 0.03 * total and faults["timeout"] > 0.01 * total and faults["outage"] > 0

    # At the server: every prompt answered, once.
    assert len(answers) == total and set(answers.values()) == {1}
    # In the run: every (persona, case) once, asked of the model, holding the answer to its own prompt.
    cases = read_jsonl(tmp_path / "reports" / "latest" / "cases.jsonl")
    assert len(cases) == total and len({(c["persona"], c["case_id"]) for c in cases}) == total
    assert not any(c["cached"] for c in cases)
    assert all(c["generated_text"] == f"Answer: B ({_digest(c['prompt'])})" for c in cases)
    assert all(c["generated_label"] == "B" for c in cases)
    # In the cache: one result per prompt.
    with sqlite3.connect(tmp_path / "cache" / "results.sqlite") as connection:
        assert connection.execute("SELECT COUNT(*) FROM results").fetchone()[0] == total
