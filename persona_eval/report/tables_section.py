"""The report's triage tables: per model, task and stratum, every persona's metrics with the paired
differences from the control chosen on the page."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from markupsafe import Markup

from persona_eval.metrics import METRICS
from persona_eval.report.format import DASH, cell_text, ci_text, esc, fmt, fmt_p, number, slug
from persona_eval.report.fragments import baseline_select, delta_span, deltas_html
from persona_eval.report.power_text import mde_phrase
from persona_eval.report.run import Run
from persona_eval.report.titles import BASELINE_TITLE, direction, metric_description, metric_title, stratum_title


def _delta_span(run: Run, model: str, task: str, stratum: str, metric: str, persona: str, baseline: str) -> str:
    comparison = run.comparison(model, task, stratum, metric, persona, baseline)
    if comparison is None:
        return ""
    delta = number(comparison.get("delta"))
    significant = bool(comparison.get("significant"))
    low, high = number(comparison.get("ci_low")), number(comparison.get("ci_high"))
    interval = (f"[{fmt(metric, low, signed=True)}, {fmt(metric, high, signed=True)}]"
                if low is not None and high is not None else "")
    title = (f"{run.name(persona)} vs {BASELINE_TITLE.get(baseline, baseline)}: "
             f"{fmt(metric, comparison.get('value'))} vs {fmt(metric, comparison.get('baseline_value'))}, "
             f"difference {fmt(metric, delta, signed=True)}, {ci_text(comparison)}; "
             f"p {fmt_p(comparison.get('pvalue'))}, adjusted p {fmt_p(comparison.get('pvalue_adjusted'))}"
             f"{' (significant)' if significant else ''}; {comparison.get('test') or 'test not named'}; "
             f"n {comparison.get('n', DASH)}" + (f"; {comparison['note']}" if comparison.get("note") else ""))
    power = mde_phrase(comparison)
    if power is not None:
        title += f"; {power} (80% power at Holm's first-step level)"
    span = delta_span(baseline, direction=direction(metric, delta) if delta is not None else "changed",
                      significant=significant, title=title, difference=fmt(metric, delta, signed=True),
                      p=fmt_p(comparison.get("pvalue_adjusted")), interval=interval)
    if power is not None:
        # Inside the difference's own span, so that it shows and hides with its control; "ci" lays it out
        # as a line under the difference, like the interval.
        closing = "</span>"
        span = span[:-len(closing)] + f'<span class="ci mde">{esc(power)}</span>{closing}'
    return span


def _metric_table(run: Run, model: str, task: str, stratum: str) -> str:
    personas = run.personas_of(model, task)
    metrics = run.metrics_of(model, task)
    first = run.rows.get((model, task, stratum, personas[0])) if personas else None
    n = first.get("n") if first else None
    head = "".join(f'<th scope="col" title="{esc(metric_description(m))}">{esc(metric_title(m))}</th>'
                   for m in metrics)
    body = []
    notes: dict[str, set[str]] = {}
    for persona in personas:
        row = run.rows.get((model, task, stratum, persona))
        if row is None:
            continue
        cells = []
        for metric in metrics:
            value = row.get("metrics", {}).get(metric)
            note = (row.get("notes") or {}).get(metric)
            text = cell_text(value, note, metric)
            if text in ("n/a", DASH) and note:
                notes.setdefault(text, set()).add(str(note))
            title = f' title="{esc(note)}"' if note and number(value) is None else ""
            deltas = deltas_html(persona, partial(_delta_span, run, model, task, stratum, metric, persona))
            css = "na" if text == "n/a" else ("undef" if text == DASH else "")
            cells.append(f'<td class="{css}"{title}><span class="v">{esc(text)}</span>{deltas}</td>')
        swatch = f'<span class="swatch" style="background:{run.colour(persona)}"></span>'
        body.append(f'<tr><th scope="row">{swatch}{esc(run.name(persona))}'
                    f'<span class="pid">{esc(persona)}</span></th>{"".join(cells)}</tr>')
    foot = [f"<li><strong>{esc(text)}</strong>: {esc('; '.join(sorted(reasons)))}</li>"
            for text, reasons in sorted(notes.items())]
    caption = f"{stratum_title(stratum)}" + (f" (n = {n} cases per persona)" if n is not None else "")
    return (f'<div class="table-wrap"><table class="metrics" id="{esc(slug("t", model, task, stratum))}">'
            f"<caption>{esc(caption)}</caption>"
            f'<thead><tr><th scope="col">Persona</th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
            + (f'<ul class="notes">{"".join(foot)}</ul>' if foot else "") + "</div>")


def _settings_sentence(settings: Mapping[str, Any]) -> str:
    """How the comparisons were made, in words, from summary["comparison_settings"]."""
    level = number(settings.get("confidence_level"))
    family = settings.get("family")
    family_text = " \u00d7 ".join(str(f) for f in family) if isinstance(family, list) else "family"
    return (f"Intervals: {f'{level * 100:.0f}%' if level is not None else ''} paired bootstrap "
            f"({settings.get('n_resamples', DASH)} resamples, seed {settings.get('seed', DASH)}). p-values: McNemar "
            f"for accuracy and consistency (exact binomial below 25 discordant pairs, continuity-corrected "
            f"chi-square from 25), paired bootstrap otherwise, adjusted by "
            f"{str(settings.get('adjustment', 'holm')).capitalize()} within each {family_text}; significant when "
            f"the adjusted p is below {settings.get('alpha', 0.05)}."
            + (" Beside a difference that is not significant: the smallest the comparison could detect with 80% "
               "power at the level of Holm's first step (alpha divided by the comparisons in the family)."
               if "mde" in settings else ""))


def tables_section(run: Run) -> Markup:
    parts = ['<section id="tables"><h2>Metrics by persona and stratum</h2>']
    if run.has_comparisons:
        settings = run.summary.get("comparison_settings")
        if isinstance(settings, Mapping):
            parts.append(f'<p class="muted">{esc(_settings_sentence(settings))}</p>')
        parts.append(f'<p class="controls">{baseline_select()} '
                     '<span class="muted">\u0394 persona minus baseline, [confidence interval], p adjusted for '
                     "multiple comparisons; * significant after adjustment; under a difference that is not "
                     "significant, the smallest the comparison could detect (80% power). Colour: "
                     '<span class="worse sig">worse</span>, <span class="better sig">better</span>, '
                     '<span class="changed sig">changed</span> (significant only).</span></p>')
    for model, task in run.model_tasks():
        parts.append(f'<h3 id="{esc(slug("m", model, task))}">{esc(task)} \u00b7 {esc(model)}</h3>')
        for stratum in run.strata(model, task):
            parts.append(_metric_table(run, model, task, stratum))
    legend = "".join(f"<dt>{esc(metric_title(m))}</dt><dd>{esc(info.description)}</dd>"
                     for m, info in METRICS.items())
    parts.append(f'<details><summary>What the metrics mean</summary><dl class="legend">{legend}</dl>'
                 f"<p>{DASH}: not defined on these cases (e.g. risk sensitivity when there are no errors); "
                 "n/a: not available for this model (it returns no log-probabilities).</p></details>")
    parts.append("</section>")
    return Markup("".join(parts))
