"""summary.md: the verdict and the key table of a run in Markdown, for CI pages ($GITHUB_STEP_SUMMARY).

Written next to summary.json from it alone (like the HTML report, it never recomputes). The verdict comes
first, then each blocking or unchecked entry, then per model and stratum a persona table of the metrics
a deployment decision reads, each with its change from no_persona (* significant after Holm adjustment;
beside a change that is not significant, the smallest the comparison could detect).
Model, persona and stratum names come from the user's files: they are escaped, so a name cannot inject
markup into a CI page.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from persona_eval.gate import STATE_WORDS
from persona_eval.personas import BASELINE
from persona_eval.redaction import mask
from persona_eval.report.power_text import mde_phrase
from persona_eval.tasks import LABEL_METRIC_TEXT, spec_of

__all__ = ["append_step_summary", "render_markdown"]

# The metrics a deployment decision reads, with their column headers: metric, header, number format.
_TRIAGE_COLUMNS: tuple[tuple[str, str, str], ...] = tuple(
    (metric, header, f"{{:.{LABEL_METRIC_TEXT[metric].decimals}f}}") for metric, header in (
        ("accuracy", "accuracy"),
        ("under_triage_rate", "under-triage"),
        ("over_triage_rate", "over-triage"),
        ("parse_rate", "parsed"),
        ("expected_calibration_error", "ECE"),
    ))
_LISTED = 20  # entries listed per kind before "and N more" (summary.json and report.html have them all)


def _escape(text: Any) -> str:
    """Text safe inside Markdown table cells and paragraphs: HTML metacharacters as entities, pipes
    escaped, no line breaks."""
    value = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return value.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _code(text: str) -> str:
    return "`" + str(text).replace("`", "'").replace("\n", " ") + "`"


def _listed(title: str, items: Sequence[str]) -> list[str]:
    if not items:
        return []
    lines = ["", f"**{title} ({len(items)})**", ""]
    lines.extend(f"- {item}" for item in items[:_LISTED])
    if len(items) > _LISTED:
        lines.append(f"- and {len(items) - _LISTED} more (summary.json, report.html)")
    return lines


def _verdict_lines(verdict: Mapping[str, Any]) -> list[str]:
    status = str(verdict.get("status") or ("passed" if verdict.get("passed") else "failed"))
    blocking = list(verdict.get("blocking") or [])
    not_checked = list(verdict.get("not_checked") or [])
    recorded = list(verdict.get("recorded") or [])
    if status == "passed":
        sentence = (f"No blocking bound or persona-safety regression was crossed ({verdict.get('checked', 0)} "
                    f"bound checks, {verdict.get('regressions_checked', 0)} regression checks).")
    elif status == "not_checked":
        allowed = " The session was allowed to pass (--pe-allow-unchecked)." if verdict.get("passed") else ""
        sentence = (f"Nothing was crossed, but {len(not_checked)} fail rule(s) or bound(s) could not be checked, "
                    f"so the gate cannot pass.{allowed}")
    else:
        sentence = (f"{len(blocking)} blocking bound(s) or persona-safety regression(s) crossed: deployment "
                    "should not go ahead until they are resolved.")
    lines = [f"## persona-eval verdict: {STATE_WORDS.get(status, status.upper())}", "", sentence]
    lines.extend(_listed("Blocking", [_escape(m) for m in blocking]))
    lines.extend(_listed("Not checked", [f"{_escape(e.get('message'))} To check it: {_code(e.get('how_to_check', ''))}"
                                         for e in not_checked]))
    lines.extend(_listed("Record-only crossed", [_escape(m) for m in recorded]))
    return lines


def _comparison_index(summary: Mapping[str, Any]) -> dict[tuple[str, str, str, str, str], Mapping[str, Any]]:
    return {(c["task"], c["model"], c["stratum"], c["persona"], c["metric"]): c
            for c in summary.get("comparisons") or [] if c.get("baseline") == BASELINE}


def _cell(value: Any, fmt: str, comparison: Mapping[str, Any] | None) -> str:
    if value is None:
        return "n/a"
    text = fmt.format(value)
    if comparison is not None and comparison.get("delta") is not None:
        delta = fmt.replace("{:", "{:+").format(comparison["delta"])
        if float(delta) == 0:
            delta = fmt.replace("{:", "{:+").format(0.0)
        power = mde_phrase(comparison, short=True)
        text += f" ({delta}{'*' if comparison.get('significant') else ''}{'; ' + power if power else ''})"
    return text


def _triage_tables(summary: Mapping[str, Any]) -> list[str]:
    comparisons = _comparison_index(summary)
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for row in summary.get("results") or []:
        spec = spec_of(str(row.get("task")))
        if spec is not None and spec.labels:
            groups.setdefault((row["task"], row["model"], row["stratum"]), []).append(row)
    lines: list[str] = []
    for (task, model, stratum), rows in groups.items():
        heading = (f"### {_escape(task)} / {_escape(model)} / {_escape(stratum)} "
                   f"(n={rows[0].get('n')} cases per persona)")
        lines += ["", heading,
                  "", "| persona | " + " | ".join(header for _, header, _ in _TRIAGE_COLUMNS) + " |",
                  "|---|" + "---:|" * len(_TRIAGE_COLUMNS)]
        for row in rows:
            cells = [_cell(row["metrics"].get(metric), fmt,
                           comparisons.get((task, model, stratum, row["persona"], metric)))
                     for metric, _, fmt in _TRIAGE_COLUMNS]
            lines.append(f"| {_escape(row['persona'])} | " + " | ".join(cells) + " |")
    if groups:
        lines += ["", f"In parentheses: the change from {BASELINE}, * significant after Holm adjustment; beside a "
                      "change that is not significant, the smallest change the comparison could detect (80% power); "
                      "n/a: not available for this model."]
    return lines


def _safety_tables(summary: Mapping[str, Any]) -> list[str]:
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    strata: list[str] = []
    for row in summary.get("results") or []:
        if row.get("task") != "safety":
            continue
        groups.setdefault(row["model"], {}).setdefault(row["persona"], {})[row["stratum"]] = (
            row["metrics"].get("safety_mrr_delta"))
        if row["stratum"] not in strata:
            strata.append(row["stratum"])
    lines: list[str] = []
    for model, personas in groups.items():
        lines += ["", f"### safety / {_escape(model)}: safety MRR minus {BASELINE}'s (+: judges prefer the persona)",
                  "", "| persona | " + " | ".join(_escape(s) for s in strata) + " |", "|---|" + "---:|" * len(strata)]
        for persona, cells in personas.items():
            shown = ["-" if cells.get(s) is None else f"{cells[s]:+.2f}" for s in strata]
            lines.append(f"| {_escape(persona)} | " + " | ".join(shown) + " |")
    return lines


def render_markdown(summary: Mapping[str, Any]) -> str:
    """summary.md of a run: the verdict, what blocks or was not checked, then the key tables."""
    lines = _verdict_lines(summary.get("verdict") or {})
    lines += _triage_tables(summary)
    lines += _safety_tables(summary)
    metadata = summary.get("metadata") or {}
    models = ", ".join(_escape(name) for name in metadata.get("models") or {})
    lines += ["", f"Run {_code(str(summary.get('run_id')))} on {models or 'no model'}: report.html, summary.json and "
                  "cases.jsonl are in the run folder."]
    return "\n".join(lines) + "\n"


def append_step_summary(path: Path, markdown: str) -> None:
    """Append `markdown` to a CI step summary file ($GITHUB_STEP_SUMMARY), after what is there, with
    secrets masked: a CI page is public to everyone who can see the build.

    Appended in place rather than through persona_eval.results.write_text: the file belongs to the CI
    runner and holds other steps' summaries."""
    text = mask(markdown)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(text if text.endswith("\n") else text + "\n")
