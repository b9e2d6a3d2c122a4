"""End to end through the real plugin: `pytest evals -k triage --pe-wordings --pe-letter-bias` on the tiny
model with planted effects (persona_eval.testing.tiny_model, ``effects=True``): the persona that changes a
third of the answers is separated from the placebo, the wording-dependent effect is flagged, the planted
letter preference is recovered over the letter orders and removed by the null-prompt calibration, and each
finding is in summary.json, the report and the terminal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from persona_eval.personas import BASELINE, PLACEBO
from persona_eval.results import read_jsonl
from persona_eval.testing.tiny_model import (
    FLIP_PERSONA,
    LETTER_PERSONA,
    PREFERRED_LETTER,
    WORDING_PERSONA,
    effects_flips,
    synthetic_triage_records,
    tiny_model_dir,
)

REPO = Path(__file__).resolve().parent.parent
N_PER_STRATUM = 15

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def effects_model() -> Path:
    return tiny_model_dir(effects=True)


@pytest.fixture(scope="module")
def records() -> list[dict[str, str]]:
    return synthetic_triage_records(N_PER_STRATUM, seed=4242, offset=20_000)


@pytest.fixture(scope="module")
def run(effects_model: Path, records: list[dict[str, str]], tmp_path_factory: pytest.TempPathFactory
        ) -> dict[str, Any]:
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("robustness")
    shutil.copytree(REPO / "evals", root / "evals")
    dataset = root / "cases.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in records))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "evals", "-p", "no:cacheprovider", "-k", "triage", "--pe-model",
         f"hf:{effects_model}", "--pe-dataset", f"triage={dataset}", "--pe-cache-dir", str(root / "cache"),
         "--pe-reports-dir", str(root / "reports"), "--pe-quiet", "--pe-wordings", "--pe-letter-bias",
         "--pe-allow-unchecked"],
        cwd=root, capture_output=True, text=True, timeout=900, check=False)
    run_dir = (root / "reports" / "latest").resolve()
    assert (run_dir / "summary.json").is_file(), done.stdout + done.stderr
    return {"summary": json.loads((run_dir / "summary.json").read_text()), "dir": run_dir,
            "out": done.stdout, "ret": done.returncode}


def _flip(block: dict[str, Any], persona: str, stratum: str = "all") -> dict[str, Any]:
    return next(r for r in block["flips"] if r["persona"] == persona and r["stratum"] == stratum)


def test_a_persona_planted_to_flip_a_third_is_separated_from_the_placebo(run, records):
    block = run["summary"]["robustness"]
    planted = sum(effects_flips(r) for r in records) / len(records)
    assert 0.2 <= planted <= 0.45  # about a third of the cases carry the planted flip
    nurse = _flip(block, FLIP_PERSONA)
    assert nurse["flip_rate"] == pytest.approx(planted, abs=0.1)
    assert nurse["more_than_placebo"] is True and nurse["pvalue_adjusted"] < 0.01
    placebo = _flip(block, PLACEBO)
    assert placebo["flip_rate"] <= 0.1
    # The personas planted with no effect on the level are not separated from the placebo.
    for persona in ("ed_physician", "helpful_assistant"):
        assert _flip(block, persona)["more_than_placebo"] is False
    # The changed cases are listed for the report's drill-down, by direction.
    listed = {entry[0] for kind in ("more_urgent", "less_urgent", "other") for entry in nurse["cases"][kind]}
    assert len(listed) == nurse["changed"]
    assert listed <= {r["id"] for r in records if effects_flips(r)} | {r["id"] for r in records}


def test_a_wording_dependent_effect_is_flagged(run):
    rows = {(r["persona"], r["stratum"], r["metric"]): r for r in run["summary"]["robustness"]["wordings"]}
    bold = rows[(WORDING_PERSONA, "all", "risk_propensity")]
    deltas = [w["delta"] for w in bold["wordings"]]
    assert [w["wording"] for w in bold["wordings"]] == [1, 2, 3]
    assert deltas[0] > 0.2 and deltas[1] < -0.1 and abs(deltas[2]) < 0.15
    assert bold["sign_differs"] is True
    assert not rows[(FLIP_PERSONA, "all", "risk_propensity")]["sign_differs"]
    assert bold["wordings"][1]["declaration"] != bold["wordings"][0]["declaration"]


def test_a_planted_letter_preference_is_recovered_by_the_permutation_and_removed_by_calibration(run):
    block = run["summary"]["robustness"]
    letters = {r["persona"]: r for r in block["letters"]}
    cautious = letters[LETTER_PERSONA]
    assert cautious["orders"] == ["ABC", "BCA", "CAB"]
    assert cautious["letter_shares"][PREFERRED_LETTER] > 0.85 and cautious["flagged"] is True
    assert letters[BASELINE]["flagged"] is False
    assert abs(letters[BASELINE]["letter_shares"][PREFERRED_LETTER] - 1 / 3) < 0.1
    # The calibrated answers write each letter about a third of the time again.
    assert abs(cautious["calibrated_letter_shares"][PREFERRED_LETTER] - 1 / 3) < 0.12
    calibration = {r["persona"]: r for r in block["calibration"]}
    cautious_all = calibration[LETTER_PERSONA]["strata"]["all"]
    assert cautious_all["accuracy"] < 0.5 and cautious_all["calibrated_accuracy"] > 0.85
    prior = calibration[LETTER_PERSONA]["prior"]
    assert prior[PREFERRED_LETTER] > 0.6  # in the usual order letter A stands for level A
    assert max(calibration[BASELINE]["prior"].values()) < 0.5


def test_the_findings_are_in_the_report_the_terminal_and_the_variants_file(run):
    out = run["out"]
    (flips_line,) = [line for line in out.splitlines() if line.startswith("Flips against no_persona")]
    # The wording and letter personas change answers too (their planted effects): each is named, not the placebo.
    assert flips_line.endswith("change(s) more answers than the placebo sentence") and FLIP_PERSONA in flips_line
    assert "placebo changed" in out and f"{FLIP_PERSONA} changed" in out
    assert "effect(s) change sign between a persona's wordings" in out
    assert f"{WORDING_PERSONA}: risk propensity (all cases) changes sign between wordings" in out
    assert f"{LETTER_PERSONA} prefer(s) a letter whatever it stands for" in out
    assert out.index("persona-eval verdict:") < out.index("Flips against no_persona")
    page = (run["dir"] / "report.html").read_text()
    assert 'id="robustness"' in page and "Changed cases of" in page and "null-prompt prior" in page
    variants = read_jsonl(run["dir"] / "variants.jsonl")
    kinds = {r["variant"]["kind"] for r in variants}
    assert kinds == {"wording", "letters", "null_prompt"}
    cases = read_jsonl(run["dir"] / "cases.jsonl")
    assert all("variant" not in c for c in cases)  # the main comparisons see the main condition only
    assert all(c.get("calibrated_probs") is not None for c in cases if c["label_probs"] is not None)
