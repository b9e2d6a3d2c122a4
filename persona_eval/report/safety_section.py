"""The report's patient-safety section: how the LLM-judge panel ranked each persona's responses (MRR by
persona, category and judge, with paired tests), how far the judges agree, how far they can be trusted
(position preference, order agreement, effective number of judges), and their prompts."""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from typing import Any

from markupsafe import Markup

from persona_eval.personas import BASELINE, GROUP_TITLES
from persona_eval.report.format import DASH, esc, fmt, fmt_p, number, share, slug
from persona_eval.report.fragments import baseline_select, delta_span, deltas_html, kv_table
from persona_eval.report.judge_text import effective_judges_sentence, position_verdicts
from persona_eval.report.palette import GROUP_COLOUR, HEAT_ABOVE, HEAT_BELOW
from persona_eval.report.run import at, mapping
from persona_eval.report.safety_data import ALL_CATEGORIES, POOLED, Safety
from persona_eval.report.svg import coord, nice_limit, svg_open, svg_text
from persona_eval.report.titles import BASELINE_TITLE, criterion_title

# The bars' colours in words: a figure's key, so that the groups are told apart by more than colour.
_GROUP_KEY = " ".join(f'<span class="swatch" style="background:{GROUP_COLOUR[group]}"></span>{GROUP_TITLES[group]}'
                      for group in ("medical", "non_medical", "baseline"))


def _test_text(safety: Safety, test: Mapping[str, Any] | None, baseline: str) -> str:
    """A paired test against `baseline` in words, for a tooltip."""
    if test is None:
        return f"no paired test against {BASELINE_TITLE.get(baseline, baseline)}"
    significant = safety.significant(test)
    return (f"vs {BASELINE_TITLE.get(baseline, baseline)}: mean difference of per-query reciprocal ranks "
            f"{fmt('mrr', test.get('mean_difference'), signed=True)}, t {fmt('mrr', test.get('statistic'))}, "
            f"p {fmt_p(test.get('pvalue'))}, Holm-adjusted p {fmt_p(test.get('pvalue_holm'))}"
            f"{' (significant)' if significant else ''}; {test.get('method') or 'test not named'}; "
            f"n {test.get('n', DASH)} queries")


def _mean_pairwise_kappa(agreement: Mapping[str, Any]) -> float | None:
    pairs = agreement.get("pairwise_kappa")
    values = [number(p.get("kappa")) for p in pairs if isinstance(p, Mapping)] if isinstance(pairs, list) else []
    defined = [v for v in values if v is not None]
    return math.fsum(defined) / len(defined) if defined else None


def _pairwise_title(agreement: Mapping[str, Any]) -> str:
    pairs = agreement.get("pairwise_kappa")
    texts = []
    for pair in pairs if isinstance(pairs, list) else []:
        if isinstance(pair, Mapping):
            judges = pair.get("judges")
            names = " vs ".join(str(j) for j in judges) if isinstance(judges, list) else DASH
            texts.append(f"{names}: Cohen's \u03ba {fmt('kappa', pair.get('kappa'))} (n {pair.get('n', DASH)})")
    return "; ".join(texts) or "no pair of judges"


def _agreement_sentence(agreement: Any) -> str:
    """The judges' agreement on the top-ranked persona, in words (with the reason when not computable)."""
    if not isinstance(agreement, Mapping):
        return "Agreement between the judges: not recorded in this run's summary."
    note = agreement.get("note")
    head = (f"Agreement of the {agreement.get('n_judges', DASH)} judges on the top-ranked persona "
            f"({agreement.get('n_all_valid', DASH)} of {agreement.get('n_queries', DASH)} queries ranked validly "
            "by every judge)")
    if number(agreement.get("majority_agreement")) is None:
        return f"{head}: not computable: {note or 'no reason recorded'}."
    fleiss = number(at(agreement, "fleiss_kappa", "kappa"))
    text = (f"{head}: majority agreement {share(agreement.get('majority_agreement'))}, unanimous "
            f"{share(agreement.get('unanimous'))}, Fleiss' \u03ba {fmt('kappa', fleiss)}, mean pairwise Cohen's "
            f"\u03ba {fmt('kappa', _mean_pairwise_kappa(agreement))} ({_pairwise_title(agreement)})")
    return text + (f"; {note}." if note else ".")


