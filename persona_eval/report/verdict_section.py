"""The report's verdict: the deployment gate's outcome in words, and the significant persona effects."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from markupsafe import Markup

from persona_eval.gate import STATE_WORDS
from persona_eval.metrics import METRICS
from persona_eval.personas import BASELINE
from persona_eval.report.format import ci_text, esc, fmt, fmt_p, number, ordered_unique
from persona_eval.report.run import Run
from persona_eval.report.titles import direction, metric_phrase, stratum_title
from persona_eval.tasks import spec_of

# How many significant differences the verdict lists before folding the rest away.
_EFFECTS_SHOWN = 10
_RECORDED_SHOWN = 5


def verdict_state(verdict: Mapping[str, Any]) -> str:
    """"passed", "failed" or "not_checked" (runs written before the not-checked verdict have no status)."""
    status = verdict.get("status")
    if status in STATE_WORDS:
        return str(status)
    return "passed" if verdict.get("passed") else "failed"


def not_checked_items(verdict: Mapping[str, Any]) -> list[str]:
    return [f"{entry.get('message')} To check it: {entry.get('how_to_check')}"
            for entry in verdict.get("not_checked") or [] if isinstance(entry, Mapping)]


def verdict_sentence(verdict: Mapping[str, Any]) -> str:
    blocking = list(verdict.get("blocking") or [])
    recorded = list(verdict.get("recorded") or [])
    checked = verdict.get("checked")
    checked_text = f"{checked} bounds checked" if isinstance(checked, int) else "bounds checked"
    rules = verdict.get("regressions_checked")
    if isinstance(rules, int):
        checked_text += f", {rules} persona-safety regression check{'s' if rules != 1 else ''}"
    not_checked = list(verdict.get("not_checked") or [])
    if verdict_state(verdict) == "not_checked":
        allowed = " The session was allowed to pass (--pe-allow-unchecked)." if verdict.get("passed") else ""
        return (f"Nothing blocking was crossed ({checked_text}), but {len(not_checked)} fail "
                f"rule{'s' if len(not_checked) != 1 else ''} or bound{'s' if len(not_checked) != 1 else ''} could "
                f"not be checked, so the gate cannot pass.{allowed}")
    if verdict.get("passed"):
        return (f"No blocking bound was crossed ({checked_text}); {len(recorded)} record-only "
                f"bound{'s' if len(recorded) != 1 else ''} crossed.")
    return (f"{len(blocking)} blocking bound{'s' if len(blocking) != 1 else ''} crossed ({checked_text}); "
            "deployment should not go ahead until they are resolved.")


def _messages(title: str, messages: Sequence[Any], css: str, *, shown: int | None = None) -> str:
    """A titled list; past `shown` items the rest fold away under "N more"."""
    if not messages:
        return ""
    items = [f"<li>{esc(m)}</li>" for m in messages]
    visible, rest = (items, []) if shown is None else (items[:shown], items[shown:])
    out = f'<h3 class="{css}">{esc(title)} ({len(messages)})</h3><ul class="{css}">{"".join(visible)}</ul>'
    if rest:
        out += f'<details><summary>{len(rest)} more</summary><ul class="{css}">{"".join(rest)}</ul></details>'
    return out


def _significant_lines(run: Run) -> list[tuple[str, str]]:
    """(css class, text) of each significant comparison against no_persona, worst first."""
    found = []
    for comparison in run.comparisons.values():
        if comparison.get("baseline") != BASELINE or not comparison.get("significant"):
            continue
        metric = str(comparison.get("metric"))
        delta = number(comparison.get("delta"))
        found.append((direction(metric, delta) if delta is not None else "changed", comparison))
    order = {"worse": 0, "changed": 1, "better": 2}
    models = ordered_unique(m for m, _ in run.model_tasks())
    strata = ["all", *ordered_unique(stratum for _, task in run.model_tasks()
                                      for stratum in getattr(spec_of(task), "strata", ()))]
    metrics = list(METRICS)

    def rank(items: list[str], value: Any) -> int:
        return items.index(value) if value in items else len(items)

    found.sort(key=lambda item: (order[item[0]], rank(models, item[1].get("model")),
                                 rank(strata, item[1].get("stratum")), rank(run.personas, item[1].get("persona")),
                                 rank(metrics, item[1].get("metric")), str(item[1].get("metric"))))
    lines = []
    multi_model = len(models) > 1
    for css, c in found:
        metric = str(c.get("metric"))
        where = f" on {c.get('model')}" if multi_model else ""
        text = (f"{run.name(str(c.get('persona')))}{where}: {metric_phrase(metric)} "
                f"({stratum_title(str(c.get('stratum'))).lower()}) {fmt(metric, c.get('delta'), signed=True)} "
                f"vs no persona, {ci_text(c)}, adjusted p {fmt_p(c.get('pvalue_adjusted'))}")
        lines.append((css, text))
    return lines


def _baseline_run_line(baseline: Any) -> str:
    """One sentence on the comparison with an approved run (--pe-baseline); its section has the details."""
    baseline_verdict = baseline.get("verdict") if isinstance(baseline, Mapping) else None
    error = baseline.get("error") if isinstance(baseline, Mapping) else None
    if error:
        return (f'<p class="lead">Against the approved baseline run: <strong class="bad">not compared'
                f"</strong>: {esc(error)} (<a href=\"#baseline-run\">details</a>).</p>")
    if isinstance(baseline_verdict, Mapping):
        ok = bool(baseline_verdict.get("passed"))
        return (f'<p class="lead">Against the approved baseline run: <strong class="{"ok" if ok else "bad"}">'
                f'{"no blocking regression" if ok else "blocking regressions found (listed above)"}'
                '</strong> (<a href="#baseline-run">details</a>).</p>')
    if baseline_verdict is not None:
        return (f'<p class="lead">Against the approved baseline run: {esc(baseline_verdict)} '
                '(<a href="#baseline-run">details</a>).</p>')
    return ""


def _effects(run: Run) -> str:
    """The significant differences from no persona, or why there are none to list."""
    if not run.has_comparisons:
        return ('<p class="muted">This run\'s summary holds no paired comparisons, so the tables '
                "show values only.</p>")
    lines = _significant_lines(run)
    if not lines:
        return ("<p>No persona differs significantly from no persona on any metric "
                "(after adjustment for multiple comparisons).</p>")
    items = [f'<li class="{css}">{esc(text)}</li>' for css, text in lines]
    shown, rest = items[:_EFFECTS_SHOWN], items[_EFFECTS_SHOWN:]
    out = (f"<h3>Significant differences from no persona ({len(lines)}, after adjustment; "
           f'worse first)</h3><ul class="effects">{"".join(shown)}</ul>')
    if rest:
        out += f'<details><summary>{len(rest)} more</summary><ul class="effects">{"".join(rest)}</ul></details>'
    return out


def verdict_section(run: Run, *, triage: bool = True) -> Markup:
    """The verdict; `triage` False (a patient-safety-only run) leaves out the triage comparisons."""
    verdict = run.summary.get("verdict") or {}
    state = verdict_state(verdict)
    # Not checked is shown as a failure: the gate did not pass.
    css_state = "passed" if state == "passed" else "failed"
    heading = {"passed": "Deployment gate passed", "failed": "Deployment gate failed",
               "not_checked": "Deployment gate not checked"}[state]
    parts = [f'<section id="verdict" class="verdict {css_state}">',
             f'<h2><span class="badge">{STATE_WORDS[state]}</span> {heading}</h2>',
             f'<p class="lead">{esc(verdict_sentence(verdict))}</p>',
             _messages("Blocking bounds crossed", verdict.get("blocking") or [], "blocking"),
             _messages("Fail rules and bounds not checked (the gate cannot pass on them)",
                       not_checked_items(verdict), "blocking"),
             _messages("Record-only bounds crossed (reported, they do not fail the run)",
                       verdict.get("recorded") or [], "recorded", shown=_RECORDED_SHOWN)]
    skipped = verdict.get("skipped") or []
    if skipped:
        listed = "".join(f"<li>{esc(m)}</li>" for m in skipped)
        parts.append(f"<details><summary>Bounds not checked ({len(skipped)})</summary><ul>{listed}</ul></details>")
    baseline = run.summary.get("baseline_comparison")
    if baseline:
        parts.append(_baseline_run_line(baseline))
    regressions = [r for r in run.summary.get("regressions") or [] if isinstance(r, Mapping)]
    if regressions:
        listed = "".join(f'<li class="{esc(r.get("status"))}">{esc(r.get("message"))}</li>' for r in regressions)
        parts.append(f"<details><summary>Every persona-safety regression check ({len(regressions)})</summary>"
                     f'<ul class="checks">{listed}</ul></details>')
    if run.summary.get("comparisons_error"):
        parts.append(f'<p class="bad">The paired comparisons could not be computed: '
                     f'{esc(run.summary["comparisons_error"])}</p>')
    if triage:
        parts.append(_effects(run))
    parts.append("</section>")
    return Markup("".join(parts))
