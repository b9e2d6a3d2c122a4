"""Tests of summary.md (persona_eval.report.markdown): verdict first, unchecked entries with their command,
the key table with deltas from no_persona, and escaping of names from the user's files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from persona_eval.report.markdown import append_step_summary, render_markdown


def summary(**verdict: Any) -> dict[str, Any]:
    rows = [{"task": "triage", "model": "m|x", "persona": persona, "stratum": "emergency", "n": 12,
             "metrics": {"accuracy": accuracy, "under_triage_rate": 0.1, "over_triage_rate": 0.0,
                         "parse_rate": 1.0, "expected_calibration_error": None}, "notes": {}}
            for persona, accuracy in (("no_persona", 0.5), ("<b>nurse</b>", 0.75))]
    comparisons = [{"task": "triage", "model": "m|x", "stratum": "emergency", "persona": "<b>nurse</b>",
                    "metric": "accuracy", "baseline": "no_persona", "delta": 0.25, "significant": True}]
    base = {"status": "passed", "passed": True, "checked": 3, "regressions_checked": 2, "blocking": [],
            "not_checked": [], "recorded": [], "skipped": []}
    return {"run_id": "r1", "verdict": {**base, **verdict}, "results": rows, "comparisons": comparisons,
            "metadata": {"models": {"m|x": {}}}}


def test_the_verdict_comes_first_then_the_table_with_deltas() -> None:
    text = render_markdown(summary())
    assert text.startswith("## persona-eval verdict: PASSED\n")
    assert text.index("verdict") < text.index("| persona |")
    assert "| no_persona | 0.50 | 0.10 | 0.00 | 1.00 | n/a |" in text
    assert "| &lt;b&gt;nurse&lt;/b&gt; | 0.75 (+0.25*) |" in text
    assert "### triage / m\\|x / emergency (n=12 cases per persona)" in text


def test_failed_and_not_checked_list_their_entries() -> None:
    failed = render_markdown(summary(status="failed", passed=False, blocking=["FAIL: under-triage <rose>"]))
    assert failed.startswith("## persona-eval verdict: FAILED")
    assert "- FAIL: under-triage &lt;rose&gt;" in failed
    unchecked = render_markdown(summary(status="not_checked", passed=False, not_checked=[
        {"message": "NOT CHECKED: the control no_persona did not run.", "reason": "no_control",
         "how_to_check": "pytest evals -k `triage`"}]))
    assert unchecked.startswith("## persona-eval verdict: NOT CHECKED")
    assert "could not be checked, so the gate cannot pass" in unchecked
    assert "- NOT CHECKED: the control no_persona did not run. To check it: `pytest evals -k 'triage'`" in unchecked


def test_the_step_summary_is_appended(tmp_path: Path) -> None:
    path = tmp_path / "step.md"
    path.write_text("# earlier step\n")
    append_step_summary(path, render_markdown(summary()))
    text = path.read_text()
    assert text.startswith("# earlier step\n## persona-eval verdict: PASSED")