def _agreement_cells(agreement: Any) -> str:
    """Majority agreement, Fleiss' kappa, mean pairwise kappa, queries and note, as table cells."""
    if not isinstance(agreement, Mapping):
        return f'<td class="undef">{DASH}</td>' * 4 + "<td>not recorded</td>"
    fleiss = number(at(agreement, "fleiss_kappa", "kappa"))
    note = agreement.get("note")
    note_text = (f"not computable: {note}" if note and number(agreement.get("majority_agreement")) is None
                 else note or "")
    return (f'<td title="unanimous: {esc(share(agreement.get("unanimous")))}">'
            f'{esc(share(agreement.get("majority_agreement")))}</td>'
            f"<td>{esc(fmt('kappa', fleiss))}</td>"
            f'<td title="{esc(_pairwise_title(agreement))}">{esc(fmt("kappa", _mean_pairwise_kappa(agreement)))}'
            f"</td><td>{esc(agreement.get('n_all_valid', DASH))} of {esc(agreement.get('n_queries', DASH))}</td>"
            f'<td class="note">{esc(note_text)}</td>')


def _mrr_bars(safety: Safety, model: str, criterion: str, personas: list[str]) -> str:
    """Pooled MRR per persona over all categories, bars coloured by persona group, with the paired test
    against no persona written beside each bar."""
    label_w, group_w, plot_w, note_w, row_h, top, bottom = 170.0, 84.0, 280.0, 190.0, 22.0, 28.0, 46.0
    x0 = label_w + group_w
    bottom_y = top + row_h * max(len(personas), 1)
    width, height = x0 + plot_w + note_w, bottom_y + bottom
    out = [svg_open(width, height, f"{criterion_title(criterion)}: MRR by persona, pooled over judges ({model})")]

    def x(value: float) -> float:
        return x0 + value * plot_w

    out.append(svg_text(label_w, 16, "group", css="tick"))
    out.append(svg_text(x0, 16, "MRR, all categories", css="tick"))
    out.append(svg_text(x0 + plot_w + 12, 16, "vs no persona (Holm-adjusted p)", css="tick"))
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<line x1="{coord(x(tick))}" y1="{coord(top - 4)}" x2="{coord(x(tick))}" '
                   f'y2="{coord(bottom_y + 4)}" class="grid"/>')
        out.append(svg_text(x(tick), bottom_y + 18, f"{tick:g}", anchor="middle", css="tick"))
    out.append(svg_text(x(0.5), bottom_y + 34, "\u2190 ranked lower \u00b7 ranked higher \u2192", anchor="middle",
                        css="hint"))
    for i, persona in enumerate(personas):
        y = top + row_h * i
        baseline_y = y + row_h / 2 + 4
        name = safety.run.name(persona)
        out.append(svg_text(label_w - 8, baseline_y, name, anchor="end", css="lab"))
        out.append(svg_text(label_w, baseline_y, safety.group_title(persona), css="tick"))
        value, n = safety.value(model, criterion, POOLED, ALL_CATEGORIES, persona)
        if value is None:
            out.append(svg_text(x0 + 4, baseline_y, f"{DASH} (no valid ranking)", css="tick"))
            continue
        test = safety.test(model, criterion, POOLED, ALL_CATEGORIES, BASELINE, persona)
        significant = safety.significant(test)
        tip = (f"{name} ({safety.group_title(persona)}): MRR {fmt('mrr', value)} over {n} valid rankings"
               + ("" if persona == BASELINE else f"; {_test_text(safety, test, BASELINE)}"))
        out.append(f'<g><title>{esc(tip)}</title><rect x="{coord(x0)}" y="{coord(y + 4)}" '
                   f'width="{coord(max(x(min(value, 1.0)) - x0, 0.0))}" height="{coord(row_h - 8)}" '
                   f'fill="{safety.colour(persona)}"/>')
        out.append(svg_text(x(min(value, 1.0)) + 4, baseline_y, fmt("mrr", value), css="val"))
        if persona == BASELINE:
            note, css = "baseline", "tick"
        elif test is None:
            note, css = "no test", "tick"
        else:
            difference = number(test.get("mean_difference"))
            note = (f"\u0394 {fmt('mrr', difference, signed=True)}{'*' if significant else ''}  "
                    f"p {fmt_p(test.get('pvalue_holm'))}")
            css = ("val " + ("up" if (difference or 0) > 0 else "down")) if significant else "tick"
        out.append(svg_text(x0 + plot_w + 12, baseline_y, note, css=css) + "</g>")
    baseline, _ = safety.value(model, criterion, POOLED, ALL_CATEGORIES, BASELINE)
    if baseline is not None:
        out.append(f'<line x1="{coord(x(baseline))}" y1="{coord(top - 4)}" x2="{coord(x(baseline))}" '
                   f'y2="{coord(bottom_y + 4)}" class="ref"><title>no persona</title></line>')
    if len(personas) >= 2:
        chance = math.fsum(1.0 / rank for rank in range(1, len(personas) + 1)) / len(personas)
        out.append(f'<line x1="{coord(x(chance))}" y1="{coord(top - 4)}" x2="{coord(x(chance))}" '
                   f'y2="{coord(bottom_y + 4)}" class="chance"><title>chance: the MRR of random rankings of '
                   f"{len(personas)} ({fmt('mrr', chance)})</title></line>")
    out.append("</svg>")
    return "".join(out)


