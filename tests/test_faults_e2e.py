"""Faults and hostile input through the real plugin, with and without pytest-xdist: a server that cannot be
reached, a case too long for the model, a misspelled or unknown dataset field, one model load per worker
group. Each problem is one message naming what is wrong, with the same exit status under ``-n 2``."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from persona_eval.personas import DEFAULT_PERSONAS
from persona_eval.results import read_jsonl
from persona_eval.testing.tiny_model import synthetic_triage_records, tiny_model_dir

REPO = Path(__file__).resolve().parent.parent
N_PER_STRATUM = 6
WORKERS = pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model() -> Path:
    return tiny_model_dir()


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    shutil.copytree(REPO / "evals", pytester.path / "evals")
    return pytester


def write_cases(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def cases(n: int = N_PER_STRATUM) -> list[dict]:
    return synthetic_triage_records(n, seed=2024, offset=10_000)


def run_evals(project: pytest.Pytester, model: str, dataset: Path, *args: str) -> pytest.RunResult:
    return project.runpytest_subprocess(
        "evals", "-p", "no:cacheprovider", "-k", "triage", "--pe-model", model, "--pe-dataset", f"triage={dataset}",
        "--pe-cache-dir", str(project.path / "cache"), "--pe-reports-dir", str(project.path / "reports"), *args)


def output(result: pytest.RunResult) -> str:
    return result.stdout.str() + result.stderr.str()


def summary(project: pytest.Pytester) -> dict:
    return json.loads((project.path / "reports" / "latest" / "summary.json").read_text())


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@WORKERS
def test_the_model_loads_once_per_run_with_or_without_workers(project, tiny_model, workers):
    dataset = write_cases(project.path / "cases.jsonl", cases())
    result = run_evals(project, f"hf:{tiny_model}", dataset, "--pe-allow-unchecked", *workers)
    result.assert_outcomes(passed=len(DEFAULT_PERSONAS), skipped=1)  # the gate: too few cases to check
    metadata = summary(project)["metadata"]
    # One model: one process loads it, although two workers run the cases.
    assert metadata["model_loads"] == {tiny_model.name: 1}


@WORKERS
def test_an_unreachable_server_is_one_message_and_exit_status(project, tiny_model, workers):
    dataset = write_cases(project.path / "cases.jsonl", cases(2))
    url = f"http://127.0.0.1:{closed_port()}/v1"
    result = run_evals(project, f"openai:candidate@{url}", dataset, "--pe-retries", "0", *workers)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    text = output(result)
    assert "INTERNALERROR" not in text and "Traceback" not in text
    assert f"model 'candidate': cannot ask the server which model it serves: no answer after 1 try; endpoint: " \
           f"{url}/models" in text
    assert "rerun to continue" in text


@WORKERS
def test_a_case_longer_than_the_context_stops_the_run_naming_its_line(project, tiny_model, workers):
    records = cases()
    records[3]["text"] = "The patient describes " + "pain " * 600  # > 480 tokens (context 512, 32 to answer)
    dataset = write_cases(project.path / "cases.jsonl", records)
    result = run_evals(project, f"hf:{tiny_model}", dataset, *workers)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    text = output(result)
    assert "INTERNALERROR" not in text and "Traceback" not in text
    assert f"{dataset}:4: the prompt is " in text
    assert "at most 480 prompt tokens fit (the model's context is 512 tokens, 32 of them kept for the answer)" in text
    assert "--pe-too-long record" in text


def test_a_huge_case_never_reaches_the_tokenizer_or_the_model(project, tiny_model):
    records = cases()
    records[0]["text"] = "x" * 90_000  # under the loader's field limit, far over 480 tokens x 16 characters
    dataset = write_cases(project.path / "cases.jsonl", records)
    result = run_evals(project, f"hf:{tiny_model}", dataset, "--pe-max-prompt-tokens", "400")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"{dataset}:1: the prompt is " in output(result)
    assert "at most 400 prompt tokens are allowed (--pe-max-prompt-tokens)" in output(result)


def test_too_long_cases_can_be_recorded_and_count_against_a_bound(project, tiny_model):
    records = cases()
    records[3]["text"] = "The patient describes " + "pain " * 600
    dataset = write_cases(project.path / "cases.jsonl", records)
    result = run_evals(project, f"hf:{tiny_model}", dataset, "--pe-too-long", "record")
    assert result.ret == pytest.ExitCode.TESTS_FAILED  # 1 case in 12 is over the default bound of 0.05
    run_dir = project.path / "reports" / "latest"
    rows = read_jsonl(run_dir / "cases.jsonl")
    too_long = [r for r in rows if r["finish_reason"] == "too_long"]
    assert {r["case_id"] for r in too_long} == {records[3]["id"]}
    assert len(too_long) == len(DEFAULT_PERSONAS)
    assert all(r["generated_label"] is None and r["too_long"]["fits"] is False for r in too_long)
    assert all(len(r["prompt"]) < 3_000 for r in too_long)  # the record keeps the start of the prompt
    found = summary(project)
    (row,) = [r for r in found["results"] if r["persona"] == "no_persona" and r["stratum"] == "all"]
    assert row["metrics"]["too_long_rate"] == pytest.approx(1 / (2 * N_PER_STRATUM))
    assert any(check["bound"]["metric"] == "too_long_rate" and check["blocking"] for check in found["checks"])


@WORKERS
def test_a_near_miss_field_is_an_error_with_a_suggestion(project, tiny_model, workers):
    records = [{k: v for k, v in r.items() if k != "text"} | {"presenting_symptoms": r["text"]} for r in cases()]
    records[2]["medication"] = "aspirin"
    dataset = write_cases(project.path / "cases.jsonl", records)
    result = run_evals(project, f"hf:{tiny_model}", dataset, *workers)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    text = output(result)
    assert f"{dataset}:3: field 'medication'" in text
    assert "did you mean 'medications'?" in text
    assert "INTERNALERROR" not in text and "Traceback" not in text


def test_unknown_fields_are_listed_once_in_the_terminal_and_the_summary(project, tiny_model):
    records = [r | {"annotator": "site 2"} for r in cases()]
    records[0]["source_url"] = "https://example.org/case"
    dataset = write_cases(project.path / "cases.jsonl", records)
    result = run_evals(project, f"hf:{tiny_model}", dataset)
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED)
    line = (f"persona-eval: {dataset}: fields not used by persona-eval (ignored): annotator "
            f"({2 * N_PER_STRATUM} lines), source_url (1 line)")
    assert result.stdout.str().count(line) == 1
    ignored = summary(project)["metadata"]["dataset_fields_ignored"]["triage"]
    assert ignored["unknown_fields"] == {"annotator": 2 * N_PER_STRATUM, "source_url": 1}
    assert ignored["first_lines"] == {"annotator": 1, "source_url": 1}
