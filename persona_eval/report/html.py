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
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from persona_eval.errors import DataError
from persona_eval.metrics import METRICS
from persona_eval.results import read_json, read_jsonl, write_text

__all__ = ["REPORT_FILENAME", "REVIEW_FILENAME", "pytest_html_summary_lines", "render_report", "write_report"]

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
    "too_long_rate": "Too long for the model",
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
        # The patient-safety task's response records are shown by its own section, not the triage drill-down.
        self.cases = [c for c in cases if c.get("task") != "safety"]
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


_STATE_WORDS = {"passed": "PASSED", "failed": "FAILED", "not_checked": "NOT CHECKED"}


def _verdict_state(verdict: Mapping[str, Any]) -> str:
    """"passed", "failed" or "not_checked" (runs written before the not-checked verdict have no status)."""
    status = verdict.get("status")
    if status in _STATE_WORDS:
        return str(status)
    return "passed" if verdict.get("passed") else "failed"


def _not_checked_items(verdict: Mapping[str, Any]) -> list[str]:
    return [f"{entry.get('message')} To check it: {entry.get('how_to_check')}"
            for entry in verdict.get("not_checked") or [] if isinstance(entry, Mapping)]


def _verdict_sentence(verdict: Mapping[str, Any]) -> str:
    blocking = list(verdict.get("blocking") or [])
    recorded = list(verdict.get("recorded") or [])
    checked = verdict.get("checked")
    checked_text = f"{checked} bounds checked" if isinstance(checked, int) else "bounds checked"
    rules = verdict.get("regressions_checked")
    if isinstance(rules, int):
        checked_text += f", {rules} persona-safety regression check{'s' if rules != 1 else ''}"
    not_checked = list(verdict.get("not_checked") or [])
    if _verdict_state(verdict) == "not_checked":
        allowed = " The session was allowed to pass (--pe-allow-unchecked)." if verdict.get("passed") else ""
        return (f"Nothing blocking was crossed ({checked_text}), but {len(not_checked)} fail "
                f"rule{'s' if len(not_checked) != 1 else ''} or bound{'s' if len(not_checked) != 1 else ''} could "
                f"not be checked, so the gate cannot pass.{allowed}")
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


def _section_verdict(run: _Run, *, triage: bool = True) -> str:
    verdict = run.summary.get("verdict") or {}
    state = _verdict_state(verdict)
    # Not checked is shown as a failure: the gate did not pass.
    css_state = "passed" if state == "passed" else "failed"
    heading = {"passed": "Deployment gate passed", "failed": "Deployment gate failed",
               "not_checked": "Deployment gate not checked"}[state]
    parts = [f'<section id="verdict" class="verdict {css_state}">',
             f'<h2><span class="badge">{_STATE_WORDS[state]}</span> {heading}</h2>',
             f'<p class="lead">{_esc(_verdict_sentence(verdict))}</p>',
             _messages("Blocking bounds crossed", verdict.get("blocking") or [], "blocking"),
             _messages("Fail rules and bounds not checked (the gate cannot pass on them)",
                       _not_checked_items(verdict), "blocking"),
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
    if not triage:
        pass  # a patient-safety-only run: no triage comparisons to speak of
    elif run.has_comparisons:
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
            f"for accuracy and consistency (exact binomial below 25 discordant pairs, continuity-corrected "
            f"chi-square from 25), paired bootstrap otherwise, adjusted by "
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
            f'<td class="gen"><pre>{_esc(case.get("generated_text"))}</pre>'
            + ('<p class="muted">a secret in this answer was masked</p>' if case.get("secrets_masked") else "")
            + "</td></tr>")
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
    changes = metadata.pop("identity_changes", None)
    if isinstance(changes, Mapping) and changes:
        listed = "".join(f"<li>{_esc(message)}</li>" for message in changes.values())
        parts.append(f'<h3>Model changes</h3><ul class="blocking">{listed}</ul>')
    sent = metadata.pop("decoding_sent", None)
    if isinstance(sent, Mapping) and sent:
        rows = []
        for name, tasks in sent.items():
            for task, record in (tasks.items() if isinstance(tasks, Mapping) else []):
                if not isinstance(record, Mapping):
                    continue
                shown = ", ".join(f"{_esc(k)} {_value_html(v)}" for k, v in record.items()
                                  if k != "dropped" and v is not None)
                dropped = record.get("dropped") or {}
                refused = "; ".join(f"{_esc(k)} refused by the server ({_esc(v)}), not sent"
                                    for k, v in dropped.items()) if isinstance(dropped, Mapping) else ""
                rows.append(f"<tr><td><code>{_esc(name)}</code></td><td>{_esc(task)}</td><td>{shown}</td>"
                            f'<td class="{"bad" if refused else ""}">{refused or "none"}</td></tr>')
        parts.append('<h3>Decoding sent</h3><div class="table-wrap"><table class="kv wide"><thead><tr><th>model</th>'
                     "<th>task</th><th>sent</th><th>dropped</th></tr></thead><tbody>" + "".join(rows)
                     + "</tbody></table></div>")
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


# --- patient safety: the LLM-judge panel --------------------------------------------------------------

REVIEW_FILENAME = "review_results.json"
POOLED = "pooled"  # summary["safety"]'s key of statistics pooled over judges (persona_eval.judges.POOLED)
ALL_CATEGORIES = "all"  # its key of statistics over every category (persona_eval.judges.ALL)
CRITERION_TITLE = {"safety": "Safety", "helpfulness": "Helpfulness", "factual_accuracy": "Factual accuracy",
                   "justification": "Clinical justification"}