def _heat_colour(difference: float, limit: float) -> tuple[str, bool]:
    """The background of a heatmap cell and whether its text should be white."""
    strength = min(abs(difference) / limit, 1.0) if limit > 0 else 0.0
    target = HEAT_ABOVE if difference > 0 else HEAT_BELOW
    rgb = [round(255 + (channel - 255) * strength) for channel in target]
    return "#" + "".join(f"{channel:02x}" for channel in rgb), strength > 0.6 and difference > 0


def _mrr_heatmap(safety: Safety, model: str, criterion: str, personas: list[str]) -> str:
    """Category x persona MRR (pooled over judges), coloured by the difference from no persona in the same
    category, with the judges' agreement at the end of every row; reversals outlined and listed."""
    categories = safety.category_keys(model, criterion)
    differences: dict[tuple[str, str], float] = {}
    for category in categories:
        baseline, _ = safety.value(model, criterion, POOLED, category, BASELINE)
        for persona in personas:
            value, _ = safety.value(model, criterion, POOLED, category, persona)
            if persona != BASELINE and value is not None and baseline is not None:
                differences[(category, persona)] = value - baseline
    limit = nice_limit(max((abs(d) for d in differences.values()), default=0.0), 0.05)
    reversals = []
    head = "".join(f'<th scope="col"><span class="swatch" style="background:{safety.colour(p)}"></span>'
                   f'{esc(safety.run.name(p))}<span class="grp">{esc(safety.group_title(p))}</span></th>'
                   for p in personas)
    body = []
    for category in categories:
        cells = []
        for persona in personas:
            value, n = safety.value(model, criterion, POOLED, category, persona)
            name = safety.run.name(persona)
            if value is None:
                cells.append(f'<td class="hc undef" title="no valid ranking"><span class="v">{DASH}</span></td>')
                continue
            if persona == BASELINE or (category, persona) not in differences:
                label = "baseline" if persona == BASELINE else DASH
                cells.append(f'<td class="hc" title="{esc(f"{name}, {safety.category_title(category)}: MRR ")}'
                             f'{esc(fmt("mrr", value))} (n {esc(n)})"><span class="v">{esc(fmt("mrr", value))}'
                             f'</span><span class="hd">{label}</span></td>')
                continue
            difference = differences[(category, persona)]
            test = safety.test(model, criterion, POOLED, category, BASELINE, persona)
            significant = safety.significant(test)
            overall = differences.get((ALL_CATEGORIES, persona))
            # Signs as printed (two decimals): a difference that shows as 0.00 reverses nothing.
            reversed_here = (category != ALL_CATEGORIES and overall is not None
                             and round(difference, 2) * round(overall, 2) < 0)
            if reversed_here:
                assert overall is not None
                reversals.append(f"{name} on {safety.category_title(category)}: "
                                 f"{fmt('mrr', difference, signed=True)} against no persona, but "
                                 f"{fmt('mrr', overall, signed=True)} over all categories"
                                 f"{' (significant in this category)' if significant else ''}")
            colour, dark = _heat_colour(difference, limit)
            tip = (f"{name}, {safety.category_title(category)}: MRR {fmt('mrr', value)} (n {n}), difference from "
                   f"no persona {fmt('mrr', difference, signed=True)}; {_test_text(safety, test, BASELINE)}"
                   + ("; a reversal of the persona's overall difference" if reversed_here else ""))
            css = "hc" + (" dark" if dark else "") + (" rev" if reversed_here else "") + (" sig" if significant else "")
            cells.append(f'<td class="{css}" style="background:{colour}" title="{esc(tip)}">'
                         f'<span class="v">{esc(fmt("mrr", value))}</span><span class="hd">'
                         f'{esc(fmt("mrr", difference, signed=True))}{"*" if significant else ""}</span></td>')
        agreement = at(safety.agreement, model, criterion, category)
        body.append(f'<tr><th scope="row">{esc(safety.category_title(category))}</th>{"".join(cells)}'
                    f"{_agreement_cells(agreement)}</tr>")
    above, _ = _heat_colour(limit, limit)
    below, _ = _heat_colour(-limit, limit)
    key = (f'<p class="muted">Each cell: the MRR pooled over judges, and under it the difference from no persona '
           f"in the same category (* Holm-adjusted p &lt; {esc(f'{safety.alpha:g}')}, paired t-test of per-query "
           f'reciprocal ranks). Colour: <span class="heatkey" style="background:{above};color:#fff">ranked above '
           f"no persona by {esc(fmt('mrr', limit))} or more</span> \u2026 white \u2026 "
           f'<span class="heatkey" style="background:{below}">ranked below by {esc(fmt("mrr", limit))} or more'
           "</span>. Outlined: a reversal, where the persona's difference in the category has the opposite sign "
           "of its difference over all categories. On the right, the judges' agreement on the top-ranked persona "
           "over the queries every judge ranked validly.</p>")
    table = (f'<div class="table-wrap"><table class="metrics heat" id="{esc(slug("s-heat", model, criterion))}">'
             f"<caption>{esc(criterion_title(criterion))} \u00b7 {esc(model)}: MRR by category and persona"
             "</caption><thead><tr>"
             f'<th scope="col" rowspan="2">Category</th><th scope="colgroup" colspan="{len(personas)}">MRR, pooled '
             'over judges</th><th scope="colgroup" colspan="5">Judges\' agreement on the top persona</th></tr><tr>'
             f"{head}<th>majority</th><th>Fleiss' \u03ba</th><th>mean pairwise Cohen's \u03ba</th>"
             f'<th>queries</th><th>note</th></tr></thead><tbody>{"".join(body)}</tbody></table></div>')
    listed = ""
    if reversals:
        items = "".join(f"<li>{esc(text)}</li>" for text in reversals)
        listed = f'<p class="rev-head">Reversals ({len(reversals)}):</p><ul class="notes reversals">{items}</ul>'
    elif differences:
        listed = '<p class="muted">No reversal: in every category each persona is on the same side of no persona ' \
                 "as over all categories (or level with it).</p>"
    return key + table + listed


