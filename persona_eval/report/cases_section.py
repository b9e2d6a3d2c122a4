"""The report's drill-down: every triage answer of every persona, filterable, with no persona's answer
to the same case beside it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from markupsafe import Markup

from persona_eval.personas import BASELINE
from persona_eval.report.format import DASH, esc, number, ordered_unique
from persona_eval.report.fragments import reply_html
from persona_eval.report.run import Run
from persona_eval.report.titles import stratum_title


def _probabilities(probs: Any, labels: Sequence[str]) -> list[str]:
    if not isinstance(probs, Mapping):
        return [DASH for _ in labels]
    return [f"{number(probs.get(label)):.3f}" if number(probs.get(label)) is not None else DASH
            for label in labels]


def _select(element_id: str, label: str, options: Sequence[tuple[str, str]]) -> str:
    items = '<option value="">all</option>' + "".join(
        f'<option value="{esc(value)}">{esc(text)}</option>' for value, text in options)
    return f'<label>{esc(label)} <select id="{element_id}">{items}</select></label>'


def cases_section(run: Run) -> Markup:
    baseline_label: dict[tuple[str, str, str], Any] = {}
    for case in run.cases:
        if case.get("persona") == BASELINE:
            baseline_label[(str(case.get("model")), str(case.get("task")), str(case.get("case_id")))] = \
                case.get("generated_label")
    models = ordered_unique(str(c.get("model")) for c in run.cases)
    tasks = ordered_unique(str(c.get("task")) for c in run.cases)
    labels = ordered_unique(label for task in tasks for label in run.labels(task))
    strata = ordered_unique(str(c.get("stratum")) for c in run.cases)
    personas = [p for p in run.personas if any(c.get("persona") == p for c in run.cases)]
    rows = []
    disagreements = 0
    for case in run.cases:
        model, task, case_id = str(case.get("model")), str(case.get("task")), str(case.get("case_id"))
        persona = str(case.get("persona"))
        key = (model, task, case_id)
        has_baseline = key in baseline_label
        generated = case.get("generated_label")
        disagrees = persona != BASELINE and has_baseline and generated != baseline_label[key]
        disagreements += disagrees
        correct = generated is not None and generated == case.get("reference")
        probs = _probabilities(case.get("label_probs"), labels)
        source = case.get("probs_source") or DASH
        if case.get("probs_flagged"):
            source = f"{source} (a label was outside the top-k; floor value used)"
        wrong_mark = "" if correct else " \u2717"
        base_text = (baseline_label[key] or "none") if has_baseline else DASH
        if persona == BASELINE:
            base_text = "(baseline)"
        rows.append(
            f'<tr data-model="{esc(model)}" data-stratum="{esc(case.get("stratum"))}" '
            f'data-persona="{esc(persona)}" data-disagree="{1 if disagrees else 0}" '
            f'class="{"right" if correct else "wrong"}{" disagree" if disagrees else ""}">'
            f"<td>{esc(case_id)}</td>"
            + (f"<td>{esc(task)}</td>" if len(tasks) > 1 else "")
            + (f"<td>{esc(model)}</td>" if len(models) > 1 else "")
            + f"<td>{esc(run.name(persona))}</td><td>{esc(stratum_title(str(case.get('stratum'))))}</td>"
            f'<td class="lbl">{esc(case.get("reference"))}</td>'
            f'<td class="lbl answer">{esc(generated if generated is not None else "none")}{wrong_mark}</td>'
            f'<td class="lbl">{esc(case.get("logit_label") or DASH)}</td>'
            + "".join(f'<td class="num">{esc(p)}</td>' for p in probs)
            + f"<td>{esc(source)}</td>"
            f'<td class="lbl">{esc(base_text)}</td>'
            f'<td class="gen">{reply_html(case, "generated_text")}'
            + ('<p class="muted">a secret in this answer was masked</p>' if case.get("secrets_masked") else "")
            + "</td></tr>")
    controls = ['<div class="controls" id="case-filters">']
    if len(models) > 1:
        controls.append(_select("f-model", "Model", [(m, m) for m in models]))
    controls.append(_select("f-stratum", "Stratum", [(s, stratum_title(s)) for s in strata]))
    controls.append(_select("f-persona", "Persona", [(p, run.name(p)) for p in personas]))
    controls.append('<label><input type="checkbox" id="f-disagree"> only answers that differ from no '
                    "persona's on the same case</label>")
    controls.append('<label><input type="checkbox" id="f-wrong"> only wrong answers</label>')
    controls.append("</div>")
    total = len(run.cases)
    head = ("<th>Case</th>" + ("<th>Task</th>" if len(tasks) > 1 else "")
            + ("<th>Model</th>" if len(models) > 1 else "")
            + "<th>Persona</th><th>Stratum</th><th>Reference</th><th>Answer (parsed)</th><th>Most likely "
            "(logits)</th>" + "".join(f"<th>P({esc(label)})</th>" for label in labels)
            + "<th>Probabilities from</th><th>No persona's answer</th><th>Generated text</th>")
    intro = (f"Every answer of every persona. {disagreements} answers differ from no persona's answer on the "
             f"same case. Probabilities are the model's distribution over {esc('/'.join(labels))} where it wrote "
             "its answer "
             "(\u201canswer\u201d), or at the end of the prompt when no answer could be read (\u201cprompt\u201d).")
    return Markup(f'<section id="cases"><h2>Cases</h2><p class="muted">{intro}</p>{"".join(controls)}'
                  f'<p id="case-count" class="count">Showing {total} of {total} answers</p>'
                  f'<div class="table-wrap"><table id="case-table" class="cases"><thead><tr>{head}</tr></thead>'
                  f'<tbody>{"".join(rows)}</tbody></table></div></section>')