GROUP_TITLE = {"medical": "medical", "non_medical": "non-medical", "baseline": "baseline"}
# Medical personas blue, non-medical orange (Okabe-Ito), the baseline dark grey; the group is written out too,
# so that nothing rests on colour alone.
_GROUP_COLOUR = {"medical": "#0072B2", "non_medical": "#E69F00", "baseline": _BASELINE_COLOUR}
_OTHER_GROUP_COLOUR = "#999999"
# Heatmap cells: ranked above no persona shades to blue, below to vermillion, white at no difference.
_HEAT_ABOVE = (0x00, 0x72, 0xB2)
_HEAT_BELOW = (0xD5, 0x5E, 0x00)
# The significance level of the judge-panel tests (summary["safety"]["alpha"] overrides it).
_ALPHA = 0.05


def _at(value: Any, *keys: str) -> Any:
    """value[k1][k2]... or None where a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _share(value: Any, digits: int = 0) -> str:
    number = _number(value)
    return DASH if number is None else f"{number * 100:.{digits}f}%"


def _criterion_title(criterion: str) -> str:
    return CRITERION_TITLE.get(criterion, criterion.replace("_", " ").capitalize())


class _Safety:
    """summary["safety"] as persona_eval.safety_eval.safety_summary writes it, read defensively: any piece
    may be missing (an older or partial run), and then the page says so instead of failing."""

    def __init__(self, run: _Run, block: Mapping[str, Any]) -> None:
        self.run = run
        self.block = block
        self.mrr = _mapping(block.get("mrr"))
        self.tests = _mapping(block.get("tests"))
        self.agreement = _mapping(block.get("agreement"))
        self.invalid = _mapping(block.get("invalid"))
        self.templates = _mapping(block.get("templates"))
        self.categories = {str(k): str(v) for k, v in _mapping(block.get("categories")).items()}
        self.groups = {str(p): str(info["group"]) for p, info in run.persona_info.items() if info.get("group")}
        self.groups.update({str(k): str(v) for k, v in _mapping(block.get("persona_groups")).items()})
        listed = block.get("personas")
        self.persona_order = [str(p) for p in listed] if isinstance(listed, list) else list(run.personas)
        alpha = _number(block.get("alpha"))
        self.alpha = alpha if alpha is not None else _ALPHA

    def models(self) -> list[str]:
        listed = self.block.get("models")
        named = [str(m) for m in listed if m is not None] if isinstance(listed, list) else []
        return _ordered_unique([*named, *self.mrr, *self.agreement])

    def criteria(self, model: str) -> list[str]:
        present = _ordered_unique([*_mapping(self.mrr.get(model)), *_mapping(self.agreement.get(model))])
        listed = self.block.get("criteria")
        order = [str(c) for c in listed] if isinstance(listed, list) else []
        return [c for c in order if c in present] + [c for c in present if c not in order]

    def personas(self, model: str, criterion: str) -> list[str]:
        seen: list[str] = []
        for categories in _mapping(_at(self.mrr, model, criterion)).values():
            for cell in _mapping(categories).values():
                seen.extend(str(p) for p in _mapping(cell))
        seen = _ordered_unique(seen)
        return [p for p in self.persona_order if p in seen] + [p for p in seen if p not in self.persona_order]

    def judges(self, model: str, criterion: str) -> list[str]:
        return [str(j) for j in _mapping(_at(self.mrr, model, criterion)) if j != POOLED]

    def category_keys(self, model: str, criterion: str) -> list[str]:
        found = _ordered_unique([*_mapping(_at(self.mrr, model, criterion, POOLED)),
                                 *_mapping(_at(self.agreement, model, criterion))])
        return sorted(found, key=lambda c: (c != ALL_CATEGORIES, found.index(c)))

    def value(self, model: str, criterion: str, judge: str, category: str, persona: str
              ) -> tuple[float | None, Any]:
        cell = _at(self.mrr, model, criterion, judge, category, persona)
        return _number(_at(cell, "mrr")), _at(cell, "n")

    def test(self, model: str, criterion: str, judge: str, category: str, baseline: str, persona: str
             ) -> Mapping[str, Any] | None:
        found = _at(self.tests, model, criterion, judge, category, baseline, persona)
        return found if isinstance(found, Mapping) else None

    def significant(self, test: Mapping[str, Any] | None) -> bool:
        pvalue = _number(test.get("pvalue_holm")) if test else None
        return pvalue is not None and pvalue < self.alpha

    def group(self, persona: str) -> str:
        return self.groups.get(persona, "")

    def group_title(self, persona: str) -> str:
        group = self.group(persona)
        return GROUP_TITLE.get(group, group.replace("_", " ") or "group unknown")

    def colour(self, persona: str) -> str:
        return _GROUP_COLOUR.get(self.group(persona), _OTHER_GROUP_COLOUR)

    def category_title(self, category: str) -> str:
        if category == ALL_CATEGORIES:
            return "All categories"
        name = self.categories.get(category)
        return f"{category} \u00b7 {name}" if name else f"Category {category}"


def _test_text(safety: _Safety, test: Mapping[str, Any] | None, baseline: str) -> str:
    """A paired test against `baseline` in words, for a tooltip."""
    if test is None:
        return f"no paired test against {BASELINE_TITLE.get(baseline, baseline)}"
    significant = safety.significant(test)
    return (f"vs {BASELINE_TITLE.get(baseline, baseline)}: mean difference of per-query reciprocal ranks "
            f"{_fmt('mrr', test.get('mean_difference'), signed=True)}, t {_fmt('mrr', test.get('statistic'))}, "
            f"p {_fmt_p(test.get('pvalue'))}, Holm-adjusted p {_fmt_p(test.get('pvalue_holm'))}"
            f"{' (significant)' if significant else ''}; {test.get('method') or 'test not named'}; "
            f"n {test.get('n', DASH)} queries")


def _mean_pairwise_kappa(agreement: Mapping[str, Any]) -> float | None:
    pairs = agreement.get("pairwise_kappa")
    values = [_number(p.get("kappa")) for p in pairs if isinstance(p, Mapping)] if isinstance(pairs, list) else []
    defined = [v for v in values if v is not None]
    return math.fsum(defined) / len(defined) if defined else None


def _pairwise_title(agreement: Mapping[str, Any]) -> str:
    pairs = agreement.get("pairwise_kappa")
    texts = []
    for pair in pairs if isinstance(pairs, list) else []:
        if isinstance(pair, Mapping):
            judges = pair.get("judges")
            names = " vs ".join(str(j) for j in judges) if isinstance(judges, list) else DASH
            texts.append(f"{names}: Cohen's \u03ba {_fmt('kappa', pair.get('kappa'))} (n {pair.get('n', DASH)})")
    return "; ".join(texts) or "no pair of judges"


def _agreement_sentence(agreement: Any) -> str:
    """The judges' agreement on the top-ranked persona, in words (with the reason when not computable)."""
    if not isinstance(agreement, Mapping):
        return "Agreement between the judges: not recorded in this run's summary."
    note = agreement.get("note")
    head = (f"Agreement of the {agreement.get('n_judges', DASH)} judges on the top-ranked persona "
            f"({agreement.get('n_all_valid', DASH)} of {agreement.get('n_queries', DASH)} queries ranked validly "
            "by every judge)")
    if _number(agreement.get("majority_agreement")) is None:
        return f"{head}: not computable: {note or 'no reason recorded'}."
    fleiss = _number(_at(agreement, "fleiss_kappa", "kappa"))
    text = (f"{head}: majority agreement {_share(agreement.get('majority_agreement'))}, unanimous "
            f"{_share(agreement.get('unanimous'))}, Fleiss' \u03ba {_fmt('kappa', fleiss)}, mean pairwise Cohen's "
            f"\u03ba {_fmt('kappa', _mean_pairwise_kappa(agreement))} ({_pairwise_title(agreement)})")
    return text + (f"; {note}." if note else ".")


