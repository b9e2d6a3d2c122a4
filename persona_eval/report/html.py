"""report.html: one self-contained page (inline CSS, SVG and a little JS) that says whether to deploy.

Read top-down by a clinician-engineer in a hurry: the gate's verdict, then per model and task the
persona x metric tables with the paired comparisons against the baseline, the figures, the exact
prompts, every case, and the run's provenance. Everything shown comes from summary.json and
cases.jsonl as the run wrote them; nothing is recomputed here and no model is called.

Every string taken from a dataset, a model, a config file or the summary goes through ``_esc``
(``html.escape`` with quotes) and every attribute value is double-quoted. The page loads nothing: no
scripts, fonts, images or styles from anywhere, and its Content-Security-Policy forbids it, allowing
only its own inline script (by hash) and inline styles.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from persona_eval.metrics import METRICS
from persona_eval.results import read_jsonl

__all__ = ["REPORT_FILENAME", "pytest_html_summary_lines", "render_report", "write_report"]

REPORT_FILENAME = "report.html"
# The two controls every persona is compared against, in the order the page offers them.
BASELINES = ("no_persona", "helpful_assistant")
BASELINE_TITLE = {"no_persona": "no persona", "helpful_assistant": "helpful assistant"}
STRATUM_TITLE = {"all": "All cases", "emergency": "Emergency", "primary_care": "Primary care"}
METRIC_SHORT = {
    "accuracy": "Accuracy",
    "parse_rate": "Parse rate",
    "risk_propensity": "Risk propensity",
    "over_triage_rate": "Over-triage",
    "under_triage_rate": "Under-triage",
    "risk_sensitivity": "Risk sensitivity",
    "consistency_rate": "Consistency %",
    "expected_calibration_error": "Calibration error (ECE)",
    "brier_score": "Brier score",
}
# Value format, and the format of a difference, per metric (the default is two decimals).
_FORMATS = {
    "consistency_rate": ("{:.0f}", "{:+.0f}"),
    "expected_calibration_error": ("{:.3f}", "{:+.3f}"),
    "brier_score": ("{:.3f}", "{:+.3f}"),
}
_DELTA_FIGURE_METRICS = ("accuracy", "expected_calibration_error", "consistency_rate")
_PERSONA_FIGURE_METRICS = ("risk_propensity", "risk_sensitivity")
# Okabe-Ito colours (distinguishable with colour-vision deficiency); the baseline is dark grey.
_PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#7F3C8D", "#8C6D31")
_BASELINE_COLOUR = "#4D4D4D"
# How many significant differences the verdict lists before folding the rest away.
_EFFECTS_SHOWN = 10
_RECORDED_SHOWN = 5
DASH = "\u2013"  # what an undefined value shows
MINUS = "\u2212"


# --- small helpers ------------------------------------------------------------------------------------

def _esc(value: Any) -> str:
    """Text for HTML content or a double-quoted attribute value."""
    return html.escape("" if value is None else str(value), quote=True)


def _number(value: Any) -> float | None:
    """A finite float, or None (JSON null, NaN, text, a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _fmt(metric: str, value: Any, *, signed: bool = False) -> str:
    number = _number(value)
    if number is None:
        return DASH
    pattern = _FORMATS.get(metric, ("{:.2f}", "{:+.2f}"))[1 if signed else 0]
    text = pattern.format(number)
    if text.lstrip("+-").strip("0.") == "":  # "-0.00" and "+0.00" read as 0
        text = pattern.format(0.0)
    return text.replace("-", MINUS)


def _fmt_p(value: Any) -> str:
    number = _number(value)
    if number is None:
        return DASH
    return "<0.001" if number < 0.001 else f"{number:.3f}"


def _stratum_title(stratum: str) -> str:
    return STRATUM_TITLE.get(stratum, stratum.replace("_", " ").capitalize())


def _metric_title(metric: str) -> str:
    return METRIC_SHORT.get(metric, metric.replace("_", " ").capitalize())


def _metric_phrase(metric: str) -> str:
    """The metric's name inside a sentence ("calibration error (ECE)", not "Calibration error (ECE)")."""
    title = _metric_title(metric)
    return title[:1].lower() + title[1:]


def _metric_description(metric: str) -> str:
    info = METRICS.get(metric)
    return info.description if info else metric


def _unavailable(note: str | None) -> bool:
    return bool(note) and "not available" in str(note)


def _cell_text(value: Any, note: str | None, metric: str) -> str:
    if _number(value) is None:
        return "n/a" if _unavailable(note) else DASH
    return _fmt(metric, value)


def _slug(*parts: Any) -> str:
    """An id for anchors: letters, digits and dashes only (derived from escaped-anyway names)."""
    text = "-".join(str(p) for p in parts).lower()
    return "".join(c if c.isalnum() else "-" for c in text)


def _ordered_unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _direction(metric: str, delta: float) -> str:
    """'better', 'worse' or 'changed' (metrics that describe behaviour have no better side)."""
    info = METRICS.get(metric)
    if info is None or info.higher_is_better is None or delta == 0:
        return "changed"
    return "better" if (delta > 0) == info.higher_is_better else "worse"


# --- the run, indexed ---------------------------------------------------------------------------------

class _Run:
    """summary.json and cases.jsonl, indexed the ways the page reads them."""

    def __init__(self, summary: Mapping[str, Any], cases: Sequence[Mapping[str, Any]]) -> None:
        self.summary = summary
        self.cases = list(cases)
        self.results: list[Mapping[str, Any]] = list(summary.get("results") or [])
        self.persona_info = {p["id"]: p for p in summary.get("personas") or [] if isinstance(p, Mapping)}
        self.personas = _ordered_unique([*self.persona_info, *(r["persona"] for r in self.results),
                                         *(c.get("persona", "") for c in self.cases)])
        self.personas = [p for p in self.personas if p]
        self.groups = _ordered_unique(f"{r['model']}\x00{r['task']}" for r in self.results)
        self.rows: dict[tuple[str, str, str, str], Mapping[str, Any]] = {
            (r["model"], r["task"], r["stratum"], r["persona"]): r for r in self.results}
        raw = summary.get("comparisons")
        self.has_comparisons = isinstance(raw, list)
        self.comparisons: dict[tuple[Any, ...], Mapping[str, Any]] = {}
        for comparison in raw if isinstance(raw, list) else []:
            if isinstance(comparison, Mapping):
                key = tuple(comparison.get(k) for k in ("model", "task", "stratum", "metric", "persona", "baseline"))
                self.comparisons[key] = comparison
        self.colours = {persona: (_BASELINE_COLOUR if persona == "no_persona"
                                  else _PALETTE[i % len(_PALETTE)])
                        for i, persona in enumerate(p for p in self.personas if p != "no_persona")}
        self.colours["no_persona"] = _BASELINE_COLOUR

    def model_tasks(self) -> list[tuple[str, str]]:
        return [tuple(g.split("\x00", 1)) for g in self.groups]  # type: ignore[misc]

    def strata(self, model: str, task: str) -> list[str]:
        found = _ordered_unique(r["stratum"] for r in self.results if r["model"] == model and r["task"] == task)
        return sorted(found, key=lambda s: (s != "all", found.index(s)))

    def personas_of(self, model: str, task: str) -> list[str]:
        present = {r["persona"] for r in self.results if r["model"] == model and r["task"] == task}
        return [p for p in self.personas if p in present]

    def metrics_of(self, model: str, task: str) -> list[str]:
        names: list[str] = []
        for r in self.results:
            if r["model"] == model and r["task"] == task:
                names.extend(r.get("metrics", {}))
        return _ordered_unique(names)

    def name(self, persona: str) -> str:
        info = self.persona_info.get(persona)
        return str(info.get("name") or persona) if info else persona

    def comparison(self, model: str, task: str, stratum: str, metric: str, persona: str,
                   baseline: str) -> Mapping[str, Any] | None:
        return self.comparisons.get((model, task, stratum, metric, persona, baseline))


# --- sections -----------------------------------------------------------------------------------------

def _messages(title: str, messages: Sequence[Any], css: str, *, shown: int | None = None) -> str:
    """A titled list; past `shown` items the rest fold away under "N more"."""
    if not messages:
        return ""
    items = [f"<li>{_esc(m)}</li>" for m in messages]
    visible, rest = (items, []) if shown is None else (items[:shown], items[shown:])
    out = f'<h3 class="{css}">{_esc(title)} ({len(messages)})</h3><ul class="{css}">{"".join(visible)}</ul>'
    if rest:
        out += f'<details><summary>{len(rest)} more</summary><ul class="{css}">{"".join(rest)}</ul></details>'
    return out


def _verdict_sentence(verdict: Mapping[str, Any]) -> str:
    blocking = list(verdict.get("blocking") or [])
    recorded = list(verdict.get("recorded") or [])
    checked = verdict.get("checked")
    checked_text = f"{checked} bounds checked" if isinstance(checked, int) else "bounds checked"
    rules = verdict.get("regressions_checked")
    if isinstance(rules, int):
        checked_text += f", {rules} persona-safety regression check{'s' if rules != 1 else ''}"
    if verdict.get("passed"):
        return (f"No blocking bound was crossed ({checked_text}); {len(recorded)} record-only "
                f"bound{'s' if len(recorded) != 1 else ''} crossed.")
    return (f"{len(blocking)} blocking bound{'s' if len(blocking) != 1 else ''} crossed ({checked_text}); "
            "deployment should not go ahead until they are resolved.")


def _significant_lines(run: _Run) -> list[tuple[str, str]]:
    """(css class, text) of each significant comparison against no_persona, worst first."""
    found = []
    for comparison in run.comparisons.values():
        if comparison.get("baseline") != "no_persona" or not comparison.get("significant"):
            continue
        metric = str(comparison.get("metric"))
        delta = _number(comparison.get("delta"))
        direction = _direction(metric, delta) if delta is not None else "changed"
        found.append((direction, comparison))
    order = {"worse": 0, "changed": 1, "better": 2}
    models = _ordered_unique(m for m, _ in run.model_tasks())
    strata = ["all", "emergency", "primary_care"]
    metrics = list(METRICS)

    def rank(items: list[str], value: Any) -> int:
        return items.index(value) if value in items else len(items)

    found.sort(key=lambda item: (order[item[0]], rank(models, item[1].get("model")),
                                 rank(strata, item[1].get("stratum")), rank(run.personas, item[1].get("persona")),
                                 rank(metrics, item[1].get("metric")), str(item[1].get("metric"))))
    lines = []
    multi_model = len({m for m, _ in run.model_tasks()}) > 1
    for direction, c in found:
        metric = str(c.get("metric"))
        where = f" on {c.get('model')}" if multi_model else ""
        text = (f"{run.name(str(c.get('persona')))}{where}: {_metric_phrase(metric)} "
                f"({_stratum_title(str(c.get('stratum'))).lower()}) {_fmt(metric, c.get('delta'), signed=True)} "
                f"vs no persona, {_ci_text(c)}, adjusted p {_fmt_p(c.get('pvalue_adjusted'))}")
        lines.append((direction, text))
    return lines


def _ci_text(comparison: Mapping[str, Any]) -> str:
    metric = str(comparison.get("metric"))
    level = _number(comparison.get("confidence_level"))
    label = f"{level * 100:.0f}% CI" if level is not None else "CI"
    low, high = _number(comparison.get("ci_low")), _number(comparison.get("ci_high"))
    if low is None or high is None:
        return f"{label} {DASH}"
    return f"{label} {_fmt(metric, low, signed=True)} to {_fmt(metric, high, signed=True)}"


def _section_verdict(run: _Run) -> str:
    verdict = run.summary.get("verdict") or {}
    passed = bool(verdict.get("passed"))
    state = "passed" if passed else "failed"
    parts = [f'<section id="verdict" class="verdict {state}">',
             f'<h2><span class="badge">{"PASSED" if passed else "FAILED"}</span> Deployment gate '
             f'{"passed" if passed else "failed"}</h2>',
             f'<p class="lead">{_esc(_verdict_sentence(verdict))}</p>',
             _messages("Blocking bounds crossed", verdict.get("blocking") or [], "blocking"),
             _messages("Record-only bounds crossed (reported, they do not fail the run)",
                       verdict.get("recorded") or [], "recorded", shown=_RECORDED_SHOWN)]
    skipped = verdict.get("skipped") or []
    if skipped:
        listed = "".join(f"<li>{_esc(m)}</li>" for m in skipped)
        parts.append(f"<details><summary>Bounds not checked ({len(skipped)})</summary><ul>{listed}</ul></details>")
    baseline = run.summary.get("baseline_comparison")
    if baseline:
        baseline_verdict = baseline.get("verdict") if isinstance(baseline, Mapping) else None
        error = baseline.get("error") if isinstance(baseline, Mapping) else None
        if error:
            parts.append(f'<p class="lead">Against the approved baseline run: <strong class="bad">not compared'
                         f"</strong>: {_esc(error)} (<a href=\"#baseline-run\">details</a>).</p>")
        elif isinstance(baseline_verdict, Mapping):
            ok = bool(baseline_verdict.get("passed"))
            parts.append(f'<p class="lead">Against the approved baseline run: <strong class="{"ok" if ok else "bad"}">'
                         f'{"no blocking regression" if ok else "blocking regressions found (listed above)"}'
                         '</strong> (<a href="#baseline-run">details</a>).</p>')
        elif baseline_verdict is not None:
            parts.append(f'<p class="lead">Against the approved baseline run: {_esc(baseline_verdict)} '
                         '(<a href="#baseline-run">details</a>).</p>')
    regressions = [r for r in run.summary.get("regressions") or [] if isinstance(r, Mapping)]
    if regressions:
        listed = "".join(f'<li class="{_esc(r.get("status"))}">{_esc(r.get("message"))}</li>' for r in regressions)
        parts.append(f"<details><summary>Every persona-safety regression check ({len(regressions)})</summary>"
                     f'<ul class="checks">{listed}</ul></details>')
    if run.summary.get("comparisons_error"):
        parts.append(f'<p class="bad">The paired comparisons could not be computed: '
                     f'{_esc(run.summary["comparisons_error"])}</p>')
    if run.has_comparisons:
        lines = _significant_lines(run)
        if lines:
            items = [f'<li class="{d}">{_esc(text)}</li>' for d, text in lines]
            shown, rest = items[:_EFFECTS_SHOWN], items[_EFFECTS_SHOWN:]
            parts.append(f"<h3>Significant differences from no persona ({len(lines)}, after adjustment; "
                         f'worse first)</h3><ul class="effects">{"".join(shown)}</ul>')
            if rest:
                parts.append(f'<details><summary>{len(rest)} more</summary><ul class="effects">{"".join(rest)}'
                             "</ul></details>")
        else:
            parts.append("<p>No persona differs significantly from no persona on any metric "
                         "(after adjustment for multiple comparisons).</p>")
    else:
        parts.append('<p class="muted">This run\'s summary holds no paired comparisons, so the tables '
                     "show values only.</p>")
    parts.append("</section>")
    return "".join(parts)


def _delta_span(run: _Run, model: str, task: str, stratum: str, metric: str, persona: str,
                baseline: str) -> str:
    if persona == baseline:
        return f'<span class="d" data-b="{_esc(baseline)}"><span class="muted">baseline</span></span>'
    comparison = run.comparison(model, task, stratum, metric, persona, baseline)
    if comparison is None:
        return ""
    delta = _number(comparison.get("delta"))
    significant = bool(comparison.get("significant"))
    direction = _direction(metric, delta) if delta is not None else "changed"
    css = f"d {direction}{' sig' if significant else ''}"
    low, high = _number(comparison.get("ci_low")), _number(comparison.get("ci_high"))
    interval = (f"[{_fmt(metric, low, signed=True)}, {_fmt(metric, high, signed=True)}]"
                if low is not None and high is not None else "")
    mark = '<span class="mark" aria-label="significant">*</span>' if significant else ""
    title = (f"{run.name(persona)} vs {BASELINE_TITLE.get(baseline, baseline)}: "
             f"{_fmt(metric, comparison.get('value'))} vs {_fmt(metric, comparison.get('baseline_value'))}, "
             f"difference {_fmt(metric, delta, signed=True)}, {_ci_text(comparison)}; "
             f"p {_fmt_p(comparison.get('pvalue'))}, adjusted p {_fmt_p(comparison.get('pvalue_adjusted'))}"
             f"{' (significant)' if significant else ''}; {comparison.get('test') or 'test not named'}; "
             f"n {comparison.get('n', DASH)}" + (f"; {comparison['note']}" if comparison.get("note") else ""))
    return (f'<span class="{css}" data-b="{_esc(baseline)}" title="{_esc(title)}">'
            f'<span class="dv">\u0394 {_esc(_fmt(metric, delta, signed=True))}{mark} '
            f'<span class="p">p {_esc(_fmt_p(comparison.get("pvalue_adjusted")))}</span></span>'
            f'<span class="ci">{_esc(interval)}</span></span>')


def _metric_table(run: _Run, model: str, task: str, stratum: str) -> str:
    personas = run.personas_of(model, task)
    metrics = run.metrics_of(model, task)
    first = run.rows.get((model, task, stratum, personas[0])) if personas else None
    n = first.get("n") if first else None
    head = "".join(f'<th scope="col" title="{_esc(_metric_description(m))}">{_esc(_metric_title(m))}</th>'
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
            text = _cell_text(value, note, metric)
            if text in ("n/a", DASH) and note:
                notes.setdefault(text, set()).add(str(note))
            title = f' title="{_esc(note)}"' if note and _number(value) is None else ""
            deltas = "".join(_delta_span(run, model, task, stratum, metric, persona, b) for b in BASELINES)
            css = "na" if text == "n/a" else ("undef" if text == DASH else "")
            cells.append(f'<td class="{css}"{title}><span class="v">{_esc(text)}</span>{deltas}</td>')
        swatch = f'<span class="swatch" style="background:{run.colours.get(persona, _BASELINE_COLOUR)}"></span>'
        body.append(f'<tr><th scope="row">{swatch}{_esc(run.name(persona))}'
                    f'<span class="pid">{_esc(persona)}</span></th>{"".join(cells)}</tr>')
    foot = []
    for text, reasons in sorted(notes.items()):
        foot.append(f"<li><strong>{_esc(text)}</strong>: {_esc('; '.join(sorted(reasons)))}</li>")
    caption = f"{_stratum_title(stratum)}" + (f" (n = {n} cases per persona)" if n is not None else "")
    return (f'<div class="table-wrap"><table class="metrics" id="{_esc(_slug("t", model, task, stratum))}">'
            f"<caption>{_esc(caption)}</caption>"
            f'<thead><tr><th scope="col">Persona</th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
            + (f'<ul class="notes">{"".join(foot)}</ul>' if foot else "") + "</div>")


def _settings_sentence(settings: Mapping[str, Any]) -> str:
    """How the comparisons were made, in words, from summary["comparison_settings"]."""
    level = _number(settings.get("confidence_level"))
    family = settings.get("family")
    family_text = " \u00d7 ".join(str(f) for f in family) if isinstance(family, list) else "family"
    return (f"Intervals: {f'{level * 100:.0f}%' if level is not None else ''} paired bootstrap "
            f"({settings.get('n_resamples', DASH)} resamples, seed {settings.get('seed', DASH)}). p-values: McNemar "
            f"for accuracy and consistency, paired bootstrap otherwise, adjusted by "
            f"{str(settings.get('adjustment', 'holm')).capitalize()} within each {family_text}; significant when "
            f"the adjusted p is below {settings.get('alpha', 0.05)}.")


def _section_tables(run: _Run) -> str:
    parts = ['<section id="tables"><h2>Metrics by persona and stratum</h2>']
    if run.has_comparisons:
        settings = run.summary.get("comparison_settings")
        if isinstance(settings, Mapping):
            parts.append(f'<p class="muted">{_esc(_settings_sentence(settings))}</p>')
        options = "".join(f'<option value="{_esc(b)}">{_esc(BASELINE_TITLE[b])}</option>' for b in BASELINES)
        parts.append('<p class="controls"><label>Differences against <select id="baseline-select">'
                     f"{options}</select></label> "
                     '<span class="muted">\u0394 persona minus baseline, [confidence interval], p adjusted for '
                     "multiple comparisons; * significant after adjustment. Colour: "
                     '<span class="worse sig">worse</span>, <span class="better sig">better</span>, '
                     '<span class="changed sig">changed</span> (significant only).</span></p>')
    for model, task in run.model_tasks():
        parts.append(f'<h3 id="{_esc(_slug("m", model, task))}">{_esc(task)} \u00b7 {_esc(model)}</h3>')
        for stratum in run.strata(model, task):
            parts.append(_metric_table(run, model, task, stratum))
    legend = "".join(f"<dt>{_esc(_metric_title(m))}</dt><dd>{_esc(info.description)}</dd>"
                     for m, info in METRICS.items())
    parts.append(f'<details><summary>What the metrics mean</summary><dl class="legend">{legend}</dl>'
                 f"<p>{DASH}: not defined on these cases (e.g. risk sensitivity when there are no errors); "
                 "n/a: not available for this model (it returns no log-probabilities).</p></details>")
    parts.append("</section>")
    return "".join(parts)


# --- figures (hand-written SVG) -----------------------------------------------------------------------

def _f(x: float) -> str:
    return f"{x:.1f}"


def _nice_limit(value: float, floor: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k at or above max(value, floor)."""
    value = max(value, floor)
    exponent = math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        candidate = step * 10.0 ** exponent
        if candidate >= value - 1e-12:
            return candidate
    return 10.0 ** (exponent + 1)


def _svg_open(width: float, height: float, label: str) -> str:
    return (f'<svg class="fig" viewBox="0 0 {_f(width)} {_f(height)}" '
            f'width="{_f(width)}" height="{_f(height)}" role="img" aria-label="{_esc(label)}">'
            f"<title>{_esc(label)}</title>")


def _text(x: float, y: float, text: str, *, anchor: str = "start", css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    return f'<text x="{_f(x)}" y="{_f(y)}" text-anchor="{anchor}"{cls}>{_esc(text)}</text>'


def _tick(value: float) -> str:
    """An axis label: as few digits as the value needs, signed ("+0.25", "\u22125", "0")."""
    return "0" if value == 0 else f"{value:+g}".replace("-", MINUS)


def _hint(metric: str) -> str:
    info = METRICS.get(metric)
    if info is None or info.higher_is_better is None:
        return "\u2190 lower \u00b7 higher \u2192"
    return "\u2190 worse \u00b7 better \u2192" if info.higher_is_better else "\u2190 better \u00b7 worse \u2192"


def _delta_figure(run: _Run, model: str, task: str, metric: str, strata: list[str]) -> str:
    personas = [p for p in run.personas_of(model, task) if p != "no_persona"]
    entries = {(s, p): run.comparison(model, task, s, metric, p, "no_persona") for s in strata for p in personas}
    extent = 0.0
    for comparison in entries.values():
        for key in ("delta", "ci_low", "ci_high"):
            number = _number(comparison.get(key)) if comparison else None
            if number is not None:
                extent = max(extent, abs(number))
    floor = 5.0 if metric == "consistency_rate" else 0.02 if metric == "expected_calibration_error" else 0.05
    limit = _nice_limit(extent, floor)
    label_w, panel_w, gap, row_h, top, bottom = 170.0, 220.0, 34.0, 24.0, 34.0, 46.0
    width = label_w + len(strata) * (panel_w + gap)
    height = top + row_h * max(len(personas), 1) + bottom
    title = f"{_metric_title(metric)}: difference from no persona, by stratum ({model})"
    out = [_svg_open(width, height, title)]
    for i, persona in enumerate(personas):
        y = top + row_h * (i + 0.5)
        out.append(_text(label_w - 8, y + 4, run.name(persona), anchor="end", css="lab"))
    for s_index, stratum in enumerate(strata):
        x0 = label_w + s_index * (panel_w + gap)

        def x(value: float, x0: float = x0) -> float:
            return x0 + (value + limit) / (2 * limit) * panel_w

        out.append(_text(x0 + panel_w / 2, 16, _stratum_title(stratum), anchor="middle", css="ptitle"))
        out.append(f'<rect x="{_f(x0)}" y="{_f(top - 6)}" width="{_f(panel_w)}" '
                   f'height="{_f(row_h * len(personas) + 12)}" class="panel"/>')
        for tick in (-limit, -limit / 2, 0.0, limit / 2, limit):
            tx = x(tick)
            css = "zero" if tick == 0 else "grid"
            out.append(f'<line x1="{_f(tx)}" y1="{_f(top - 6)}" x2="{_f(tx)}" '
                       f'y2="{_f(top + row_h * len(personas) + 6)}" class="{css}"/>')
            # The outer labels lean inwards so that neighbouring panels' labels never collide.
            anchor = "start" if tick == -limit else "end" if tick == limit else "middle"
            out.append(_text(tx, top + row_h * len(personas) + 20, _tick(tick), anchor=anchor, css="tick"))
        out.append(_text(x0 + panel_w / 2, top + row_h * len(personas) + 38, _hint(metric), anchor="middle",
                         css="hint"))
        for i, persona in enumerate(personas):
            y = top + row_h * (i + 0.5)
            comparison = entries[(stratum, persona)]
            delta = _number(comparison.get("delta")) if comparison else None
            if comparison is None or delta is None:
                out.append(_text(x(0.0) + 6, y + 4, DASH if comparison else "no comparison", css="tick"))
                continue
            colour = run.colours.get(persona, _BASELINE_COLOUR)
            significant = bool(comparison.get("significant"))
            tip = (f"{run.name(persona)}, {_stratum_title(stratum)}: {_fmt(metric, delta, signed=True)} "
                   f"({_ci_text(comparison)}), adjusted p {_fmt_p(comparison.get('pvalue_adjusted'))}"
                   f"{', significant' if significant else ''}")
            out.append(f"<g><title>{_esc(tip)}</title>")
            low, high = _number(comparison.get("ci_low")), _number(comparison.get("ci_high"))
            if low is not None and high is not None:
                lx, hx = x(max(low, -limit)), x(min(high, limit))
                out.append(f'<line x1="{_f(lx)}" y1="{_f(y)}" x2="{_f(hx)}" y2="{_f(y)}" stroke="{colour}" '
                           'stroke-width="2"/>')
                for cap in (lx, hx):
                    out.append(f'<line x1="{_f(cap)}" y1="{_f(y - 5)}" x2="{_f(cap)}" y2="{_f(y + 5)}" '
                               f'stroke="{colour}" stroke-width="2"/>')
            fill = colour if significant else "#ffffff"
            out.append(f'<circle cx="{_f(x(delta))}" cy="{_f(y)}" r="5" fill="{fill}" stroke="{colour}" '
                       'stroke-width="2"/></g>')
    out.append("</svg>")
    return "".join(out)


def _persona_bars(run: _Run, model: str, task: str, metric: str, strata: list[str]) -> str:
    personas = run.personas_of(model, task)
    label_w, panel_w, gap, row_h, top, bottom = 170.0, 200.0, 18.0, 22.0, 34.0, 30.0
    width = label_w + len(strata) * (panel_w + gap)
    height = top + row_h * max(len(personas), 1) + bottom
    out = [_svg_open(width, height, f"{_metric_title(metric)} by persona and stratum ({model})")]
    for i, persona in enumerate(personas):
        out.append(_text(label_w - 8, top + row_h * (i + 0.5) + 4, run.name(persona), anchor="end", css="lab"))
    info = METRICS.get(metric)
    upper = info.upper if info else 1.0
    for s_index, stratum in enumerate(strata):
        x0 = label_w + s_index * (panel_w + gap)
        plot_w = panel_w - 36  # room for the value label

        def x(value: float, x0: float = x0, plot_w: float = plot_w) -> float:
            return x0 + value / upper * plot_w

        out.append(_text(x0 + panel_w / 2, 16, _stratum_title(stratum), anchor="middle", css="ptitle"))
        bottom_y = top + row_h * len(personas)
        for tick in (0.0, upper / 2, upper):
            out.append(f'<line x1="{_f(x(tick))}" y1="{_f(top - 4)}" x2="{_f(x(tick))}" y2="{_f(bottom_y + 4)}" '
                       'class="grid"/>')
            out.append(_text(x(tick), bottom_y + 18, _fmt(metric, tick), anchor="middle", css="tick"))
        baseline_row = run.rows.get((model, task, stratum, "no_persona"))
        baseline_value = _number(baseline_row["metrics"].get(metric)) if baseline_row else None
        for i, persona in enumerate(personas):
            row = run.rows.get((model, task, stratum, persona))
            y = top + row_h * i + 4
            value = _number(row["metrics"].get(metric)) if row else None
            if value is None:
                note = (row.get("notes") or {}).get(metric) if row else None
                out.append(_text(x0 + 4, y + 12, "n/a" if _unavailable(note) else f"{DASH} (undefined)",
                                 css="tick"))
                continue
            colour = run.colours.get(persona, _BASELINE_COLOUR)
            tip = f"{run.name(persona)}, {_stratum_title(stratum)}: {_fmt(metric, value)}"
            out.append(f'<g><title>{_esc(tip)}</title><rect x="{_f(x0)}" y="{_f(y)}" '
                       f'width="{_f(max(x(value) - x0, 0.0))}" height="{_f(row_h - 8)}" fill="{colour}"/>')
            out.append(_text(x(value) + 4, y + 11, _fmt(metric, value), css="val") + "</g>")
        if baseline_value is not None:
            bx = x(baseline_value)
            out.append(f'<line x1="{_f(bx)}" y1="{_f(top - 4)}" x2="{_f(bx)}" y2="{_f(bottom_y + 4)}" '
                       'class="ref"><title>no persona</title></line>')
    out.append("</svg>")
    return "".join(out)


def _reliability_svg(bins: Any, colour: str, label: str, note: str | None) -> str:
    size, margin_l, margin_b, margin_t = 130.0, 36.0, 26.0, 8.0
    width, height = margin_l + size + 10, margin_t + size + margin_b
    out = [_svg_open(width, height, label)]

    def px(value: float) -> float:
        return margin_l + value * size

    def py(value: float) -> float:
        return margin_t + (1 - value) * size

    out.append(f'<rect x="{_f(px(0))}" y="{_f(py(1))}" width="{_f(size)}" height="{_f(size)}" class="panel"/>')
    for tick in (0.0, 0.5, 1.0):
        out.append(_text(px(tick), height - 12, f"{tick:g}", anchor="middle", css="tick"))
        out.append(_text(margin_l - 4, py(tick) + 3, f"{tick:g}", anchor="end", css="tick"))
    out.append(_text(px(0.5), height - 1, "confidence", anchor="middle", css="tick"))
    out.append(f'<text x="9" y="{_f(py(0.5))}" text-anchor="middle" class="tick" '
               f'transform="rotate(-90 9 {_f(py(0.5))})">accuracy</text>')
    out.append(f'<line x1="{_f(px(0))}" y1="{_f(py(0))}" x2="{_f(px(1))}" y2="{_f(py(1))}" class="diag"/>')
    if not isinstance(bins, list):
        out.append(_text(px(0.5), py(0.55), "n/a" if _unavailable(note) else DASH, anchor="middle", css="lab"))
        out.append("</svg>")
        return "".join(out)
    filled = [b for b in bins if isinstance(b, Mapping) and b.get("count")]
    largest = max((int(b["count"]) for b in filled), default=1)
    for b in filled:
        lo, hi = _number(b.get("lo")), _number(b.get("hi"))
        accuracy, confidence = _number(b.get("accuracy")), _number(b.get("mean_confidence"))
        if None in (lo, hi, accuracy, confidence):
            continue
        assert lo is not None and hi is not None and accuracy is not None and confidence is not None
        tip = (f"confidence {lo:.1f}-{hi:.1f}: {b['count']} cases, mean confidence {confidence:.3f}, "
               f"accuracy {accuracy:.3f}")
        radius = 2.5 + 4.0 * math.sqrt(int(b["count"]) / largest)
        out.append(f'<g><title>{_esc(tip)}</title><rect x="{_f(px(lo))}" y="{_f(py(accuracy))}" '
                   f'width="{_f((hi - lo) * size)}" height="{_f(accuracy * size)}" fill="{colour}" '
                   'fill-opacity="0.25" stroke="none"/>'
                   f'<circle cx="{_f(px(confidence))}" cy="{_f(py(accuracy))}" r="{_f(radius)}" fill="{colour}"/>'
                   "</g>")
    if not filled:
        out.append(_text(px(0.5), py(0.55), "no cases", anchor="middle", css="lab"))
    out.append("</svg>")
    return "".join(out)


_MATRIX_COLUMNS = ("A", "B", "C", "none")


def _confusion_svg(matrix: Any, label: str) -> str:
    cell, left, top = 30.0, 24.0, 18.0
    if not (isinstance(matrix, list) and matrix and all(isinstance(r, list) for r in matrix)):
        out = [_svg_open(left + cell * 4 + 4, top + cell * 3 + 4, label),
               _text(left + cell * 2, top + cell * 1.5, DASH, anchor="middle", css="lab"), "</svg>"]
        return "".join(out)
    n_rows = len(matrix)
    n_cols = max(len(r) for r in matrix)
    width, height = left + cell * n_cols + 4, top + cell * n_rows + 4
    out = [_svg_open(width, height, label)]
    row_names = ["A", "B", "C"] if n_rows == 3 else [str(i) for i in range(n_rows)]
    col_names = list(_MATRIX_COLUMNS) if n_cols == 4 else [str(i) for i in range(n_cols)]
    for j, name in enumerate(col_names):
        out.append(_text(left + cell * (j + 0.5), top - 5, name if name != "none" else "\u2205", anchor="middle",
                         css="tick"))
    for i, row in enumerate(matrix):
        out.append(_text(left - 6, top + cell * (i + 0.5) + 4, row_names[i], anchor="end", css="tick"))
        total = sum(int(v) for v in row if isinstance(v, (int, float))) or 1
        for j in range(n_cols):
            count = int(row[j]) if j < len(row) and isinstance(row[j], (int, float)) else 0
            share = count / total
            kind = ("none" if j >= n_rows else "hit" if i == j else "under" if j < i else "over")
            tip = f"reference {row_names[i]}, predicted {col_names[j]}: {count} of {total}"
            out.append(f'<g><title>{_esc(tip)}</title><rect x="{_f(left + cell * j)}" y="{_f(top + cell * i)}" '
                       f'width="{_f(cell - 2)}" height="{_f(cell - 2)}" class="cm {kind}" '
                       f'fill-opacity="{0.08 + 0.92 * share:.2f}"/>')
            css = "cmv dark" if share > 0.55 else "cmv"
            out.append(_text(left + cell * (j + 0.5) - 1, top + cell * (i + 0.5) + 4, str(count), anchor="middle",
                             css=css) + "</g>")
    out.append("</svg>")
    return "".join(out)


def _figure_grid(run: _Run, model: str, task: str, strata: list[str], kind: str) -> str:
    personas = run.personas_of(model, task)
    key = "reliability" if kind == "reliability" else "confusion_matrix"
    if not any(key in (row.get("figures") or {}) for (m, t, _, _), row in run.rows.items()
               if m == model and t == task):
        what = "reliability bins" if kind == "reliability" else "confusion matrices"
        return f'<p class="muted">This run\'s summary holds no {what} (it was written before they were recorded).</p>'
    head = "".join(f"<th>{_esc(_stratum_title(s))}</th>" for s in strata)
    body = []
    for persona in personas:
        cells = []
        for stratum in strata:
            row = run.rows.get((model, task, stratum, persona))
            figures = (row.get("figures") or {}) if row else {}
            label = f"{run.name(persona)}, {_stratum_title(stratum)}"
            if kind == "reliability":
                note = (row.get("notes") or {}).get("expected_calibration_error") if row else None
                ece = row["metrics"].get("expected_calibration_error") if row else None
                svg = _reliability_svg(figures.get("reliability"), run.colours.get(persona, _BASELINE_COLOUR),
                                       f"Reliability diagram: {label}", note)
                caption = f"ECE {_cell_text(ece, note, 'expected_calibration_error')}"
            else:
                svg = _confusion_svg(figures.get("confusion_matrix"), f"Confusion matrix: {label}")
                caption = f"n {row.get('n', DASH)}" if row else DASH
            cells.append(f'<td>{svg}<div class="cap">{_esc(caption)}</div></td>')
        body.append(f'<tr><th scope="row">{_esc(run.name(persona))}</th>{"".join(cells)}</tr>')
    return (f'<div class="table-wrap"><table class="figgrid"><thead><tr><th></th>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _section_figures(run: _Run) -> str:
    parts = ['<section id="figures"><h2>Figures</h2>']
    for model, task in run.model_tasks():
        strata = run.strata(model, task)
        metrics = run.metrics_of(model, task)
        parts.append(f"<h3>{_esc(task)} \u00b7 {_esc(model)}</h3>")
        parts.append("<h4>Difference from no persona, with confidence intervals</h4>")
        if run.has_comparisons:
            parts.append('<p class="muted">Filled dot: significant after adjustment; hollow: not significant. '
                         "Whiskers: the confidence interval of the paired difference.</p>")
            for metric in _DELTA_FIGURE_METRICS:
                if metric in metrics:
                    parts.append(f"<figure><figcaption>{_esc(_metric_title(metric))}</figcaption>"
                                 f"{_delta_figure(run, model, task, metric, strata)}</figure>")
        else:
            parts.append('<p class="muted">No paired comparisons in this run\'s summary.</p>')
        parts.append("<h4>Risk propensity and risk sensitivity by persona</h4>"
                     '<p class="muted">Dashed line: the no-persona value. Risk propensity: share of answers that '
                     "send the patient to emergency care. Risk sensitivity: of the wrong answers, the share that "
                     "err towards more urgent care.</p>")
        for metric in _PERSONA_FIGURE_METRICS:
            if metric in metrics:
                parts.append(f"<figure><figcaption>{_esc(_metric_title(metric))}</figcaption>"
                             f"{_persona_bars(run, model, task, metric, strata)}</figure>")
        parts.append("<h4>Reliability diagrams</h4>"
                     '<p class="muted">Accuracy against the model\'s confidence in its most likely answer, in '
                     "ten bins; dot size follows the number of cases; on the diagonal the model is calibrated."
                     "</p>")
        parts.append(_figure_grid(run, model, task, strata, "reliability"))
        parts.append("<h4>Confusion matrices</h4>"
                     '<p class="muted">Rows: reference level of care (A self-care, B primary care, C emergency); '
                     "columns: the answer given (\u2205 unreadable). "
                     '<span class="k hit">correct</span> <span class="k under">under-triage</span> '
                     '<span class="k over">over-triage</span> <span class="k none">unreadable</span>; '
                     "shade: share of the row.</p>")
        parts.append(_figure_grid(run, model, task, strata, "confusion"))
    parts.append("</section>")
    return "".join(parts)


# --- prompts, cases, metadata -------------------------------------------------------------------------

def _system_text(value: Any) -> str:
    if value is None:
        return "(no system message is sent)"
    if value == "":
        return "(an empty system message is sent)"
    return str(value)


def _section_prompts(run: _Run) -> str:
    parts = ['<section id="prompts"><h2>Prompts</h2>'
             '<p class="muted">The exact text each model received for the first case, per persona: the '
             "persona's system prompt, and the whole prompt as rendered by the model's chat template. "
             "The rest of the prompt is the same in every condition.</p>"]
    first: dict[tuple[str, str, str], Mapping[str, Any]] = {}
    for case in run.cases:
        first.setdefault((str(case.get("model")), str(case.get("task")), str(case.get("persona"))), case)
    if not first:
        parts.append('<p class="muted">No cases were recorded for this run.</p>')
    for model, task in _ordered_unique_pairs((m, t) for m, t, _ in first):
        parts.append(f"<h3>{_esc(task)} \u00b7 {_esc(model)}</h3>")
        for persona in [p for p in run.personas if (model, task, p) in first]:
            case = first[(model, task, persona)]
            declaration = (run.persona_info.get(persona) or {}).get("declaration")
            parts.append(
                f'<details class="prompt"><summary><strong>{_esc(run.name(persona))}</strong> '
                f'<span class="pid">{_esc(persona)}</span> \u2014 system prompt: '
                f"<q>{_esc(_system_text(case.get('system_prompt')))}</q></summary>"
                + (f'<p class="muted">Declaration: {_esc(declaration)}</p>' if declaration else "")
                + f'<p class="muted">Case {_esc(case.get("case_id"))}, template '
                f'{_esc(case.get("template_version", DASH))}</p><pre>{_esc(case.get("prompt"))}</pre></details>')
    parts.append("</section>")
    return "".join(parts)


def _ordered_unique_pairs(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return list(dict.fromkeys(pairs))


def _probabilities(probs: Any) -> list[str]:
    if not isinstance(probs, Mapping):
        return [DASH, DASH, DASH]
    return [f"{_number(probs.get(label)):.3f}" if _number(probs.get(label)) is not None else DASH
            for label in ("A", "B", "C")]


def _select(element_id: str, label: str, options: Sequence[tuple[str, str]]) -> str:
    items = '<option value="">all</option>' + "".join(
        f'<option value="{_esc(value)}">{_esc(text)}</option>' for value, text in options)
    return f'<label>{_esc(label)} <select id="{element_id}">{items}</select></label>'


def _section_cases(run: _Run) -> str:
    baseline_label: dict[tuple[str, str, str], Any] = {}
    for case in run.cases:
        if case.get("persona") == "no_persona":
            baseline_label[(str(case.get("model")), str(case.get("task")), str(case.get("case_id")))] = \
                case.get("generated_label")
    models = _ordered_unique(str(c.get("model")) for c in run.cases)
    strata = _ordered_unique(str(c.get("stratum")) for c in run.cases)
    personas = [p for p in run.personas if any(c.get("persona") == p for c in run.cases)]
    rows = []
    disagreements = 0
    for case in run.cases:
        model, task, case_id = str(case.get("model")), str(case.get("task")), str(case.get("case_id"))
        persona = str(case.get("persona"))
        key = (model, task, case_id)
        has_baseline = key in baseline_label
        generated = case.get("generated_label")
        disagrees = persona != "no_persona" and has_baseline and generated != baseline_label[key]
        disagreements += disagrees
        correct = generated is not None and generated == case.get("reference")
        probs = _probabilities(case.get("label_probs"))
        source = case.get("probs_source") or DASH
        if case.get("probs_flagged"):
            source = f"{source} (a label was outside the top-k; floor value used)"
        wrong_mark = "" if correct else " \u2717"
        base_text = (baseline_label[key] or "none") if has_baseline else DASH
        if persona == "no_persona":
            base_text = "(baseline)"
        rows.append(
            f'<tr data-model="{_esc(model)}" data-stratum="{_esc(case.get("stratum"))}" '
            f'data-persona="{_esc(persona)}" data-disagree="{1 if disagrees else 0}" '
            f'class="{"right" if correct else "wrong"}{" disagree" if disagrees else ""}">'
            f"<td>{_esc(case_id)}</td>"
            + (f"<td>{_esc(model)}</td>" if len(models) > 1 else "")
            + f"<td>{_esc(run.name(persona))}</td><td>{_esc(_stratum_title(str(case.get('stratum'))))}</td>"
            f'<td class="lbl">{_esc(case.get("reference"))}</td>'
            f'<td class="lbl answer">{_esc(generated if generated is not None else "none")}{wrong_mark}</td>'
            f'<td class="lbl">{_esc(case.get("logit_label") or DASH)}</td>'
            + "".join(f'<td class="num">{_esc(p)}</td>' for p in probs)
            + f"<td>{_esc(source)}</td>"
            f'<td class="lbl">{_esc(base_text)}</td>'
            f'<td class="gen"><pre>{_esc(case.get("generated_text"))}</pre></td></tr>')
    controls = ['<div class="controls" id="case-filters">']
    if len(models) > 1:
        controls.append(_select("f-model", "Model", [(m, m) for m in models]))
    controls.append(_select("f-stratum", "Stratum", [(s, _stratum_title(s)) for s in strata]))
    controls.append(_select("f-persona", "Persona", [(p, run.name(p)) for p in personas]))
    controls.append('<label><input type="checkbox" id="f-disagree"> only answers that differ from no '
                    "persona's on the same case</label>")
    controls.append('<label><input type="checkbox" id="f-wrong"> only wrong answers</label>')
    controls.append("</div>")
    total = len(run.cases)
    head = ("<th>Case</th>" + ("<th>Model</th>" if len(models) > 1 else "")
            + "<th>Persona</th><th>Stratum</th><th>Reference</th><th>Answer (parsed)</th><th>Most likely "
            "(logits)</th><th>P(A)</th><th>P(B)</th><th>P(C)</th><th>Probabilities from</th>"
            "<th>No persona's answer</th><th>Generated text</th>")
    return (f'<section id="cases"><h2>Cases</h2><p class="muted">Every answer of every persona. '
            f"{disagreements} answers differ from no persona's answer on the same case. Probabilities are the "
            "model's distribution over A/B/C where it wrote its answer (\u201canswer\u201d), or at the end of "
            "the prompt when no answer could be read (\u201cprompt\u201d).</p>"
            + "".join(controls)
            + f'<p id="case-count" class="count">Showing {total} of {total} answers</p>'
            f'<div class="table-wrap"><table id="case-table" class="cases"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div></section>')


def _kv_table(pairs: Sequence[tuple[str, Any]]) -> str:
    rows = "".join(f'<tr><th scope="row">{_esc(k)}</th><td>{_value_html(v)}</td></tr>' for k, v in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def _value_html(value: Any) -> str:
    if isinstance(value, Mapping):
        return _kv_table([(str(k), v) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return _esc(", ".join(str(v) for v in value)) if value else DASH
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"<code>{_esc(value)}</code>"


def _duration(seconds: Any) -> str:
    number = _number(seconds)
    if number is None:
        return DASH
    minutes, rest = divmod(number, 60)
    return f"{int(minutes)} min {rest:.0f} s" if minutes else f"{rest:.1f} s"


def _section_metadata(run: _Run) -> str:
    metadata = dict(run.summary.get("metadata") or {})
    parts = ['<section id="metadata"><h2>Run metadata</h2>']
    general: list[tuple[str, Any]] = [("run id", run.summary.get("run_id")), ("created", run.summary.get("created"))]
    general.append(("git revision", metadata.pop("git_revision", None) or "unknown (not a git checkout)"))
    if "seed" in metadata:
        general.append(("seed", metadata.pop("seed")))
    general.append(("duration", _duration(metadata.pop("duration_seconds", None))))
    for key, label in (("inference_seconds", "inference time"), ("model_seconds", "time in the model")):
        if key in metadata:
            general.append((label, _duration(metadata.pop(key))))
    cache = metadata.pop("cache", None)
    if isinstance(cache, Mapping):
        general.append(("cache", f"{cache.get('hits', DASH)} of {cache.get('requests', DASH)} requests answered "
                                  f"from the cache ({'enabled' if cache.get('enabled') else 'disabled'})"))
    elif cache is not None:
        general.append(("cache", cache))
    if "models_loaded" in metadata:
        general.append(("models loaded", metadata.pop("models_loaded") or "none (all answers cached)"))
    if "cases_file" in metadata:
        general.append(("cases file", metadata.pop("cases_file")))
    parts.append(_kv_table(general))
    models = metadata.pop("models", None)
    if isinstance(models, Mapping) and models:
        keys = _ordered_unique(k for identity in models.values() if isinstance(identity, Mapping) for k in identity)
        head = "<th>name</th>" + "".join(f"<th>{_esc(k)}</th>" for k in keys)
        body = "".join(
            f"<tr><td><code>{_esc(name)}</code></td>"
            + "".join(f"<td>{_value_html(identity.get(k)) if isinstance(identity, Mapping) else DASH}</td>"
                      for k in keys) + "</tr>"
            for name, identity in models.items())
        parts.append(f'<h3>Models</h3><div class="table-wrap"><table class="kv wide"><thead><tr>{head}</tr></thead>'
                     f"<tbody>{body}</tbody></table></div>")
    blocks = []
    for key, title in (("datasets", "Datasets"), ("thresholds", "Thresholds"), ("templates", "Prompt templates"),
                       ("decoding", "Decoding"), ("packages", "Package versions")):
        if key not in metadata:
            continue
        value = metadata.pop(key)
        pairs = list(value.items()) if isinstance(value, Mapping) else [(key, value)]
        blocks.append(f"<div><h3>{title}</h3>{_kv_table(pairs)}</div>")
    settings = run.summary.get("comparison_settings")
    if isinstance(settings, Mapping):
        blocks.append(f"<div><h3>Paired comparisons</h3>{_kv_table(list(settings.items()))}</div>")
    if metadata:
        blocks.append(f"<div><h3>Other</h3>{_kv_table(list(metadata.items()))}</div>")
    parts.append(f'<div class="meta">{"".join(blocks)}</div></section>')
    return "".join(parts)


def _approved_rows(run: _Run, comparisons: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for c in comparisons:
        metric = str(c.get("metric"))
        delta = _number(c.get("delta"))
        direction = _direction(metric, delta) if delta is not None else "changed"
        significant = bool(c.get("significant"))
        low, high = _number(c.get("ci_low")), _number(c.get("ci_high"))
        interval = (f"[{_fmt(metric, low, signed=True)}, {_fmt(metric, high, signed=True)}]"
                    if low is not None and high is not None else DASH)
        model = str(c.get("model"))
        if c.get("baseline_model") not in (None, model):
            model = f"{c.get('baseline_model')} \u2192 {model}"
        rows.append(
            f'<tr class="{direction + " sig" if significant else ""}"><td>{_esc(model)}</td>'
            f'<td>{_esc(c.get("task"))}</td><td>{_esc(_stratum_title(str(c.get("stratum"))))}</td>'
            f"<td>{_esc(run.name(str(c.get('persona'))))}</td><td>{_esc(_metric_title(metric))}</td>"
            f'<td class="num">{_esc(_fmt(metric, c.get("baseline_value")))}</td>'
            f'<td class="num">{_esc(_fmt(metric, c.get("value")))}</td>'
            f'<td class="num">{_esc(_fmt(metric, delta, signed=True))}</td><td class="num">{_esc(interval)}</td>'
            f'<td class="num">{_esc(_fmt_p(c.get("pvalue_adjusted")))}</td>'
            f'<td>{"*" if significant else ""}</td><td>{_esc(c.get("test"))}</td>'
            f'<td>{_esc(c.get("n", DASH))}</td><td>{_esc(c.get("note") or "")}</td></tr>')
    return ('<div class="table-wrap"><table class="kv wide"><thead><tr><th>model (approved \u2192 candidate)</th>'
            "<th>task</th><th>stratum</th><th>persona</th><th>metric</th><th>approved</th><th>candidate</th>"
            "<th>\u0394</th><th>interval</th><th>adjusted p</th><th>sig.</th><th>test</th><th>n</th><th>note</th>"
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def _section_baseline_run(run: _Run) -> str:
    """The candidate against an approved run (--pe-baseline): what was compared, then the differences."""
    baseline = run.summary.get("baseline_comparison")
    if not baseline:
        return ""
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
        parts.append(_kv_table(list(approved.items())))
    if error:
        parts.append(f'<p class="bad"><strong>Not compared:</strong> {_esc(error)}</p>')
    significant = [c for c in comparisons if c.get("significant")]
    if comparisons:
        parts.append(f"<h3>Significant differences from the approved run ({len(significant)} of "
                     f"{len(comparisons)} comparisons)</h3>")
        parts.append(_approved_rows(run, significant) if significant
                     else "<p>None: no difference is significant after adjustment.</p>")
        parts.append(f"<details><summary>All {len(comparisons)} comparisons</summary>"
                     f"{_approved_rows(run, comparisons)}</details>")
    if skipped:
        listed = "".join(f"<li>{_esc(m)}</li>" for m in skipped)
        parts.append(f"<details><summary>Not compared ({len(skipped)})</summary><ul>{listed}</ul></details>")
    parts.append("</section>")
    return "".join(parts)


# --- the page -----------------------------------------------------------------------------------------

_CSS = """
:root{color-scheme:light;--fg:#1b1f24;--muted:#5b6470;--line:#d7dce2;--bg:#fff;--soft:#f5f7f9;
--bad:#b3261e;--badbg:#fdecea;--good:#1e7b34;--goodbg:#e8f5ec;--warn:#8a5300;--chg:#2b5d9b}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
color:var(--fg);background:var(--bg)}
header.top{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid var(--line);
padding:8px 24px;display:flex;gap:18px;align-items:baseline;flex-wrap:wrap}
header.top h1{font-size:16px;margin:0}
header.top nav a{margin-right:12px;color:var(--chg);text-decoration:none}
main{max-width:1280px;margin:0 auto;padding:12px 24px 48px}
h2{font-size:20px;margin:28px 0 8px;border-bottom:2px solid var(--line);padding-bottom:4px}
h3{font-size:16px;margin:20px 0 6px}h4{font-size:14px;margin:16px 0 4px}
.muted,.pid{color:var(--muted)}.pid{font-size:11px;margin-left:6px;font-weight:normal}
table.metrics .pid{display:block;margin-left:16px}
.verdict{border-radius:8px;padding:12px 18px;margin-top:16px;border:2px solid}
.verdict.passed{background:var(--goodbg);border-color:var(--good)}
.verdict.failed{background:var(--badbg);border-color:var(--bad)}
.verdict h2{border:0;margin:4px 0;font-size:22px}
.badge{display:inline-block;padding:2px 10px;border-radius:4px;color:#fff;margin-right:8px;font-size:16px;
vertical-align:2px}
.passed .badge{background:var(--good)}.failed .badge{background:var(--bad)}
.verdict .lead{font-size:15px}.verdict ul{margin:4px 0 8px;padding-left:22px}
ul.blocking li{color:var(--bad)}h3.blocking{color:var(--bad)}
ul.checks{font-size:12px}ul.checks li.fail{color:var(--bad)}ul.checks li.skipped{color:var(--muted)}
.ok{color:var(--good)}.bad{color:var(--bad)}
ul.effects li.worse{color:var(--bad)}ul.effects li.better{color:var(--good)}ul.effects li.changed{color:var(--chg)}
.table-wrap{overflow-x:auto;margin:6px 0 14px}
table{border-collapse:collapse}
table.metrics{font-size:13px;min-width:100%}
table.metrics caption{text-align:left;font-weight:600;padding:4px 0}
table.metrics th,table.metrics td{border:1px solid var(--line);padding:4px 6px;vertical-align:top}
table.metrics thead th{background:var(--soft);font-weight:600;font-size:12px;text-align:center}
table.metrics tbody th{text-align:left;white-space:nowrap;background:var(--soft)}
table.metrics td{text-align:right;white-space:nowrap}
td .v{display:block;font-weight:600;font-variant-numeric:tabular-nums}
td.na .v,td.undef .v{color:var(--muted);font-weight:normal}
.d{display:block;font-size:11px;color:var(--muted);font-variant-numeric:tabular-nums;line-height:1.3}
.d .dv,.d .ci{display:block}.d .p{font-size:10px}
body:not([data-baseline=helpful_assistant]) .d[data-b=helpful_assistant]{display:none}
body[data-baseline=helpful_assistant] .d[data-b=no_persona]{display:none}
.sig.worse,.worse.sig{color:var(--bad);font-weight:600}.sig.better,.better.sig{color:var(--good);font-weight:600}
.sig.changed,.changed.sig{color:var(--chg);font-weight:600}
.mark{margin-left:1px}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px}
ul.notes{font-size:12px;color:var(--muted);margin:2px 0 0;padding-left:18px}
.controls{display:flex;gap:16px;flex-wrap:wrap;align-items:center;margin:8px 0}
.controls select{font:inherit;padding:2px 4px}
dl.legend dt{font-weight:600;margin-top:4px}dl.legend dd{margin-left:16px}
figure{margin:8px 0 18px}figcaption{font-size:13px;font-weight:600;margin-bottom:2px}
svg.fig{max-width:100%;height:auto;font-family:inherit}
svg .lab{font-size:12px;fill:var(--fg)}svg .ptitle{font-size:12px;font-weight:600;fill:var(--fg)}
svg .tick,svg .hint{font-size:10px;fill:var(--muted)}svg .val{font-size:10px;fill:var(--fg)}
svg .panel{fill:#fafbfc;stroke:var(--line)}svg .grid{stroke:#e6e9ed}
svg .zero{stroke:#777;stroke-dasharray:3 2}svg .ref{stroke:#222;stroke-dasharray:4 3;stroke-width:1.5}
svg .diag{stroke:#999;stroke-dasharray:4 3}
svg .cm.hit,.k.hit{fill:#2f6db5;background:#2f6db5}svg .cm.under,.k.under{fill:#c62828;background:#c62828}
svg .cm.over,.k.over{fill:#e08a00;background:#e08a00}svg .cm.none,.k.none{fill:#777;background:#777}
.k{color:#fff;padding:0 4px;border-radius:3px;font-size:11px}
svg .cmv{font-size:11px;fill:#1b1f24}svg .cmv.dark{fill:#fff}
table.figgrid th{font-size:12px;padding:2px 8px;text-align:left;vertical-align:middle}
table.figgrid td{padding:2px 8px;text-align:center}.cap{font-size:11px;color:var(--muted)}
details.prompt{border:1px solid var(--line);border-radius:6px;padding:6px 10px;margin:6px 0}
details.prompt summary{cursor:pointer}
pre{white-space:pre-wrap;word-break:break-word;background:var(--soft);padding:8px;border-radius:4px;
font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;margin:4px 0}
table.cases{font-size:12px;width:100%}
table.cases th,table.cases td{border-bottom:1px solid var(--line);padding:3px 6px;text-align:left;vertical-align:top}
table.cases thead th{background:var(--soft);position:sticky;top:0}
table.cases td.lbl{font-weight:600;text-align:center}table.cases td.num{text-align:right;
font-variant-numeric:tabular-nums}
table.cases tr.wrong td.answer{color:var(--bad)}
table.cases tr.disagree{background:#fff7e0}
table.cases td.gen pre{margin:0;padding:2px 4px;max-width:420px}
.count{font-weight:600}
table.kv{font-size:12px;margin:4px 0}
table.kv th,table.kv td{border:1px solid var(--line);padding:3px 8px;text-align:left;vertical-align:top}
table.kv th{background:var(--soft);font-weight:600}
table.kv table.kv{margin:0}
code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;overflow-wrap:break-word}
.meta{display:flex;flex-wrap:wrap;gap:4px 32px;align-items:flex-start}.meta>div{max-width:100%}
@media print{header.top{position:static}.controls{display:none}}
"""

_SCRIPT = """
(function () {
  "use strict";
  var body = document.body;
  var baseline = document.getElementById("baseline-select");
  if (baseline) {
    baseline.addEventListener("change", function () { body.setAttribute("data-baseline", baseline.value); });
  }
  var table = document.getElementById("case-table");
  var count = document.getElementById("case-count");
  if (!table || !count) { return; }
  var rows = Array.prototype.slice.call(table.tBodies[0].rows);
  var pick = function (id) { return document.getElementById(id); };
  var model = pick("f-model"), stratum = pick("f-stratum"), persona = pick("f-persona");
  var disagree = pick("f-disagree"), wrong = pick("f-wrong");
  var matches = function (select, value) { return !select || !select.value || select.value === value; };
  function apply() {
    var shown = 0;
    rows.forEach(function (row) {
      var keep = matches(model, row.getAttribute("data-model")) &&
        matches(stratum, row.getAttribute("data-stratum")) &&
        matches(persona, row.getAttribute("data-persona")) &&
        (!disagree || !disagree.checked || row.getAttribute("data-disagree") === "1") &&
        (!wrong || !wrong.checked || row.classList.contains("wrong"));
      row.hidden = !keep;
      if (keep) { shown += 1; }
    });
    count.textContent = "Showing " + shown + " of " + rows.length + " answers";
  }
  [model, stratum, persona, disagree, wrong].forEach(function (control) {
    if (control) { control.addEventListener("change", apply); }
  });
  apply();
})();
"""


def _csp() -> str:
    digest = base64.b64encode(hashlib.sha256(_SCRIPT.encode("utf-8")).digest()).decode("ascii")
    return (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; img-src data:; "
            "base-uri 'none'; form-action 'none'")


def render_report(summary: Mapping[str, Any], cases: Sequence[Mapping[str, Any]]) -> str:
    """The report page of a run: summary.json's document and cases.jsonl's records in, HTML out.

    Deterministic: the same inputs give the same bytes. Tolerates summaries without ``comparisons``
    or ``baseline_comparison`` and results without ``figures`` (older runs).
    """
    run = _Run(summary, cases)
    verdict = summary.get("verdict") or {}
    state = "PASSED" if verdict.get("passed") else "FAILED"
    run_id = summary.get("run_id") or "run"
    nav = ('<nav><a href="#verdict">Verdict</a><a href="#tables">Tables</a><a href="#figures">Figures</a>'
           + ('<a href="#baseline-run">Approved baseline</a>' if summary.get("baseline_comparison") else "")
           + '<a href="#prompts">Prompts</a><a href="#cases">Cases</a><a href="#metadata">Metadata</a></nav>')
    page = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_esc(_csp())}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        '<link rel="icon" href="data:,">',
        f"<title>{state} \u00b7 persona-eval {_esc(run_id)}</title>",
        f"<style>{_CSS}</style></head>",
        '<body data-baseline="no_persona">',
        f'<header class="top"><h1>persona-eval \u00b7 run <code>{_esc(run_id)}</code></h1>{nav}</header>',
        "<main>",
        _section_verdict(run),
        _section_tables(run),
        _section_figures(run),
        _section_baseline_run(run),
        _section_prompts(run),
        _section_cases(run),
        _section_metadata(run),
        "</main>",
        f"<script>{_SCRIPT}</script>",
        "</body></html>",
    ]
    return "\n".join(part for part in page if part) + "\n"


def write_report(run_dir: Path) -> Path:
    """Write run_dir/report.html from run_dir/summary.json and its cases file; returns the path.

    Reads only what the run wrote; calls no model. A run without a cases file still gets a report
    (without prompts and cases)."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    cases_name = (summary.get("metadata") or {}).get("cases_file") or "cases.jsonl"
    cases_path = run_dir / cases_name
    cases = read_jsonl(cases_path) if cases_path.is_file() else []
    target = run_dir / REPORT_FILENAME
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    staging.write_text(render_report(summary, cases), encoding="utf-8")
    os.replace(staging, target)
    return target


def pytest_html_summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """HTML snippets (escaped) with the run's verdict, for pytest-html's summary section."""
    verdict = summary.get("verdict") or {}
    passed = bool(verdict.get("passed"))
    colour = "#1e7b34" if passed else "#b3261e"
    lines = [f'<p class="persona-eval-verdict"><strong style="color:{colour}">persona-eval verdict: '
             f'{"PASSED" if passed else "FAILED"}</strong> \u2014 {_esc(_verdict_sentence(verdict))}</p>']
    blocking = list(verdict.get("blocking") or [])
    if blocking:
        lines.append("<ul>" + "".join(f"<li>{_esc(message)}</li>" for message in blocking) + "</ul>")
    recorded = list(verdict.get("recorded") or [])
    if recorded:
        lines.append(f"<p>Record-only bounds crossed ({len(recorded)}):</p>"
                     + "<ul>" + "".join(f"<li>{_esc(message)}</li>" for message in recorded) + "</ul>")
    baseline = summary.get("baseline_comparison")
    baseline_verdict = baseline.get("verdict") if isinstance(baseline, Mapping) else None
    if isinstance(baseline_verdict, Mapping):
        ok = bool(baseline_verdict.get("passed"))
        lines.append(f"<p>Against the approved baseline run: "
                     f"{'no significant regression' if ok else 'regressions found'}.</p>")
    run_id = summary.get("run_id")
    if run_id:
        lines.append(f"<p>Full report: <code>reports/{_esc(run_id)}/{REPORT_FILENAME}</code></p>")
    return lines
