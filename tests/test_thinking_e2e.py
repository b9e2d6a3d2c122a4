"""End to end through the real plugin: `pytest evals -k triage` on the tiny model that thinks before it
answers, with a planted divergence between its first-token preference and its written answer on the cases
whose signal phrase is one of the divergent ones (persona_eval.testing.tiny_model.diverges).

With the default settings of a local spec (``hf:PATH``) every reply is parsed and none is cut (the default
budget is fitted to the model's 512 positions); the label probabilities of calibration are read at the
letter after "## Final Response"; the consistency rate is clearly below 100 and its complement recovers
the planted share.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from persona_eval.backends import REASONING_MAX_NEW_TOKENS
from persona_eval.personas import DEFAULT_PERSONAS
from persona_eval.results import read_jsonl
from persona_eval.testing.tiny_model import (
    DEFAULT_PLANTED_PERSONA,
    diverges,
    expected_answer,
    gut_answer,
    synthetic_triage_records,
    tiny_model_dir,
)

REPO = Path(__file__).resolve().parent.parent
N_PER_STRATUM = 20
CONTEXT = 512  # the tiny model's positions
SHARE_TOLERANCE = 0.05

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def thinking_model() -> Path:
    return tiny_model_dir(thinking=True)


@pytest.fixture(scope="module")
def records() -> list[dict[str, str]]:
    # Held-out cases: a seed the model was not trained on.
    return synthetic_triage_records(N_PER_STRATUM, seed=2024, offset=10_000)


@pytest.fixture(scope="module")
def dataset(records: list[dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "cases.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def local_run(thinking_model: Path, dataset: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], list[dict[str, Any]]]:
    """One run with the default settings of a local spec, shared by the tests of this module."""
    folder = tmp_path_factory.mktemp("project")
    shutil.copytree(REPO / "evals", folder / "evals")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "evals", "-p", "no:cacheprovider", "-k", "triage",
         "--pe-model", f"hf:{thinking_model}", "--pe-dataset", f"triage={dataset}",
         "--pe-cache-dir", str(folder / "cache"), "--pe-reports-dir", str(folder / "reports"),
         # The default regression rules cannot be shown to hold on this many cases; this module is of parsing.
         "--pe-allow-unchecked"],
        cwd=folder, capture_output=True, text=True, timeout=1800, check=False)
    run_dir = folder / "reports" / "latest"
    assert (run_dir / "summary.json").exists(), result.stdout + result.stderr
    return result, json.loads((run_dir / "summary.json").read_text()), read_jsonl(run_dir / "cases.jsonl")


def rows_of(summary: dict[str, Any], stratum: str = "all") -> dict[str, dict[str, Any]]:
    return {r["persona"]: r for r in summary["results"] if r["stratum"] == stratum}


def test_every_reply_is_parsed_and_none_is_cut_with_a_local_spec_s_defaults(local_run, records):
    result, summary, cases = local_run
    assert result.returncode == 0, result.stdout
    assert len(cases) == len(DEFAULT_PERSONAS) * len(records)
    for persona, row in rows_of(summary).items():
        assert row["metrics"]["parse_rate"] == 1.0, persona
        assert row["metrics"]["truncated_rate"] == 0.0, persona
    by_id = {r["id"]: r for r in records}
    for case in cases:
        assert case["generated_text"].startswith("## Thinking\n"), case["generated_text"]
        assert "\n## Final Response\n" in case["generated_text"]
        assert case["finish_reason"] == "stop"
    # The written answer is the one the model was trained to reason to (the planted persona included).
    as_trained = sum(case["generated_label"] == expected_answer(by_id[case["case_id"]]["reference"], case["persona"],
                                                                DEFAULT_PLANTED_PERSONA) for case in cases)
    assert as_trained >= 0.95 * len(cases)
    # The default budget: the reasoning one, asked for; each case got what the context left after its prompt.
    assert summary["metadata"]["decoding"]["requested"]["max_new_tokens"] == {
        summary["results"][0]["model"]: {"triage": REASONING_MAX_NEW_TOKENS}}
    budgets = [case["max_new_tokens"] for case in cases]
    assert all(100 < budget < CONTEXT for budget in budgets), sorted(set(budgets))
    assert len(set(budgets)) > 1  # fitted per case, not one number


def test_label_probabilities_are_read_at_the_letter_after_the_heading(local_run):
    _, _, cases = local_run
    confident = 0
    for case in cases:
        assert case["probs_source"] == "answer"
        assert sum(case["label_probs"].values()) == pytest.approx(1.0)
        confident += case["label_probs"][case["generated_label"]] >= 0.9
    assert confident >= 0.95 * len(cases)


def test_the_consistency_rate_recovers_the_planted_divergence(local_run, records, record_property):
    _, summary, cases = local_run
    planted_share = sum(diverges(r) for r in records) / len(records)
    assert 0.2 <= planted_share <= 0.4
    rows = rows_of(summary)
    rates = {persona: row["metrics"]["consistency_rate"] for persona, row in rows.items()}
    for persona, rate in rates.items():
        assert rate is not None and rate < 90.0, (persona, rate)
    measured = sum((100.0 - rate) / 100.0 for rate in rates.values()) / len(rates)
    record_property("planted_share", planted_share)
    record_property("measured_divergence", measured)
    print(f"\nplanted share {planted_share:.3f}, measured {measured:.3f}; consistency by persona {rates}")
    assert abs(measured - planted_share) <= SHARE_TOLERANCE
    # Case by case: the latent label is the gut answer the model was trained to give without thinking.
    by_id = {r["id"]: r for r in records}
    as_trained = sum(case["latent_label"] == gut_answer(by_id[case["case_id"]], case["persona"])
                     for case in cases)
    assert as_trained >= 0.95 * len(cases)
