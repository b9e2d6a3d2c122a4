"""report.html: one self-contained page (inline CSS, SVG and a little JS) that says whether to deploy.

Read top-down by a clinician-engineer in a hurry: the gate's verdict, then per model and task the
persona x metric tables with the paired comparisons against the baseline, the figures, the exact
prompts, every case, and the run's provenance. Everything shown comes from summary.json and
cases.jsonl as the run wrote them; nothing is recomputed here and no model is called.

The page is the Jinja2 template templates/report.html (autoescaped) around sections built by the
``*_section`` modules, which pass every string taken from a dataset, a model, a config file or the
summary through ``format.esc`` (``html.escape`` with quotes) and double-quote every attribute value.
The page loads nothing: no scripts, fonts, images or styles from anywhere (static/ is inlined), and its
Content-Security-Policy forbids it, allowing only its own inline script (by hash) and inline styles.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from persona_eval.errors import DataError
from persona_eval.gate import STATE_WORDS
from persona_eval.report.baseline_run_section import baseline_run_section
from persona_eval.report.cases_section import cases_section
from persona_eval.report.figures_section import figures_section
from persona_eval.report.format import esc
from persona_eval.report.metadata_section import metadata_section
from persona_eval.report.page import render_page
from persona_eval.report.prompts_section import prompts_section
from persona_eval.report.review_section import review_section
from persona_eval.report.robustness_section import robustness_section
from persona_eval.report.run import Run
from persona_eval.report.safety_data import Safety
from persona_eval.report.safety_section import safety_section
from persona_eval.report.tables_section import tables_section
from persona_eval.report.verdict_section import (
    not_checked_items,
    verdict_section,
    verdict_sentence,
    verdict_state,
)
from persona_eval.results import read_json, read_jsonl, write_text
from persona_eval.review import REVIEW_FILENAME

__all__ = ["REPORT_FILENAME", "REVIEW_FILENAME", "pytest_html_summary_lines", "render_report", "write_report"]

REPORT_FILENAME = "report.html"


def render_report(summary: Mapping[str, Any], cases: Sequence[Mapping[str, Any]],
                  review: Mapping[str, Any] | None = None) -> str:
    """The report page of a run: summary.json's document and cases.jsonl's records in, HTML out.

    ``review``: the clinician review results (RUN_DIR/review_results.json, as
    persona_eval.review.import_review writes them), or ``{"error": reason}`` when that file could not be
    read; None leaves the review section out.

    Deterministic: the same inputs give the same bytes. Tolerates summaries without ``comparisons``,
    ``baseline_comparison`` or ``safety`` (or with parts of it missing) and results without ``figures``
    (older runs); without ``safety`` and ``review`` the page is the triage report alone.
    """
    run = Run(summary, cases)
    block = summary.get("safety")
    safety = Safety(run, block) if isinstance(block, Mapping) and block else None
    # A patient-safety-only run has no triage results or cases: its page leaves the triage sections out.
    triage = safety is None or bool(run.results or run.cases)
    sections = {
        "verdict": verdict_section(run, triage=triage),
        "tables": tables_section(run) if triage else None,
        "figures": figures_section(run) if triage else None,
        "robustness": robustness_section(run) if triage else None,
        # One baseline switch per page: the triage tables have it when they show comparisons.
        "safety": safety_section(safety, with_select=not (triage and run.has_comparisons))
        if safety is not None else None,
        "review": review_section(review) if review is not None else None,
        "baseline_run": baseline_run_section(run),
        "prompts": prompts_section(run) if triage else None,
        "cases": cases_section(run) if triage else None,
        "metadata": metadata_section(run),
    }
    state = STATE_WORDS[verdict_state(summary.get("verdict") or {})]
    return render_page(state=state, run_id=summary.get("run_id") or "run",
                       judge_panel=safety is not None or review is not None, sections=sections)


def write_report(run_dir: Path, *, cases: Sequence[Mapping[str, Any]] | None = None) -> Path:
    """Write run_dir/report.html from run_dir/summary.json, its cases file and, when present,
    run_dir/review_results.json; returns the path. `cases`: the cases file's records, when the caller
    holds them already (a run finishing), so that they are not read and held a second time.

    Reads only what the run wrote; calls no model. A run without a cases file still gets a report
    (without prompts and cases); an unreadable review_results.json is reported on the page."""
    run_dir = Path(run_dir)
    summary = read_json(run_dir / "summary.json")
    if not isinstance(summary, Mapping) or not isinstance(summary.get("verdict"), Mapping):
        raise DataError("not a persona-eval summary (no verdict); give a run folder such as reports/latest",
                        path=str(run_dir / "summary.json"))
    cases_name = (summary.get("metadata") or {}).get("cases_file") or "cases.jsonl"
    cases_path = run_dir / cases_name
    if cases is None:
        cases = read_jsonl(cases_path) if cases_path.is_file() else []
    review: Mapping[str, Any] | None = None
    review_path = run_dir / REVIEW_FILENAME
    if review_path.is_file():
        try:
            review = json.loads(review_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            review = {"error": f"{REVIEW_FILENAME}: {exc}"}
    target = run_dir / REPORT_FILENAME
    write_text(target, render_report(summary, cases, review))  # atomic, secrets masked
    return target


def pytest_html_summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """HTML snippets (escaped) with the run's verdict, for pytest-html's summary section."""
    verdict = summary.get("verdict") or {}
    state = verdict_state(verdict)
    colour = "#1e7b34" if state == "passed" else "#b3261e"
    lines = [f'<p class="persona-eval-verdict"><strong style="color:{colour}">persona-eval verdict: '
             f'{STATE_WORDS[state]}</strong> \u2014 {esc(verdict_sentence(verdict))}</p>']
    blocking = list(verdict.get("blocking") or []) + not_checked_items(verdict)
    if blocking:
        lines.append("<ul>" + "".join(f"<li>{esc(message)}</li>" for message in blocking) + "</ul>")
    recorded = list(verdict.get("recorded") or [])
    if recorded:
        lines.append(f"<p>Record-only bounds crossed ({len(recorded)}):</p>"
                     + "<ul>" + "".join(f"<li>{esc(message)}</li>" for message in recorded) + "</ul>")
    baseline = summary.get("baseline_comparison")
    baseline_verdict = baseline.get("verdict") if isinstance(baseline, Mapping) else None
    if isinstance(baseline_verdict, Mapping):
        ok = bool(baseline_verdict.get("passed"))
        lines.append(f"<p>Against the approved baseline run: "
                     f"{'no significant regression' if ok else 'regressions found'}.</p>")
    run_id = summary.get("run_id")
    if run_id:
        lines.append(f"<p>Full report: <code>reports/{esc(run_id)}/{REPORT_FILENAME}</code></p>")
    return lines
