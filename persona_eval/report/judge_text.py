"""The judge panel's diagnostics in words (position preference, order agreement, effective number of
judges): short plain-text sentences for the HTML report and the terminal, from a panel summary block.

Pure functions of ``summary["safety"]`` or ``summary["triage_judging"]`` (what
persona_eval.judges.panel_summary wrote, its ``diagnostics`` above all), read defensively: a missing
or malformed part gives no sentence, never an error. The text is plain; the HTML report escapes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from persona_eval.judges import POOLED
from persona_eval.report.format import DASH, fmt_p, number, share
from persona_eval.report.run import at, mapping

__all__ = ["effective_judges_sentence", "judge_diagnostic_lines", "order_sentences", "position_sentence",
           "position_verdicts"]


def _favoured(cell: Mapping[str, Any]) -> tuple[int, float] | None:
    """(position 1..k, share) of the position whose share of top picks exceeds its expected share most."""
    shares = cell.get("position_shares")
    expected = cell.get("expected_position_shares")
    if not isinstance(shares, list) or not shares:
        return None
    wanted = expected if isinstance(expected, list) and len(expected) == len(shares) else [None] * len(shares)
    best: tuple[int, float] | None = None
    best_excess = -float("inf")
    for index, (observed, baseline) in enumerate(zip(shares, wanted, strict=True)):
        value = number(observed)
        if value is None:
            continue
        excess = value - (number(baseline) or 0.0)
        if excess > best_excess:
            best, best_excess = (index + 1, value), excess
    return best


def position_sentence(judge: str, cell: Mapping[str, Any]) -> str | None:
    """One judge's position preference in words, from its ``position_bias`` cell (None without data).

    >>> print(position_sentence("smollm2-judge", {"n": 60, "first_position_share": 0.92,
    ...       "expected_share": 1 / 6, "pvalue_holm": 1e-9, "flagged": True}))
    Judge smollm2-judge favours position 1: 92% of its top picks (expected 17%), flagged (Holm-adjusted p <0.001, n 60).
    >>> print(position_sentence("j", {"n": 60, "first_position_share": 0.15, "expected_share": 1 / 6,
    ...                               "pvalue_holm": 0.8, "flagged": False}))
    Judge j shows no preference for position 1: 15% of its top picks (expected 17%), Holm-adjusted p 0.800, n 60.
    """
    observed, expected = number(cell.get("first_position_share")), number(cell.get("expected_share"))
    if observed is None or expected is None:
        return None
    counts = f"{share(observed)} of its top picks (expected {share(expected)})"
    tail = f"Holm-adjusted p {fmt_p(cell.get('pvalue_holm'))}, n {cell.get('n', DASH)}"
    if cell.get("flagged") is not True:
        return f"Judge {judge} shows no preference for position 1: {counts}, {tail}."
    if observed >= expected:
        return f"Judge {judge} favours position 1: {counts}, flagged ({tail})."
    favoured = _favoured(cell)
    elsewhere = (f"; it favours position {favoured[0]} ({share(favoured[1])} of its top picks)"
                 if favoured is not None and favoured[0] != 1 else "")
    return f"Judge {judge} avoids position 1: {counts}{elsewhere}, flagged ({tail})."


def position_verdicts(diagnostics: Any, *, flagged_only: bool = True) -> list[str]:
    """The sentences of the judges' position preference, pooled over criteria: the flagged judges only,
    or (``flagged_only=False``) every judge with valid rankings, flagged ones first."""
    table = mapping(at(diagnostics, "position_bias"))
    flagged: list[str] = []
    others: list[str] = []
    for judge, cells in table.items():
        cell = mapping(at(cells, POOLED))
        sentence = position_sentence(str(judge), cell)
        if sentence is None:
            continue
        (flagged if cell.get("flagged") is True else others).append(sentence)
    return flagged if flagged_only else flagged + others


def order_sentences(diagnostics: Any) -> list[str]:
    """One sentence per judge measured by the order check (none without it), pooled over criteria."""
    out = []
    for judge, cells in mapping(at(diagnostics, "order_agreement")).items():
        cell = mapping(at(cells, POOLED))
        tau = number(cell.get("mean_tau"))
        if tau is None:
            if cell.get("n_repeats"):
                reason = cell.get("note") or "no reason recorded"
                out.append(f"Judge {judge}: order agreement not computable: {reason}.")
            continue
        out.append(f"Judge {judge}, shown the same answers in the reversed order: mean Kendall's tau {tau:.2f} "
                   f"between its two rankings ({cell.get('n_pairs', DASH)} pairs, same top pick in "
                   f"{share(cell.get('same_top_share'))}; 1: the order does not matter, -1: the ranking follows "
                   "the order).")
    return out


def effective_judges_sentence(diagnostics: Any) -> str | None:
    """The panel's effective number of independent judges in words (None when not recorded).

    >>> effective_judges_sentence({"effective_judges": {"n_judges": 3, "mean_correlation": 0.5,
    ...                                                 "effective_judges": 1.5, "note": None}})
    "The panel's 3 judges are worth 1.5 independent judges (mean Spearman correlation of their rankings 0.50)."
    """
    block = at(diagnostics, "effective_judges")
    if not isinstance(block, Mapping):
        return None
    value, correlation = number(block.get("effective_judges")), number(block.get("mean_correlation"))
    if value is None or correlation is None:
        return f"Effective number of judges: not computable: {block.get('note') or 'no reason recorded'}."
    return (f"The panel's {block.get('n_judges', DASH)} judges are worth {value:.1f} independent judges "
            f"(mean Spearman correlation of their rankings {correlation:.2f}).")


def judge_diagnostic_lines(summary_section: Any) -> list[str]:
    """The terminal's lines about a panel's judges, verdict first: one per judge flagged for a position
    preference, one per judge measured by the order check (--pe-judge-order-check), then the panel's
    effective number of judges. ``summary_section``: ``summary["safety"]`` or ``summary["triage_judging"]``
    (a persona_eval.judges.panel_summary block); [] when it holds no diagnostics.

    >>> biased = {"n": 30, "first_position_share": 1.0, "expected_share": 0.25, "pvalue_holm": 1e-12,
    ...           "flagged": True}
    >>> for line in judge_diagnostic_lines({"diagnostics": {"position_bias": {"j": {"pooled": biased}},
    ...                                     "effective_judges": {"n_judges": 1, "note": "one judge"}}}):
    ...     print(line)
    Judge j favours position 1: 100% of its top picks (expected 25%), flagged (Holm-adjusted p <0.001, n 30).
    Effective number of judges: not computable: one judge.
    >>> judge_diagnostic_lines({})
    []
    """
    diagnostics = at(summary_section, "diagnostics")
    if not isinstance(diagnostics, Mapping):
        return []
    lines = position_verdicts(diagnostics) + order_sentences(diagnostics)
    effective = effective_judges_sentence(diagnostics)
    return lines + ([effective] if effective is not None else [])
