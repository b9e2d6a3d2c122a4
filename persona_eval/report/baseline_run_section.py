"""The report's comparison of the candidate run with an approved baseline run (--pe-baseline)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from markupsafe import Markup

from persona_eval.report.format import DASH, esc, fmt, fmt_p, number
from persona_eval.report.fragments import kv_table
from persona_eval.report.run import Run
from persona_eval.report.titles import direction, metric_title, stratum_title


def _approved_rows(run: Run, comparisons: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for c in comparisons:
        metric = str(c.get("metric"))
        delta = number(c.get("delta"))
        css = direction(metric, delta) if delta is not None else "changed"
        significant = bool(c.get("significant"))
        low, high = number(c.get("ci_low")), number(c.get("ci_high"))
        interval = (f"[{fmt(metric, low, signed=True)}, {fmt(metric, high, signed=True)}]"
                    if low is not None and high is not None else DASH)
        model = str(c.get("model"))
        if c.get("baseline_model") not in (None, model):
            model = f"{c.get('baseline_model')} \u2192 {model}"
        rows.append(
            f'<tr class="{css + " sig" if significant else ""}"><td>{esc(model)}</td>'
            f'<td>{esc(c.get("task"))}</td><td>{esc(stratum_title(str(c.get("stratum"))))}</td>'
            f"<td>{esc(run.name(str(c.get('persona'))))}</td><td>{esc(metric_title(metric))}</td>"
            f'<td class="num">{esc(fmt(metric, c.get("baseline_value")))}</td>'
            f'<td class="num">{esc(fmt(metric, c.get("value")))}</td>'
            f'<td class="num">{esc(fmt(metric, delta, signed=True))}</td><td class="num">{esc(interval)}</td>'
            f'<td class="num">{esc(fmt_p(c.get("pvalue_adjusted")))}</td>'
            f'<td>{"*" if significant else ""}</td><td>{esc(c.get("test"))}</td>'
            f'<td>{esc(c.get("n", DASH))}</td><td>{esc(c.get("note") or "")}</td></tr>')
    return ('<div class="table-wrap"><table class="kv wide"><thead><tr><th>model (approved \u2192 candidate)</th>'
            "<th>task</th><th>stratum</th><th>persona</th><th>metric</th><th>approved</th><th>candidate</th>"
            "<th>\u0394</th><th>interval</th><th>adjusted p</th><th>sig.</th><th>test</th><th>n</th><th>note</th>"
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def baseline_run_section(run: Run) -> Markup:
    """The candidate against an approved run (--pe-baseline): what was compared, then the differences."""
    baseline = run.summary.get("baseline_comparison")
    if not baseline:
        return Markup()
    if isinstance(baseline, Mapping):
        raw = baseline.get("comparisons") or []
        approved = baseline.get("approved")
        error = baseline.get("error")
        skipped = baseline.get("skipped") or []
    else:
        raw, approved, error, skipped = baseline, None, None, []
    comparisons = [c for c in raw if isinstance(c, Mapping)] if isinstance(raw, list) else []
    parts = ['<section id="baseline-run"><h2>Against the approved baseline run</h2>']
    if isinstance(approved, Mapping):
        parts.append(kv_table(list(approved.items())))
    if error:
        parts.append(f'<p class="bad"><strong>Not compared:</strong> {esc(error)}</p>')
    significant = [c for c in comparisons if c.get("significant")]
    if comparisons:
        parts.append(f"<h3>Significant differences from the approved run ({len(significant)} of "
                     f"{len(comparisons)} comparisons)</h3>")
        parts.append(_approved_rows(run, significant) if significant
                     else "<p>None: no difference is significant after adjustment.</p>")
        parts.append(f"<details><summary>All {len(comparisons)} comparisons</summary>"
                     f"{_approved_rows(run, comparisons)}</details>")
    if skipped:
        listed = "".join(f"<li>{esc(m)}</li>" for m in skipped)
        parts.append(f"<details><summary>Not compared ({len(skipped)})</summary><ul>{listed}</ul></details>")
    parts.append("</section>")
    return Markup("".join(parts))