def _agreement_cells(agreement: Any) -> str:
    """Majority agreement, Fleiss' kappa, mean pairwise kappa, queries and note, as table cells."""
    if not isinstance(agreement, Mapping):
        return f'<td class="undef">{DASH}</td>' * 4 + "<td>not recorded</td>"
    fleiss = _number(_at(agreement, "fleiss_kappa", "kappa"))
    note = agreement.get("note")
    note_text = (f"not computable: {note}" if note and _number(agreement.get("majority_agreement")) is None
                 else note or "")
    return (f'<td title="unanimous: {_esc(_share(agreement.get("unanimous")))}">'
            f'{_esc(_share(agreement.get("majority_agreement")))}</td>'
            f"<td>{_esc(_fmt('kappa', fleiss))}</td>"
            f'<td title="{_esc(_pairwise_title(agreement))}">{_esc(_fmt("kappa", _mean_pairwise_kappa(agreement)))}'
            f"</td><td>{_esc(agreement.get('n_all_valid', DASH))} of {_esc(agreement.get('n_queries', DASH))}</td>"
            f'<td class="note">{_esc(note_text)}</td>')


def _mrr_bars(safety: _Safety, model: str, criterion: str, personas: list[str]) -> str:
    """Pooled MRR per persona over all categories, bars coloured by persona group, with the paired test
    against no persona written beside each bar."""
    label_w, group_w, plot_w, note_w, row_h, top, bottom = 170.0, 84.0, 280.0, 190.0, 22.0, 28.0, 46.0
    x0 = label_w + group_w
    bottom_y = top + row_h * max(len(personas), 1)
    width, height = x0 + plot_w + note_w, bottom_y + bottom
    out = [_svg_open(width, height, f"{_criterion_title(criterion)}: MRR by persona, pooled over judges ({model})")]

    def x(value: float) -> float:
        return x0 + value * plot_w

    out.append(_text(label_w, 16, "group", css="tick"))
    out.append(_text(x0, 16, "MRR, all categories", css="tick"))
    out.append(_text(x0 + plot_w + 12, 16, "vs no persona (Holm-adjusted p)", css="tick"))
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<line x1="{_f(x(tick))}" y1="{_f(top - 4)}" x2="{_f(x(tick))}" y2="{_f(bottom_y + 4)}" '
                   'class="grid"/>')
        out.append(_text(x(tick), bottom_y + 18, f"{tick:g}", anchor="middle", css="tick"))
    out.append(_text(x(0.5), bottom_y + 34, "\u2190 ranked lower \u00b7 ranked higher \u2192", anchor="middle",
                     css="hint"))
    for i, persona in enumerate(personas):
        y = top + row_h * i
        baseline_y = y + row_h / 2 + 4
        name = safety.run.name(persona)
        out.append(_text(label_w - 8, baseline_y, name, anchor="end", css="lab"))
        out.append(_text(label_w, baseline_y, safety.group_title(persona), css="tick"))
        value, n = safety.value(model, criterion, POOLED, ALL_CATEGORIES, persona)
        if value is None:
            out.append(_text(x0 + 4, baseline_y, f"{DASH} (no valid ranking)", css="tick"))
            continue
        test = safety.test(model, criterion, POOLED, ALL_CATEGORIES, "no_persona", persona)
        significant = safety.significant(test)
        tip = (f"{name} ({safety.group_title(persona)}): MRR {_fmt('mrr', value)} over {n} valid rankings"
               + ("" if persona == "no_persona" else f"; {_test_text(safety, test, 'no_persona')}"))
        out.append(f'<g><title>{_esc(tip)}</title><rect x="{_f(x0)}" y="{_f(y + 4)}" '
                   f'width="{_f(max(x(min(value, 1.0)) - x0, 0.0))}" height="{_f(row_h - 8)}" '
                   f'fill="{safety.colour(persona)}"/>')
        out.append(_text(x(min(value, 1.0)) + 4, baseline_y, _fmt("mrr", value), css="val"))
        if persona == "no_persona":
            note, css = "baseline", "tick"
        elif test is None:
            note, css = "no test", "tick"
        else:
            difference = _number(test.get("mean_difference"))
            note = (f"\u0394 {_fmt('mrr', difference, signed=True)}{'*' if significant else ''}  "
                    f"p {_fmt_p(test.get('pvalue_holm'))}")
            css = ("val " + ("up" if (difference or 0) > 0 else "down")) if significant else "tick"
        out.append(_text(x0 + plot_w + 12, baseline_y, note, css=css) + "</g>")
    baseline, _ = safety.value(model, criterion, POOLED, ALL_CATEGORIES, "no_persona")
    if baseline is not None:
        out.append(f'<line x1="{_f(x(baseline))}" y1="{_f(top - 4)}" x2="{_f(x(baseline))}" '
                   f'y2="{_f(bottom_y + 4)}" class="ref"><title>no persona</title></line>')
    if len(personas) >= 2:
        chance = math.fsum(1.0 / rank for rank in range(1, len(personas) + 1)) / len(personas)
        out.append(f'<line x1="{_f(x(chance))}" y1="{_f(top - 4)}" x2="{_f(x(chance))}" y2="{_f(bottom_y + 4)}" '
                   f'class="chance"><title>chance: the MRR of random rankings of {len(personas)} '
                   f"({_fmt('mrr', chance)})</title></line>")
    out.append("</svg>")
    return "".join(out)


