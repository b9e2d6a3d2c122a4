"""The terminal's short form of summary.json's ``robustness`` block (persona_eval.robustness): flips against
the placebo, effects across wordings, letter preference and the null-prompt calibration, verdict first."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from persona_eval.personas import BASELINE, PLACEBO
from persona_eval.report.titles import metric_phrase, stratum_title

__all__ = ["flip_sentence", "robustness_lines", "wording_sentence"]


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.0f}%"


def _p(value: Any) -> str:
    if value is None:
        return "p n/a"
    return "p<0.001" if float(value) < 0.001 else f"p={float(value):.3f}"


def flip_sentence(row: Mapping[str, Any]) -> str:
    """One persona's flips against no_persona and the placebo, e.g. "ed_nurse changed 8 of 24 answers (33%; 5
    more urgent, 3 less urgent): more than the placebo's 1 (Holm-adjusted p=0.004)"."""
    text = (f"{row['persona']} changed {row['changed']} of {row['n']} answers ({_pct(row.get('flip_rate'))}; "
            f"{row['more_urgent']} more urgent, {row['less_urgent']} less urgent"
            + (f", {row['other']} to or from no answer" if row.get("other") else "") + ")")
    if row["persona"] == PLACEBO:
        return text + ": the noise floor"
    if row.get("placebo_changed") is None:
        return text + ": no placebo to compare with"
    verdict = "more than" if row.get("more_than_placebo") else "not more than"
    return f"{text}: {verdict} the placebo's {row['placebo_changed']} (Holm-adjusted {_p(row.get('pvalue_adjusted'))})"


def wording_sentence(row: Mapping[str, Any]) -> str:
    """A persona's effect under each wording, e.g. "ed_physician_bold: risk propensity (all cases) changes sign
    between wordings: +0.58 (1), -0.33 (2), +0.00 (3)"."""
    effects = ", ".join(f"{w['delta']:+.2f} ({w['wording']})" for w in row["wordings"] if w.get("delta") is not None)
    state = ("changes sign between wordings" if row.get("sign_differs")
             else f"spread {row['spread']:.2f} across wordings")
    return (f"{row['persona']}: {metric_phrase(str(row['metric']))} ({stratum_title(str(row['stratum'])).lower()}) "
            f"{state}: {effects}")


def _letter_sentence(row: Mapping[str, Any]) -> str:
    shares = row.get("letter_shares") or {}
    letter, share = max(((k, v) for k, v in shares.items() if v is not None), key=lambda kv: kv[1],
                        default=(None, None))
    orders = len(row.get("orders") or [])
    text = (f"{row['persona']} writes {letter} for {_pct(share)} of its answers over {orders} letter orders "
            f"(expected {_pct(row.get('expected_share'))}; Holm-adjusted {_p(row.get('pvalue_adjusted'))})")
    calibrated = row.get("calibrated_letter_shares")
    if calibrated and letter is not None and calibrated.get(letter) is not None:
        text += f"; {_pct(calibrated[letter])} after the null-prompt calibration"
    balanced = ((row.get("balanced") or {}).get("all") or {}).get("under_triage_rate") or {}
    if balanced.get("delta") is not None and balanced.get("identity_delta") is not None:
        text += (f"; its under-triage effect is {balanced['delta']:+.2f} balanced over the orders "
                 f"({balanced['identity_delta']:+.2f} in the usual order)")
    return text


def _calibration_sentence(row: Mapping[str, Any]) -> str | None:
    block = (row.get("strata") or {}).get("all") or {}
    if block.get("accuracy") is None or block.get("calibrated_accuracy") is None:
        return None
    text = f"{row['persona']}: accuracy {_pct(block['accuracy'])} -> {_pct(block['calibrated_accuracy'])} calibrated"
    raw, calibrated = block.get("expected_calibration_error"), block.get("calibrated_expected_calibration_error")
    if raw is not None and calibrated is not None:
        text += f", ECE {raw:.2f} -> {calibrated:.2f}"
    return text


def robustness_lines(summary: Mapping[str, Any]) -> list[str]:
    """Lines for the terminal, per model and task: the flips of stratum "all" (the placebo's first), the
    wordings whose effect changes sign (or the largest spread), the personas with a letter preference,
    and the calibration of those and of the baseline. Empty without a ``robustness`` block."""
    block = summary.get("robustness")
    if not isinstance(block, Mapping):
        return []
    if block.get("error"):
        return ["", f"Robustness analyses could not be computed: {block['error']}"]
    lines: list[str] = []
    for (model, task), rows in _grouped(block.get("flips") or []).items():
        shown = [r for r in rows if r.get("stratum") == "all"]
        shown.sort(key=lambda r: r["persona"] != PLACEBO)
        if not shown:
            continue
        more = [r["persona"] for r in shown if r.get("more_than_placebo")]
        lines += ["", f"Flips against {BASELINE} / {task} / {model} (all cases): "
                      + (f"{', '.join(more)} change(s) more answers than the placebo sentence" if more
                         else "no persona changes more answers than the placebo sentence")]
        lines += [f"  {flip_sentence(r)}" for r in shown]
    for (model, task), rows in _grouped(block.get("wordings") or []).items():
        flagged = [r for r in rows if r.get("sign_differs")]
        lines += ["", f"Wordings / {task} / {model}: " + (
            f"{len(flagged)} effect(s) change sign between a persona's wordings" if flagged
            else "no persona's effect changes sign between its wordings")]
        if flagged:
            lines += [f"  {wording_sentence(r)}" for r in flagged if r.get("stratum") == "all"] or [
                f"  {wording_sentence(r)}" for r in flagged[:3]]
        else:
            widest = max((r for r in rows if r.get("spread") is not None), key=lambda r: r["spread"], default=None)
            if widest is not None:
                lines.append(f"  largest spread: {wording_sentence(widest)}")
    calibration = _grouped(block.get("calibration") or [])
    for (model, task), rows in _grouped(block.get("letters") or []).items():
        flagged = [r for r in rows if r.get("flagged")]
        lines += ["", f"Answer letters / {task} / {model}: " + (
            f"{', '.join(r['persona'] for r in flagged)} prefer(s) a letter whatever it stands for" if flagged
            else "no persona prefers a letter beyond chance")]
        lines += [f"  {_letter_sentence(r)}" for r in flagged]
        named = {r["persona"] for r in flagged} | {BASELINE}
        sentences = [_calibration_sentence(r) for r in calibration.get((model, task), []) if r["persona"] in named]
        said = [s for s in sentences if s]
        if said:
            lines.append("  null-prompt calibration: " + "; ".join(said))
    return lines


def _grouped(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    out: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        out.setdefault((str(row["model"]), str(row["task"])), []).append(row)
    return out
