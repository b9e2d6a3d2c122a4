"""The end-of-session terminal summary: the verdict first, then persona x metric tables per stratum."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["render_terminal_summary"]

_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # metric, header, format
    ("accuracy", "acc", "{:.2f}"),
    ("parse_rate", "parsed", "{:.2f}"),
    ("risk_propensity", "risk", "{:.2f}"),
    ("over_triage_rate", "over", "{:.2f}"),
    ("under_triage_rate", "under", "{:.2f}"),
    ("risk_sensitivity", "r.sens", "{:.2f}"),
    ("consistency_rate", "consist", "{:.0f}"),
    ("expected_calibration_error", "ECE", "{:.3f}"),
    ("brier_score", "Brier", "{:.3f}"),
)
_STRATUM_TITLE = {"all": "all cases", "emergency": "emergency stratum", "primary_care": "primary-care stratum"}


def _cell(value: Any, fmt: str, note: str | None) -> str:
    if value is None:
        return "n/a" if note and "not available" in note else "-"
    return fmt.format(value)


def render_terminal_summary(summary: Mapping[str, Any]) -> list[str]:
    """Lines for the terminal: verdict, blocking failures, then one table per model, task and stratum."""
    lines: list[str] = []
    verdict = summary["verdict"]
    blocking: Sequence[str] = verdict["blocking"]
    if verdict["passed"]:
        lines.append(f"persona-eval verdict: PASSED ({verdict['checked']} bounds checked, none crossed "
                     f"that blocks; {len(verdict['recorded'])} record-only bounds crossed)")
    else:
        lines.append(f"persona-eval verdict: FAILED: {len(blocking)} blocking bound(s) crossed")
        lines.extend(f"  - {message}" for message in blocking)
    if verdict["recorded"]:
        lines.append(f"Record-only bounds crossed ({len(verdict['recorded'])}); see the report.")
    results = summary["results"]
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in results:
        groups.setdefault((row["model"], row["task"]), []).append(row)
    for (model, task), rows in groups.items():
        if task != "triage":
            continue
        for stratum in ("all", "emergency", "primary_care"):
            stratum_rows = [r for r in rows if r["stratum"] == stratum]
            if not stratum_rows:
                continue
            n = stratum_rows[0]["n"]
            lines.append("")
            lines.append(f"{task} / {model} / {_STRATUM_TITLE[stratum]} (n={n} cases per persona)")
            width = max(len(r["persona"]) for r in stratum_rows)
            header = f"  {'persona':<{width}} " + " ".join(f"{h:>7}" for _, h, _ in _COLUMNS)
            lines.append(header)
            for row in stratum_rows:
                cells = [_cell(row["metrics"].get(m), fmt, row["notes"].get(m)) for m, _, fmt in _COLUMNS]
                lines.append(f"  {row['persona']:<{width}} " + " ".join(f"{c:>7}" for c in cells))
    notes = sorted({note for row in results for note in row["notes"].values() if "not available" in note})
    if notes:
        lines.append("")
        lines.extend(f"n/a: {note}" for note in notes)
    lines.append("")
    lines.append("acc accuracy, parsed parse rate, risk share of C answers, over/under over-/under-triage rate, "
                 "r.sens over/(over+under) errors, consist % generated = most likely label, "
                 "- not defined on these cases")
    return lines
