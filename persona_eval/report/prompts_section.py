"""The report's prompts: the exact text each model received, per persona, for the first case."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from markupsafe import Markup

from persona_eval.report.format import DASH, esc, ordered_unique
from persona_eval.report.run import Run


def _system_text(value: Any) -> str:
    if value is None:
        return "(no system message is sent)"
    if value == "":
        return "(an empty system message is sent)"
    return str(value)


def prompts_section(run: Run) -> Markup:
    parts = ['<section id="prompts"><h2>Prompts</h2>'
             '<p class="muted">The exact text each model received for the first case, per persona: the '
             "persona's system prompt, and the whole prompt as rendered by the model's chat template. "
             "The rest of the prompt is the same in every condition.</p>"]
    first: dict[tuple[str, str, str], Mapping[str, Any]] = {}
    for case in run.cases:
        first.setdefault((str(case.get("model")), str(case.get("task")), str(case.get("persona"))), case)
    if not first:
        parts.append('<p class="muted">No cases were recorded for this run.</p>')
    for model, task in ordered_unique((m, t) for m, t, _ in first):
        parts.append(f"<h3>{esc(task)} \u00b7 {esc(model)}</h3>")
        for persona in [p for p in run.personas if (model, task, p) in first]:
            case = first[(model, task, persona)]
            declaration = (run.persona_info.get(persona) or {}).get("declaration")
            parts.append(
                f'<details class="prompt"><summary><strong>{esc(run.name(persona))}</strong> '
                f'<span class="pid">{esc(persona)}</span> \u2014 system prompt: '
                f"<q>{esc(_system_text(case.get('system_prompt')))}</q></summary>"
                + (f'<p class="muted">Declaration: {esc(declaration)}</p>' if declaration else "")
                + f'<p class="muted">Case {esc(case.get("case_id"))}, template '
                f'{esc(case.get("template_version", DASH))}</p><pre>{esc(case.get("prompt"))}</pre></details>')
    parts.append("</section>")
    return Markup("".join(parts))
