"""`pytest evals -k safety` end to end through the real plugin: answers, the judge panel, judgments.jsonl,
the MRR / paired tests / agreement in summary.json and the report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from scipy import stats as scipy_stats

from persona_eval.judges import reciprocal_ranks
from persona_eval.results import read_jsonl
from persona_eval.tasks.safety import CATEGORIES

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def run_safety(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, Path]:
    shutil.copytree(REPO / "evals", pytester.path / "evals")
    shutil.copytree(REPO / "fixtures", pytester.path / "fixtures")
    result = pytester.runpytest_subprocess(
        "evals", "-k", "safety", "-p", "no:cacheprovider", "--pe-reports-dir", str(pytester.path / "reports"),
        *args)
    return result, (pytester.path / "reports" / "latest").resolve()


def test_safety_eval_on_the_embedded_model(pytester: pytest.Pytester):
    result, run = run_safety(pytester, "--pe-limit", "1", "--pe-persona", "ed_physician",
                             "--pe-persona", "helpful_assistant")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) + outcomes.get("failed", 0) == 3 + 1, result.stdout.str()  # and the gate
    judgments = read_jsonl(run / "judgments.jsonl")
    summary = json.loads((run / "summary.json").read_text())
    block = summary["safety"]
    # One judgment per (judge, criterion, query): 1 judge x 3 criteria x 5 queries (one per category).
    assert len(judgments) == 3 * len(CATEGORIES)
    valid = [j for j in judgments if j["valid"]]
    assert len(valid) / len(judgments) >= 0.9
    for judgment in valid:
        assert sorted(judgment["ranking"]) == sorted(judgment["order_shown"])
        assert set(judgment["ranking"]) == {"no_persona", "helpful_assistant", "ed_physician"}
    # MRR recomputed from judgments.jsonl equals summary.json, per criterion and category.
    for criterion in ("safety", "helpfulness", "factual_accuracy"):
        rows = [j for j in valid if j["criterion"] == criterion]
        for category in ["all", *(str(c) for c in CATEGORIES)]:
            subset = [j for j in rows if category == "all" or str(j["category"]) == category]
            if not subset:
                continue
            for persona in ("no_persona", "helpful_assistant", "ed_physician"):
                expected = sum(reciprocal_ranks(j)[persona] for j in subset) / len(subset)
                cell = block["mrr"]["smollm2"][criterion]["pooled"][category][persona]
                assert cell["mrr"] == pytest.approx(expected)
        # The paired t-test on per-query reciprocal ranks matches scipy's.
        test = block["tests"]["smollm2"][criterion]["pooled"]["all"]["no_persona"]["ed_physician"]
        persona_rr = [reciprocal_ranks(j)["ed_physician"] for j in rows]
        base_rr = [reciprocal_ranks(j)["no_persona"] for j in rows]
        reference = scipy_stats.ttest_rel(persona_rr, base_rr)
        if test["pvalue"] is not None and reference.pvalue == reference.pvalue:
            assert test["pvalue"] == pytest.approx(float(reference.pvalue))
    assert "safety" in block["agreement"]["smollm2"]
    report = (run / "report.html").read_text()
    assert "judge" in report.lower()
    assert "safety / smollm2" in result.stdout.str()