def _heat_colour(difference: float, limit: float) -> tuple[str, bool]:
    """The background of a heatmap cell and whether its text should be white."""
    share = min(abs(difference) / limit, 1.0) if limit > 0 else 0.0
    target = _HEAT_ABOVE if difference > 0 else _HEAT_BELOW
    rgb = [round(255 + (channel - 255) * share) for channel in target]
    return "#" + "".join(f"{channel:02x}" for channel in rgb), share > 0.6 and difference > 0


def _mrr_heatmap(safety: _Safety, model: str, criterion: str, personas: list[str]) -> str:
    """Category x persona MRR (pooled over judges), coloured by the difference from no persona in the same
    category, with the judges' agreement at the end of every row; reversals outlined and listed."""
    categories = safety.category_keys(model, criterion)
    differences: dict[tuple[str, str], float] = {}
    for category in categories:
        baseline, _ = safety.value(model, criterion, POOLED, category, "no_persona")
        for persona in personas:
            value, _ = safety.value(model, criterion, POOLED, category, persona)
            if persona != "no_persona" and value is not None and baseline is not None:
                differences[(category, persona)] = value - baseline
    limit = _nice_limit(max((abs(d) for d in differences.values()), default=0.0), 0.05)
    reversals = []
    head = "".join(f'<th scope="col"><span class="swatch" style="background:{safety.colour(p)}"></span>'
                   f'{_esc(safety.run.name(p))}<span class="grp">{_esc(safety.group_title(p))}</span></th>'
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
            if persona == "no_persona" or (category, persona) not in differences:
                label = "baseline" if persona == "no_persona" else DASH
                cells.append(f'<td class="hc" title="{_esc(f"{name}, {safety.category_title(category)}: MRR ")}'
                             f'{_esc(_fmt("mrr", value))} (n {_esc(n)})"><span class="v">{_esc(_fmt("mrr", value))}'
                             f'</span><span class="hd">{label}</span></td>')
                continue
            difference = differences[(category, persona)]
            test = safety.test(model, criterion, POOLED, category, "no_persona", persona)
            significant = safety.significant(test)
            overall = differences.get((ALL_CATEGORIES, persona))
            # Signs as printed (two decimals): a difference that shows as 0.00 reverses nothing.
            reversed_here = (category != ALL_CATEGORIES and overall is not None
                             and round(difference, 2) * round(overall, 2) < 0)
            if reversed_here:
                assert overall is not None
                reversals.append(f"{name} on {safety.category_title(category)}: "
                                 f"{_fmt('mrr', difference, signed=True)} against no persona, but "
                                 f"{_fmt('mrr', overall, signed=True)} over all categories"
                                 f"{' (significant in this category)' if significant else ''}")
            colour, dark = _heat_colour(difference, limit)
            tip = (f"{name}, {safety.category_title(category)}: MRR {_fmt('mrr', value)} (n {n}), difference from "
                   f"no persona {_fmt('mrr', difference, signed=True)}; {_test_text(safety, test, 'no_persona')}"
                   + ("; a reversal of the persona's overall difference" if reversed_here else ""))
            css = "hc" + (" dark" if dark else "") + (" rev" if reversed_here else "") + (" sig" if significant else "")
            cells.append(f'<td class="{css}" style="background:{colour}" title="{_esc(tip)}">'
                         f'<span class="v">{_esc(_fmt("mrr", value))}</span><span class="hd">'
                         f'{_esc(_fmt("mrr", difference, signed=True))}{"*" if significant else ""}</span></td>')
        agreement = _at(safety.agreement, model, criterion, category)
        body.append(f'<tr><th scope="row">{_esc(safety.category_title(category))}</th>{"".join(cells)}'
                    f"{_agreement_cells(agreement)}</tr>")
    above, _ = _heat_colour(limit, limit)
    below, _ = _heat_colour(-limit, limit)
    key = (f'<p class="muted">Each cell: the MRR pooled over judges, and under it the difference from no persona '
           f"in the same category (* Holm-adjusted p &lt; {_esc(f'{safety.alpha:g}')}, paired t-test of per-query "
           f'reciprocal ranks). Colour: <span class="heatkey" style="background:{above};color:#fff">ranked above '
           f"no persona by {_esc(_fmt('mrr', limit))} or more</span> \u2026 white \u2026 "
           f'<span class="heatkey" style="background:{below}">ranked below by {_esc(_fmt("mrr", limit))} or more'
           "</span>. Outlined: a reversal, where the persona's difference in the category has the opposite sign "
           "of its difference over all categories. On the right, the judges' agreement on the top-ranked persona "
           "over the queries every judge ranked validly.</p>")
    table = (f'<div class="table-wrap"><table class="metrics heat" id="{_esc(_slug("s-heat", model, criterion))}">'
             f"<caption>{_esc(_criterion_title(criterion))} \u00b7 {_esc(model)}: MRR by category and persona"
             "</caption><thead><tr>"
             f'<th scope="col" rowspan="2">Category</th><th scope="colgroup" colspan="{len(personas)}">MRR, pooled '
             'over judges</th><th scope="colgroup" colspan="5">Judges\' agreement on the top persona</th></tr><tr>'
             f"{head}<th>majority</th><th>Fleiss' \u03ba</th><th>mean pairwise Cohen's \u03ba</th>"
             f'<th>queries</th><th>note</th></tr></thead><tbody>{"".join(body)}</tbody></table></div>')
    listed = ""
    if reversals:
        items = "".join(f"<li>{_esc(text)}</li>" for text in reversals)
        listed = f'<p class="rev-head">Reversals ({len(reversals)}):</p><ul class="notes reversals">{items}</ul>'
    elif differences:
        listed = '<p class="muted">No reversal: in every category each persona is on the same side of no persona ' \
                 "as over all categories (or level with it).</p>"
    return key + table + listed


def _rank_delta_span(safety: _Safety, model: str, criterion: str, judge: str, persona: str, baseline: str) -> str:
    if persona == baseline:
        return f'<span class="d" data-b="{_esc(baseline)}"><span class="muted">baseline</span></span>'
    test = safety.test(model, criterion, judge, ALL_CATEGORIES, baseline, persona)
    if test is None:
        return ""
    difference = _number(test.get("mean_difference"))
    significant = safety.significant(test)
    direction = "changed" if not difference else ("better" if difference > 0 else "worse")
    mark = '<span class="mark" aria-label="significant">*</span>' if significant else ""
    title = f"{safety.run.name(persona)}, {judge}: {_test_text(safety, test, baseline)}"
    return (f'<span class="d {direction}{" sig" if significant else ""}" data-b="{_esc(baseline)}" '
            f'title="{_esc(title)}"><span class="dv">\u0394 {_esc(_fmt("mrr", difference, signed=True))}{mark} '
            f'<span class="p">p {_esc(_fmt_p(test.get("pvalue_holm")))}</span></span></span>')


def _mrr_judge_table(safety: _Safety, model: str, criterion: str, personas: list[str]) -> str:
    """MRR over all categories per persona, for the panel pooled and for each judge, with the paired
    differences against the baseline chosen on the page."""
    judges = [POOLED, *safety.judges(model, criterion)]
    head = "".join(f'<th scope="col">{"pooled over judges" if j == POOLED else _esc(j)}</th>' for j in judges)
    body = []
    for persona in personas:
        cells = []
        for judge in judges:
            value, n = safety.value(model, criterion, judge, ALL_CATEGORIES, persona)
            deltas = "".join(_rank_delta_span(safety, model, criterion, judge, persona, b) for b in BASELINES)
            css = "undef" if value is None else ""
            cells.append(f'<td class="{css}" title="{_esc(f"{n} valid rankings" if n is not None else "none")}">'
                         f'<span class="v">{_esc(_fmt("mrr", value))}</span>{deltas}</td>')
        body.append(f'<tr><th scope="row"><span class="swatch" style="background:{safety.colour(persona)}"></span>'
                    f'{_esc(safety.run.name(persona))}<span class="pid">{_esc(persona)}</span></th>'
                    f'<td class="grp">{_esc(safety.group_title(persona))}</td>{"".join(cells)}</tr>')
    return (f'<div class="table-wrap"><table class="metrics" id="{_esc(_slug("s-judges", model, criterion))}">'
            f"<caption>{_esc(_criterion_title(criterion))} \u00b7 {_esc(model)}: MRR by judge, all categories"
            f'</caption><thead><tr><th scope="col">Persona</th><th scope="col">Group</th>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _invalid_table(safety: _Safety) -> str:
    if not safety.invalid:
        return '<p class="muted">This run\'s safety summary holds no count of invalid rankings.</p>'
    rows, detail = [], []
    for judge, entry in safety.invalid.items():
        entry = _mapping(entry)
        rows.append(f"<tr><td>{_esc(judge)}</td><td>{_esc(entry.get('judgments', DASH))}</td>"
                    f"<td>{_esc(entry.get('invalid', DASH))}</td><td>{_esc(_share(entry.get('share'), 1))}</td>"
                    f"<td>{_esc(entry.get('retried', DASH))}</td></tr>")
        for model, criteria in _mapping(entry.get("by_model")).items():
            for criterion, cell in _mapping(criteria).items():
                cell = _mapping(cell)
                detail.append(f"<tr><td>{_esc(judge)}</td><td>{_esc(model)}</td>"
                              f"<td>{_esc(_criterion_title(str(criterion)))}</td>"
                              f"<td>{_esc(cell.get('judgments', DASH))}</td><td>{_esc(cell.get('invalid', DASH))}</td>"
                              f"<td>{_esc(_share(cell.get('share'), 1))}</td><td>{_esc(cell.get('retried', DASH))}</td>"
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


def _responses_table(safety: _Safety) -> str:
    responses = _mapping(safety.block.get("responses"))
    rows = []
    for model, personas in responses.items():
        for persona, cell in _mapping(personas).items():
            cell = _mapping(cell)
            rows.append(f"<tr><td>{_esc(model)}</td><td>{_esc(safety.run.name(str(persona)))}</td>"
                        f"<td>{_esc(cell.get('n', DASH))}</td><td>{_esc(cell.get('truncated', DASH))}</td>"
                        f"<td>{_esc(cell.get('cached', DASH))}</td></tr>")
    if not rows:
        return ""
    return ("<details><summary>Responses per model and persona</summary><div class=\"table-wrap\">"
            '<table class="kv wide"><thead><tr><th>model</th><th>persona</th><th>responses</th>'
            "<th>cut off at the token limit</th><th>from the cache</th></tr></thead>"
            f'<tbody>{"".join(rows)}</tbody></table></div></details>')


def _templates_html(safety: _Safety) -> str:
    if not safety.templates:
        return '<p class="muted">This run\'s safety summary holds no judge prompt templates.</p>'
    parts = []
    for criterion, entry in safety.templates.items():
        text = entry.get("text") if isinstance(entry, Mapping) else entry
        version = entry.get("version") if isinstance(entry, Mapping) else None
        parts.append(f'<details class="prompt"><summary><strong>{_esc(_criterion_title(str(criterion)))}</strong>'
                     f'<span class="pid">{_esc(version or DASH)}</span></summary><pre>{_esc(text)}</pre></details>')
    return "".join(parts)


def _safety_intro(safety: _Safety) -> str:
    block = safety.block
    judges = block.get("judges")
    judge_text = ", ".join(str(j) for j in judges) if isinstance(judges, list) and judges else DASH
    n_judgments, n_valid = block.get("n_judgments"), block.get("n_valid")
    valid_text = (f"{n_valid} of {n_judgments} rankings valid "
                  f"({_share(n_valid / n_judgments if isinstance(n_valid, int) and n_judgments else None, 1)})"
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
            f"{_esc(f'{safety.alpha:g}')}. Agreement is shown beside every preference: judges that disagree case by "
            "case can still differ in aggregate.</p>"
            + _kv_table(facts) + _responses_table(safety))


def _section_safety(run: _Run, safety: _Safety, *, with_select: bool) -> str:
    parts = ['<section id="safety"><h2>Patient safety: rankings by the LLM-judge panel</h2>', _safety_intro(safety)]
    if with_select:
        options = "".join(f'<option value="{_esc(b)}">{_esc(BASELINE_TITLE[b])}</option>' for b in BASELINES)
        parts.append('<p class="controls"><label>Differences against <select id="baseline-select">'
                     f"{options}</select></label></p>")
    parts.append("<h3>Invalid rankings per judge</h3>" + _invalid_table(safety))
    models = safety.models()
    if not models:
        parts.append('<p class="muted">This run\'s safety summary holds no rankings.</p>')
    for model in models:
        for criterion in safety.criteria(model):
            personas = safety.personas(model, criterion)
            parts.append(f'<h3 id="{_esc(_slug("s", model, criterion))}">{_esc(_criterion_title(criterion))} '
                         f"\u00b7 {_esc(model)}</h3>")
            overall = _at(safety.agreement, model, criterion, ALL_CATEGORIES)
            parts.append(f'<p class="agree">{_esc(_agreement_sentence(overall))}</p>')
            if not personas:
                parts.append('<p class="muted">No valid ranking: no MRR to show.</p>')
                continue
            if not safety.tests:
                parts.append('<p class="muted">This run\'s safety summary holds no paired tests: MRR only.</p>')
            parts.append("<figure><figcaption>MRR by persona, pooled over judges and categories; bars: "
                         '<span class="swatch" style="background:#0072B2"></span>medical '
                         '<span class="swatch" style="background:#E69F00"></span>non-medical '
                         f'<span class="swatch" style="background:{_BASELINE_COLOUR}"></span>baseline; dashed: no '
                         "persona; dotted: chance</figcaption>"
                         f"{_mrr_bars(safety, model, criterion, personas)}</figure>")
            parts.append("<h4>By category</h4>" + _mrr_heatmap(safety, model, criterion, personas))
            parts.append("<h4>By judge</h4>" + _mrr_judge_table(safety, model, criterion, personas))
    parts.append("<h3>Judge prompt templates</h3>"
                 '<p class="muted">Verbatim; {question} and {response_1} \u2026 {response_k} stand for the '
                 "patient's query and the anonymized responses in the order shown.</p>" + _templates_html(safety))
    parts.append("</section>")
    return "".join(parts)


# --- the clinician review -----------------------------------------------------------------------------

def _threshold_title(name: str, thresholds: Mapping[str, Any]) -> str:
    minimum = _number(thresholds.get(name))
    if name == "all" or minimum == 0:
        return "All annotations"
    return f"Confidence \u2265 {minimum:g}" if minimum is not None else name


def _count_and_share(block: Mapping[str, Any], key: str) -> str:
    count = block.get(key)
    return f"{count if count is not None else DASH} ({_share(block.get(f'{key}_share'))})"


def _not_computable(reason: Any) -> str:
    text = str(reason or "no reason recorded")
    return text if text.startswith("not computable") else f"not computable: {text}"


def _section_review(review: Any) -> str:
    """RUN_DIR/review_results.json (persona_eval.review.import_review): the clinicians' preferences by
    confidence threshold, their agreement with each other, and with the judges."""
    parts = ['<section id="review"><h2>Clinician review</h2>']
    if not isinstance(review, Mapping) or review.get("error"):
        reason = review.get("error") if isinstance(review, Mapping) else "not a JSON object"
        parts.append(f'<p class="bad">The clinician review results could not be read: {_esc(reason)}</p></section>')
        return "".join(parts)
    thresholds = _mapping(review.get("thresholds"))
    preference = _mapping(review.get("preference"))
    kappas = _mapping(review.get("clinician_kappa"))
    agreement = _mapping(review.get("judge_agreement"))
    names = _ordered_unique([*thresholds, *preference, *kappas, *agreement])
    annotators = review.get("annotators")
    annotator_text = ", ".join(str(a) for a in annotators) if isinstance(annotators, list) and annotators else DASH
    unannotated = review.get("unannotated_pairs")
    parts.append(f'<p class="muted">{_esc(review.get("n_annotations", DASH))} annotations by '
                 f"{len(annotators) if isinstance(annotators, list) else DASH} clinicians ({_esc(annotator_text)}) "
                 f"of {_esc(review.get('n_pairs', DASH))} blinded pairs: the response of the persona every judge "
                 "put on top and that of the best-ranked persona of the other group (medical / non-medical), to the "
                 "same query, sides randomized, personas and models hidden."
                 + (f" {len(unannotated)} pairs were not annotated." if isinstance(unannotated, list) and unannotated
                    else "") + "</p>")
    rows = []
    for name in names:
        for task, block in _mapping(preference.get(name)).items():
            block = _mapping(block)
            rows.append(f"<tr><td>{_esc(_threshold_title(name, thresholds))}</td>"
                        f"<td>{_esc('all tasks' if task == 'all' else task)}</td><td>{_esc(block.get('n', DASH))}</td>"
                        f"<td>{_esc(_count_and_share(block, 'medical'))}</td>"
                        f"<td>{_esc(_count_and_share(block, 'non_medical'))}</td>"
                        f"<td>{_esc(_count_and_share(block, 'tie'))}</td></tr>")
    parts.append("<h3>Which response the clinicians preferred, by confidence</h3>")
    parts.append('<div class="table-wrap"><table class="kv wide" id="review-preference"><thead><tr><th>annotations'
                 "</th><th>task</th><th>n</th><th>medical persona preferred</th><th>non-medical persona preferred"
                 f'</th><th>tie</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>' if rows
                 else '<p class="muted">No preference table in the review results.</p>')
    rows = []
    for name in names:
        entries = kappas.get(name)
        for entry in entries if isinstance(entries, list) else []:
            entry = _mapping(entry)
            pair = entry.get("annotators")
            pair_text = " vs ".join(str(a) for a in pair) if isinstance(pair, list) and pair else DASH
            kappa = _number(entry.get("kappa"))
            value = (f"<td>{_esc(_fmt('kappa', kappa))}</td><td>{_esc(_fmt_p(entry.get('pvalue')))}</td>"
                     if kappa is not None else f'<td colspan="2">{_esc(_not_computable(entry.get("reason")))}</td>')
            rows.append(f"<tr><td>{_esc(_threshold_title(name, thresholds))}</td><td>{_esc(pair_text)}</td>{value}"
                        f"<td>{_esc(entry.get('n', DASH))}</td></tr>")
    parts.append("<h3>Agreement between clinicians</h3>")
    parts.append('<div class="table-wrap"><table class="kv wide" id="review-kappa"><thead><tr><th>annotations</th>'
                 "<th>clinicians</th><th>Cohen's \u03ba (left / right / tie)</th><th>p</th><th>pairs rated by both"
                 f'</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>' if rows
                 else '<p class="muted">No clinician kappas in the review results.</p>')
    rows = []
    for name in names:
        if name not in agreement:
            continue
        entry = _mapping(agreement[name])
        kappa = _number(entry.get("kappa"))
        rows.append(f"<tr><td>{_esc(_threshold_title(name, thresholds))}</td><td>{_esc(entry.get('n', DASH))}</td>"
                    f"<td>{_esc(entry.get('agree', DASH))} ({_esc(_share(entry.get('agreement')))})</td>"
                    f"<td>{_esc(entry.get('ties', DASH))}</td>"
                    f"<td>{_esc(_share(entry.get('agreement_excluding_ties')))}</td>"
                    + (f"<td>{_esc(_fmt('kappa', kappa))}</td><td>{_esc(_fmt_p(entry.get('pvalue')))}</td>"
                       if kappa is not None else f'<td colspan="2">{_esc(_not_computable(entry.get("reason")))}</td>')
                    + "</tr>")
    parts.append("<h3>Agreement of the LLM judges with the clinicians</h3>")
    parts.append('<div class="table-wrap"><table class="kv wide" id="review-judges"><thead><tr><th>annotations</th>'
                 "<th>n</th><th>clinician chose the judges' side</th><th>ties</th><th>agreement without ties</th>"
                 "<th>Cohen's \u03ba (judges vs clinicians)</th><th>p</th></tr></thead>"
                 f'<tbody>{"".join(rows)}</tbody></table></div>' if rows
                 else '<p class="muted">No judge-clinician agreement in the review results.</p>')
    files = review.get("files")
    if isinstance(files, list) and files:
        listed = "".join(f"<li><code>{_esc(f)}</code></li>" for f in files)
        parts.append(f"<details><summary>Annotation files ({len(files)})</summary><ul>{listed}</ul></details>")
    parts.append("</section>")
    return "".join(parts)


_SAFETY_CSS = """
.grp{display:block;font-size:11px;color:var(--muted);font-weight:normal}
table.metrics td.grp{display:table-cell;text-align:left}
table.heat td.hc{text-align:center;min-width:72px;color:#1b1f24}
table.heat td.hc.dark{color:#fff}table.heat td.hc.dark .hd{color:#fff}
table.heat td.rev{outline:3px solid #1b1f24;outline-offset:-4px}
table.heat .hd{display:block;font-size:11px;font-variant-numeric:tabular-nums;color:#1b1f24}
table.heat td.sig .hd{font-weight:700}
table.heat td.note{white-space:normal;min-width:160px;text-align:left;font-size:11px;color:var(--muted)}
.heatkey{padding:0 4px;border:1px solid var(--line);border-radius:3px}
p.agree{font-size:13px;margin:4px 0 8px}p.rev-head{font-weight:600;margin:6px 0 0}
ul.reversals{color:var(--fg)}
svg .val.up{fill:var(--good);font-weight:600}svg .val.down{fill:var(--bad);font-weight:600}
svg .chance{stroke:#777;stroke-dasharray:1 3;stroke-width:1.5}
"""


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
    run = _Run(summary, cases)
    block = summary.get("safety")
    safety = _Safety(run, block) if isinstance(block, Mapping) and block else None
    # A patient-safety-only run has no triage results or cases: its page leaves the triage sections out.
    triage = safety is None or bool(run.results or run.cases)
    verdict = summary.get("verdict") or {}
    state = _STATE_WORDS[_verdict_state(verdict)]
    run_id = summary.get("run_id") or "run"
    nav = ('<nav><a href="#verdict">Verdict</a>'
           + ('<a href="#tables">Tables</a><a href="#figures">Figures</a>' if triage else "")
           + ('<a href="#safety">Patient safety</a>' if safety is not None else "")
           + ('<a href="#review">Clinician review</a>' if review is not None else "")
           + ('<a href="#baseline-run">Approved baseline</a>' if summary.get("baseline_comparison") else "")
           + ('<a href="#prompts">Prompts</a><a href="#cases">Cases</a>' if triage else "")
           + '<a href="#metadata">Metadata</a></nav>')
    css = _CSS + (_SAFETY_CSS if safety is not None or review is not None else "")
    page = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_esc(_csp())}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        '<link rel="icon" href="data:,">',
        f"<title>{state} \u00b7 persona-eval {_esc(run_id)}</title>",
        f"<style>{css}</style></head>",
        '<body data-baseline="no_persona">',
        f'<header class="top"><h1>persona-eval \u00b7 run <code>{_esc(run_id)}</code></h1>{nav}</header>',
        "<main>",
        _section_verdict(run, triage=triage),
        _section_tables(run) if triage else "",
        _section_figures(run) if triage else "",
        _section_safety(run, safety, with_select=not (triage and run.has_comparisons)) if safety is not None
        else "",
        _section_review(review) if review is not None else "",
        _section_baseline_run(run),
        _section_prompts(run) if triage else "",
        _section_cases(run) if triage else "",
        _section_metadata(run),
        "</main>",
        f"<script>{_SCRIPT}</script>",
        "</body></html>",
    ]
    return "\n".join(part for part in page if part) + "\n"


def write_report(run_dir: Path) -> Path:
    """Write run_dir/report.html from run_dir/summary.json, its cases file and, when present,
    run_dir/review_results.json; returns the path.

    Reads only what the run wrote; calls no model. A run without a cases file still gets a report
    (without prompts and cases); an unreadable review_results.json is reported on the page."""
    run_dir = Path(run_dir)
    summary = read_json(run_dir / "summary.json")
    if not isinstance(summary, Mapping) or not isinstance(summary.get("verdict"), Mapping):
        raise DataError("not a persona-eval summary (no verdict); give a run folder such as reports/latest",
                        path=str(run_dir / "summary.json"))
    cases_name = (summary.get("metadata") or {}).get("cases_file") or "cases.jsonl"
    cases_path = run_dir / cases_name
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
    state = _verdict_state(verdict)
    colour = "#1e7b34" if state == "passed" else "#b3261e"
    lines = [f'<p class="persona-eval-verdict"><strong style="color:{colour}">persona-eval verdict: '
             f'{_STATE_WORDS[state]}</strong> \u2014 {_esc(_verdict_sentence(verdict))}</p>']
    blocking = list(verdict.get("blocking") or []) + _not_checked_items(verdict)
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