def _rank_delta_span(safety: Safety, model: str, criterion: str, judge: str, persona: str, baseline: str) -> str:
    test = safety.test(model, criterion, judge, ALL_CATEGORIES, baseline, persona)
    if test is None:
        return ""
    difference = number(test.get("mean_difference"))
    significant = safety.significant(test)
    return delta_span(baseline, direction="changed" if not difference else ("better" if difference > 0 else "worse"),
                      significant=significant, difference=fmt("mrr", difference, signed=True),
                      title=f"{safety.run.name(persona)}, {judge}: {_test_text(safety, test, baseline)}",
                      p=fmt_p(test.get("pvalue_holm")))


def _mrr_judge_table(safety: Safety, model: str, criterion: str, personas: list[str]) -> str:
    """MRR over all categories per persona, for the panel pooled and for each judge, with the paired
    differences against the baseline chosen on the page."""
    judges = [POOLED, *safety.judges(model, criterion)]
    head = "".join(f'<th scope="col">{"pooled over judges" if j == POOLED else esc(j)}</th>' for j in judges)
    body = []
    for persona in personas:
        cells = []
        for judge in judges:
            value, n = safety.value(model, criterion, judge, ALL_CATEGORIES, persona)
            deltas = deltas_html(persona, partial(_rank_delta_span, safety, model, criterion, judge, persona))
            css = "undef" if value is None else ""
            cells.append(f'<td class="{css}" title="{esc(f"{n} valid rankings" if n is not None else "none")}">'
                         f'<span class="v">{esc(fmt("mrr", value))}</span>{deltas}</td>')
        body.append(f'<tr><th scope="row"><span class="swatch" style="background:{safety.colour(persona)}"></span>'
                    f'{esc(safety.run.name(persona))}<span class="pid">{esc(persona)}</span></th>'
                    f'<td class="grp">{esc(safety.group_title(persona))}</td>{"".join(cells)}</tr>')
    return (f'<div class="table-wrap"><table class="metrics" id="{esc(slug("s-judges", model, criterion))}">'
            f"<caption>{esc(criterion_title(criterion))} \u00b7 {esc(model)}: MRR by judge, all categories"
            f'</caption><thead><tr><th scope="col">Persona</th><th scope="col">Group</th>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _invalid_table(safety: Safety) -> str:
    if not safety.invalid:
        return '<p class="muted">This run\'s safety summary holds no count of invalid rankings.</p>'
    rows, detail = [], []
    for judge, entry in safety.invalid.items():
        entry = mapping(entry)
        rows.append(f"<tr><td>{esc(judge)}</td><td>{esc(entry.get('judgments', DASH))}</td>"
                    f"<td>{esc(entry.get('invalid', DASH))}</td><td>{esc(share(entry.get('share'), 1))}</td>"
                    f"<td>{esc(entry.get('retried', DASH))}</td></tr>")
        for model, criteria in mapping(entry.get("by_model")).items():
            for criterion, cell in mapping(criteria).items():
                cell = mapping(cell)
                detail.append(f"<tr><td>{esc(judge)}</td><td>{esc(model)}</td>"
                              f"<td>{esc(criterion_title(str(criterion)))}</td>"
                              f"<td>{esc(cell.get('judgments', DASH))}</td><td>{esc(cell.get('invalid', DASH))}</td>"
                              f"<td>{esc(share(cell.get('share'), 1))}</td><td>{esc(cell.get('retried', DASH))}</td>"
                              "</tr>")
    head = ("<th>rankings</th><th>invalid (excluded)</th><th>share invalid</th>"
            "<th>retried (asked a second time)</th>")
    out = (f'<div class="table-wrap"><table class="kv wide" id="s-invalid"><thead><tr><th>judge</th>{head}</tr>'
           f'</thead><tbody>{"".join(rows)}</tbody></table></div>')
    if detail:
        out += (f"<details><summary>By model and criterion</summary><div class=\"table-wrap\"><table class=\"kv wide\">"
                f"<thead><tr><th>judge</th><th>model</th><th>criterion</th>{head}</tr></thead>"
                f'<tbody>{"".join(detail)}</tbody></table></div></details>')
    return out


def _position_cells(cell: Mapping[str, Any]) -> str:
    """Top picks shown first vs expected, by position, n, adjusted p and flag: a position_bias cell as cells."""
    shares = cell.get("position_shares")
    by_position = (" \u00b7 ".join(f"{i}: {share(v)}" for i, v in enumerate(shares, start=1))
                   if isinstance(shares, list) and shares else DASH)
    flagged = cell.get("flagged")
    flag = "<strong>flagged</strong>" if flagged is True else "none found" if flagged is False else DASH
    return (f'<td>{esc(share(cell.get("first_position_share")))}</td><td>{esc(share(cell.get("expected_share")))}</td>'
            f'<td>{esc(by_position)}</td><td>{esc(cell.get("n", DASH))}</td>'
            f'<td>{esc(fmt_p(cell.get("pvalue_holm")))}</td><td>{flag}</td>')


def _order_cells(cell: Mapping[str, Any]) -> str:
    """Mean Kendall tau between a judge's rankings in both orders, and its pairs (or why not)."""
    tau = number(cell.get("mean_tau"))
    note = cell.get("note")
    if tau is None:
        return (f'<td class="undef" title="{esc(note or "not recorded")}">{DASH}</td>'
                f'<td class="note">{esc(note or "")}</td>')
    return (f'<td title="same top pick in {esc(share(cell.get("same_top_share")))} of the pairs">'
            f'{esc(fmt("kappa", tau))}</td><td>{esc(cell.get("n_pairs", DASH))} pairs</td>')


_DIAGNOSTICS_HEAD = ("<th scope=\"col\">top picks shown first</th><th scope=\"col\">expected (no preference)</th>"
                     "<th scope=\"col\">top picks by position</th><th scope=\"col\">rankings</th>"
                     "<th scope=\"col\">Holm-adjusted p</th><th scope=\"col\">position preference</th>"
                     "<th scope=\"col\">order agreement (Kendall\u2019s \u03c4)</th><th scope=\"col\">order check</th>")


def _diagnostics_html(safety: Safety) -> str:
    """The judges' diagnostics: verdicts on position preference first, the effective number of judges, then
    a row per judge (pooled over criteria) and, folded, per criterion and per pair of judges."""
    diagnostics = safety.diagnostics
    if not diagnostics:
        return '<p class="muted">This run\'s safety summary holds no judge diagnostics.</p>'
    position = mapping(diagnostics.get("position_bias"))
    order = mapping(diagnostics.get("order_agreement"))
    flagged = position_verdicts(diagnostics)
    parts = [f'<p class="cut">{esc(sentence)}</p>' for sentence in flagged]
    if not flagged and position:
        parts.append(f'<p class="agree">No judge prefers position 1 (Holm-adjusted p of the binomial test at or above '
                     f"{esc(f'{safety.alpha:g}')} for every judge).</p>")
    effective = effective_judges_sentence(diagnostics)
    if effective is not None:
        parts.append(f'<p class="agree">{esc(effective)}</p>')
    parts.append('<p class="muted">Position preference: the share of a judge\'s valid rankings whose top pick was '
                 "shown as Response 1. Every persona is shown in every position equally often, so a judge without "
                 "a position preference puts its top pick first in a share 1/k of its rankings whatever the "
                 "personas' quality; two-sided exact binomial test against 1/k, Holm-adjusted across the judges, "
                 f"flagged below {esc(f'{safety.alpha:g}')}. Order agreement: Kendall\u2019s \u03c4 between a "
                 "judge's rankings of the same answers shown in one order and in the reverse (1: the order does not "
                 "matter; \u22121: the ranking follows the order), measured with --pe-judge-order-check. Effective "
                 "number of judges: m / (1 + (m \u2212 1) r), r the mean Spearman correlation between the judges' "
                 "rankings (Kish's design effect): m for judges that agree no more than chance, 1 for judges that "
                 "rank alike.</p>")
    rows, detail = [], []
    for judge, cells in position.items():
        pooled = mapping(at(cells, POOLED))
        rows.append(f'<tr><th scope="row">{esc(judge)}</th>{_position_cells(pooled)}'
                    f"{_order_cells(mapping(at(order, judge, POOLED)))}</tr>")
        for criterion, cell in mapping(cells).items():
            if criterion == POOLED:
                continue
            detail.append(f'<tr><th scope="row">{esc(judge)}</th><td>{esc(criterion_title(str(criterion)))}</td>'
                          f"{_position_cells(mapping(cell))}{_order_cells(mapping(at(order, judge, criterion)))}</tr>")
    if rows:
        parts.append(f'<div class="table-wrap"><table class="kv wide" id="s-diagnostics"><caption>Judges, pooled over '
                     f'models and criteria</caption><thead><tr><th scope="col">judge</th>{_DIAGNOSTICS_HEAD}</tr>'
                     f'</thead><tbody>{"".join(rows)}</tbody></table></div>')
    if detail:
        parts.append(f'<details><summary>By criterion</summary><div class="table-wrap"><table class="kv wide">'
                     f'<thead><tr><th scope="col">judge</th><th scope="col">criterion</th>{_DIAGNOSTICS_HEAD}</tr>'
                     f'</thead><tbody>{"".join(detail)}</tbody></table></div></details>')
    pairs = at(diagnostics, "effective_judges", "pairs")
    pair_rows = []
    for pair in pairs if isinstance(pairs, list) else []:
        pair = mapping(pair)
        judges = pair.get("judges")
        names = " vs ".join(str(j) for j in judges) if isinstance(judges, list) else DASH
        pair_rows.append(f"<tr><td>{esc(names)}</td><td>{esc(fmt('kappa', pair.get('mean_spearman')))}</td>"
                         f"<td>{esc(pair.get('n', DASH))}</td></tr>")
    if pair_rows:
        parts.append('<details><summary>Correlation between the judges\' rankings</summary><div class="table-wrap">'
                     '<table class="kv wide" id="s-judge-correlation"><thead><tr><th scope="col">judges</th>'
                     '<th scope="col">mean Spearman correlation</th><th scope="col">rankings in common</th></tr>'
                     f'</thead><tbody>{"".join(pair_rows)}</tbody></table></div></details>')
    return "".join(parts)


def _responses_table(safety: Safety) -> str:
    responses = mapping(safety.block.get("responses"))
    rows = []
    cut = total = 0
    for model, personas in responses.items():
        for persona, cell in mapping(personas).items():
            cell = mapping(cell)
            cut += int(cell.get("truncated") or 0)
            total += int(cell.get("n") or 0)
            rows.append(f"<tr><td>{esc(model)}</td><td>{esc(safety.run.name(str(persona)))}</td>"
                        f"<td>{esc(cell.get('n', DASH))}</td><td>{esc(cell.get('truncated', DASH))}</td>"
                        f"<td>{esc(cell.get('cached', DASH))}</td></tr>")
    if not rows:
        return ""
    warning = (f'<p class="cut">{cut} of {total} answers were cut at the token budget before they ended, and '
               "the judges ranked them as they were: raise the model's max_new_tokens (models file or "
               "--pe-max-new-tokens) for a fair reading.</p>" if cut else "")
    return (warning + "<details><summary>Responses per model and persona</summary><div class=\"table-wrap\">"
            '<table class="kv wide"><thead><tr><th>model</th><th>persona</th><th>responses</th>'
            "<th>cut off at the token limit</th><th>from the cache</th></tr></thead>"
            f'<tbody>{"".join(rows)}</tbody></table></div></details>')


def _templates_html(safety: Safety) -> str:
    if not safety.templates:
        return '<p class="muted">This run\'s safety summary holds no judge prompt templates.</p>'
    parts = []
    for criterion, entry in safety.templates.items():
        text = entry.get("text") if isinstance(entry, Mapping) else entry
        version = entry.get("version") if isinstance(entry, Mapping) else None
        parts.append(f'<details class="prompt"><summary><strong>{esc(criterion_title(str(criterion)))}</strong>'
                     f'<span class="pid">{esc(version or DASH)}</span></summary><pre>{esc(text)}</pre></details>')
    return "".join(parts)


def _safety_intro(safety: Safety) -> str:
    block = safety.block
    judges = block.get("judges")
    judge_text = ", ".join(str(j) for j in judges) if isinstance(judges, list) and judges else DASH
    n_judgments, n_valid = block.get("n_judgments"), block.get("n_valid")
    valid_text = (f"{n_valid} of {n_judgments} rankings valid "
                  f"({share(n_valid / n_judgments if isinstance(n_valid, int) and n_judgments else None, 1)})"
                  if isinstance(n_judgments, int) else "number of rankings not recorded")
    suffix = block.get("pressure_suffix")
    suffix_text = ("off" if not suffix else "; ".join(f"\u201c{s}\u201d" for s in suffix) if isinstance(suffix, list)
                   else f"\u201c{suffix}\u201d")
    facts = [("judges", judge_text), ("rankings", f"{valid_text}; an invalid ranking is asked for once more, then "
                                                  "excluded from every statistic, never repaired"),
             ("query template", block.get("template_version") or DASH), ("pressure suffix", suffix_text)]
    return (f'<p class="muted">Each judge ranked, best first, the responses of every persona of one model to a '
            "patient's query, anonymized and in a balanced order. MRR: the mean of 1/rank (1: always ranked first; "
            "1/k: always last of k). Paired t-tests of per-query reciprocal ranks against no persona and the helpful "
            "assistant, Holm-adjusted within each model, criterion, judge and category; * adjusted p below "
            f"{esc(f'{safety.alpha:g}')}. Agreement is shown beside every preference: judges that disagree case by "
            "case can still differ in aggregate.</p>"
            + kv_table(facts) + _responses_table(safety))


def safety_section(safety: Safety, *, with_select: bool) -> Markup:
    parts = ['<section id="safety"><h2>Patient safety: rankings by the LLM-judge panel</h2>', _safety_intro(safety)]
    if with_select:
        parts.append(f'<p class="controls">{baseline_select()}</p>')
    parts.append("<h3>Invalid rankings per judge</h3>" + _invalid_table(safety))
    parts.append('<h3 id="s-judge-diagnostics">Judge diagnostics: position preference, order agreement, '
                 "effective number of judges</h3>" + _diagnostics_html(safety))
    models = safety.models()
    if not models:
        parts.append('<p class="muted">This run\'s safety summary holds no rankings.</p>')
    for model in models:
        for criterion in safety.criteria(model):
            personas = safety.personas(model, criterion)
            parts.append(f'<h3 id="{esc(slug("s", model, criterion))}">{esc(criterion_title(criterion))} '
                         f"\u00b7 {esc(model)}</h3>")
            overall = at(safety.agreement, model, criterion, ALL_CATEGORIES)
            parts.append(f'<p class="agree">{esc(_agreement_sentence(overall))}</p>')
            if not personas:
                parts.append('<p class="muted">No valid ranking: no MRR to show.</p>')
                continue
            if not safety.tests:
                parts.append('<p class="muted">This run\'s safety summary holds no paired tests: MRR only.</p>')
            parts.append(f"<figure><figcaption>MRR by persona, pooled over judges and categories; bars: {_GROUP_KEY}; "
                         "dashed: no persona; dotted: chance</figcaption>"
                         f"{_mrr_bars(safety, model, criterion, personas)}</figure>")
            parts.append("<h4>By category</h4>" + _mrr_heatmap(safety, model, criterion, personas))
            parts.append("<h4>By judge</h4>" + _mrr_judge_table(safety, model, criterion, personas))
    parts.append("<h3>Judge prompt templates</h3>"
                 '<p class="muted">Verbatim; {question} and {response_1} \u2026 {response_k} stand for the '
                 "patient's query and the anonymized responses in the order shown.</p>" + _templates_html(safety))
    parts.append("</section>")
    return Markup("".join(parts))
