"""The report's "Is it the persona?" section: flips against the placebo (with the changed cases), effects
across wordings, letter preference over the letter orders and the null-prompt calibration, from
summary.json's ``robustness`` block (persona_eval.robustness). Verdict sentences first, then the tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from markupsafe import Markup

from persona_eval.personas import BASELINE, PLACEBO
from persona_eval.report.format import DASH, esc, fmt_p, number, share
from persona_eval.report.robustness_text import flip_sentence, wording_sentence
from persona_eval.report.run import Run
from persona_eval.report.titles import metric_title, stratum_title

__all__ = ["robustness_section"]

_KIND_TITLES = {"more_urgent": "More urgent than under no persona", "less_urgent": "Less urgent than under no persona",
                "other": "To or from no answer"}


def _signed(value: Any) -> str:
    finite = number(value)
    return DASH if finite is None else f"{finite:+.2f}"


def _yes_no(value: Any) -> str:
    return "yes" if value is True else ("no" if value is False else DASH)


def _grouped(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    out: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        if isinstance(row, Mapping):
            out.setdefault((str(row.get("model")), str(row.get("task"))), []).append(row)
    return out


def _flips(run: Run, rows: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for (model, task), group in _grouped(rows).items():
        main = sorted((r for r in group if r.get("stratum") == "all"), key=lambda r: r.get("persona") != PLACEBO)
        more = [r for r in main if r.get("more_than_placebo")]
        verdict = (f"{', '.join(run.name(str(r['persona'])) for r in more)}: more changed answers than the placebo "
                   "sentence" if more else "No persona changes more answers than the placebo sentence")
        parts.append(f"<h3>Flips against no persona · {esc(task)} · {esc(model)}</h3>"
                     f'<p class="{"bad" if more else "ok"}"><strong>{esc(verdict)}.</strong></p>'
                     f"<ul>{''.join(f'<li>{esc(flip_sentence(r))}</li>' for r in main)}</ul>")
        body = []
        for r in group:
            body.append(
                f"<tr><td>{esc(stratum_title(str(r.get('stratum'))))}</td><td>{esc(run.name(str(r.get('persona'))))}</td>"
                f'<td class="num">{esc(r.get("n"))}</td><td class="num">{esc(r.get("changed"))}</td>'
                f'<td class="num">{esc(share(r.get("flip_rate")))}</td><td class="num">{esc(r.get("more_urgent"))}</td>'
                f'<td class="num">{esc(r.get("less_urgent"))}</td><td class="num">{esc(r.get("other"))}</td>'
                f'<td class="num">{esc(share(r.get("placebo_flip_rate")))}</td>'
                f'<td class="num">{esc(fmt_p(r.get("pvalue_adjusted")))}</td>'
                f"<td>{_yes_no(r.get('more_than_placebo'))}</td>"
                f"<td class=\"note\">{esc(r.get('note') or '')}</td></tr>")
        parts.append('<div class="table-wrap"><table class="kv wide"><thead><tr><th>stratum</th><th>persona</th>'
                     "<th>n</th><th>changed</th><th>flip rate</th><th>more urgent</th><th>less urgent</th>"
                     "<th>to/from no answer</th><th>placebo's flip rate</th><th>adjusted p (more than placebo)</th>"
                     "<th>more than placebo</th><th>note</th></tr></thead>"
                     f"<tbody>{''.join(body)}</tbody></table></div>")
        for r in main:
            cases = r.get("cases")
            if not isinstance(cases, Mapping) or not r.get("changed"):
                continue
            lists = []
            for kind, title in _KIND_TITLES.items():
                entries = cases.get(kind) or []
                if entries:
                    items = "".join(f"<li><code>{esc(e[0])}</code> ({esc(stratum_title(str(e[1])))}): "
                                    f"{esc(e[2] or 'no answer')} \u2192 {esc(e[3] or 'no answer')}</li>"
                                    for e in entries if isinstance(e, Sequence) and len(e) == 4)
                    lists.append(f"<p>{esc(title)} ({len(entries)}):</p><ul>{items}</ul>")
            parts.append(f"<details><summary>Changed cases of {esc(run.name(str(r['persona'])))} "
                         f"({esc(r.get('changed'))})</summary>{''.join(lists)}</details>")
    return "".join(parts)


def _wordings(run: Run, rows: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for (model, task), group in _grouped(rows).items():
        flagged = [r for r in group if r.get("sign_differs")]
        verdict = (f"{len(flagged)} effect(s) change sign between a persona's wordings" if flagged
                   else "No persona's effect changes sign between its wordings")
        parts.append(f"<h3>Wordings · {esc(task)} · {esc(model)}</h3>"
                     f'<p class="{"bad" if flagged else "ok"}"><strong>{esc(verdict)}.</strong></p>')
        if flagged:
            parts.append(f"<ul>{''.join(f'<li>{esc(wording_sentence(r))}</li>' for r in flagged)}</ul>")
        body = []
        for r in group:
            cells = "; ".join(f"{w.get('wording')}: {_signed(w.get('delta'))} [{_signed(w.get('ci_low'))}, "
                              f"{_signed(w.get('ci_high'))}]"
                              for w in r.get("wordings") or [] if isinstance(w, Mapping))
            body.append(f'<tr class="{"sig" if r.get("sign_differs") else ""}">'
                        f"<td>{esc(stratum_title(str(r.get('stratum'))))}</td><td>{esc(run.name(str(r.get('persona'))))}</td>"
                        f"<td>{esc(metric_title(str(r.get('metric'))))}</td><td>{esc(cells)}</td>"
                        f'<td class="num">{esc(_signed(r.get("spread")).lstrip("+"))}</td>'
                        f"<td>{'yes' if r.get('sign_differs') else 'no'}</td></tr>")
        declarations = {}
        for r in group:
            for w in r.get("wordings") or []:
                if isinstance(w, Mapping):
                    declarations[(str(r.get("persona")), w.get("wording"))] = w.get("declaration")
        listed = "".join(f"<li>{esc(run.name(p))} {esc(n)}: {esc(d)}</li>" for (p, n), d in declarations.items())
        parts.append('<details><summary>Each wording\'s effect against no persona (delta [95% interval])</summary>'
                     '<div class="table-wrap"><table class="kv wide"><thead><tr><th>stratum</th><th>persona</th>'
                     "<th>metric</th><th>wording: delta [interval]</th><th>spread</th><th>sign differs</th></tr>"
                     f"</thead><tbody>{''.join(body)}</tbody></table></div><p>The wordings:</p><ul>{listed}</ul>"
                     "</details>")
    return "".join(parts)


def _letters(run: Run, rows: Sequence[Mapping[str, Any]], calibration: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    calibrated = _grouped(calibration)
    for (model, task), group in _grouped(rows).items():
        flagged = [r for r in group if r.get("flagged")]
        verdict = (f"{', '.join(run.name(str(r['persona'])) for r in flagged)}: a letter preference beyond chance"
                   if flagged else "No persona prefers a letter beyond chance")
        letters = sorted({k for r in group for k in (r.get("letter_shares") or {})})
        parts.append(f"<h3>Answer letters · {esc(task)} · {esc(model)}</h3>"
                     f'<p class="{"bad" if flagged else "ok"}"><strong>{esc(verdict)}.</strong> Over the balanced '
                     "letter orders every level is shown under every letter equally often, so a model without a "
                     "letter preference writes each letter for the same share of its answers, whatever it "
                     "answers.</p>")
        body = []
        for r in group:
            shares = r.get("letter_shares") or {}
            after = r.get("calibrated_letter_shares") or {}
            balanced = ((r.get("balanced") or {}).get("all") or {})
            under = balanced.get("under_triage_rate") or {}
            accuracy = balanced.get("accuracy") or {}
            body.append(
                f'<tr class="{"sig" if r.get("flagged") else ""}"><td>{esc(run.name(str(r.get("persona"))))}</td>'
                + "".join(f'<td class="num">{esc(share(shares.get(k)))}</td>' for k in letters)
                + f'<td class="num">{esc(share(r.get("expected_share")))}</td>'
                + f'<td class="num">{esc(fmt_p(r.get("pvalue_adjusted")))}</td>'
                + f'<td class="num">{esc(" / ".join(share(after.get(k)) for k in letters) if after else DASH)}</td>'
                + f'<td class="num">{esc(_signed(accuracy.get("identity_delta")))} \u2192 '
                  f'{esc(_signed(accuracy.get("delta")))}</td>'
                + f'<td class="num">{esc(_signed(under.get("identity_delta")))} \u2192 '
                  f'{esc(_signed(under.get("delta")))}</td>'
                + "</tr>")
        heads = "".join(f"<th>{esc(k)}</th>" for k in letters)
        parts.append('<div class="table-wrap"><table class="kv wide"><thead><tr><th>persona</th>'
                     f"{heads}<th>expected</th><th>adjusted p</th>"
                     f"<th>after calibration ({esc(' / '.join(letters))})</th>"
                     "<th>accuracy effect: usual order \u2192 balanced</th>"
                     "<th>under-triage effect: usual order \u2192 balanced</th></tr></thead>"
                     f"<tbody>{''.join(body)}</tbody></table></div>")
        parts.append(_calibration(run, calibrated.get((model, task), [])))
    return "".join(parts)


def _calibration(run: Run, rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    body = []
    for r in rows:
        prior = r.get("prior") or {}
        for stratum, block in (r.get("strata") or {}).items():
            if not isinstance(block, Mapping):
                continue
            body.append(
                f"<tr><td>{esc(run.name(str(r.get('persona'))))}</td><td>{esc(stratum_title(str(stratum)))}</td>"
                f'<td class="num">{esc(" / ".join(f"{k} {share(v)}" for k, v in prior.items()) or DASH)}</td>'
                f'<td class="num">{esc(share(block.get("accuracy")))} \u2192 '
                f'{esc(share(block.get("calibrated_accuracy")))}</td>'
                f'<td class="num">{esc(_ece(block.get("expected_calibration_error")))} \u2192 '
                f'{esc(_ece(block.get("calibrated_expected_calibration_error")))}</td></tr>')
    return ("<p>The null-prompt calibration divides each case's label probabilities by the model's prior under "
            "the persona, read with the patient information replaced by a neutral stub, and renormalizes: "
            f"a preference for a letter that does not depend on the case is removed ({esc(BASELINE)} is calibrated "
            "with its own prior).</p>"
            '<div class="table-wrap"><table class="kv wide"><thead><tr><th>persona</th><th>stratum</th>'
            "<th>null-prompt prior</th><th>accuracy: raw \u2192 calibrated</th><th>ECE: raw \u2192 calibrated</th>"
            f"</tr></thead><tbody>{''.join(body)}</tbody></table></div>")


def _ece(value: Any) -> str:
    finite = number(value)
    return DASH if finite is None else f"{finite:.3f}"


def robustness_section(run: Run) -> Markup:
    """The section, or nothing when the run has no robustness block (older runs) or nothing to show."""
    block = run.summary.get("robustness")
    if not isinstance(block, Mapping):
        return Markup()
    if block.get("error"):
        return Markup('<section id="robustness"><h2>Is it the persona?</h2><p class="bad">The robustness '
                      f'analyses could not be computed: {esc(block["error"])}</p></section>')
    flips = [r for r in block.get("flips") or [] if isinstance(r, Mapping)]
    wordings = [r for r in block.get("wordings") or [] if isinstance(r, Mapping)]
    letters = [r for r in block.get("letters") or [] if isinstance(r, Mapping)]
    calibration = [r for r in block.get("calibration") or [] if isinstance(r, Mapping)]
    if not (flips or wordings or letters):
        return Markup()
    options = block.get("options") or {}
    off = [text for key, text in (("wordings", "--pe-wordings (each persona's other wordings)"),
                                   ("letter_bias", "--pe-letter-bias (letter orders and the null-prompt calibration)"))
           if not options.get(key)]
    parts = ['<section id="robustness"><h2>Is it the persona?</h2>',
             "<p>A persona's effect can be noise that any system sentence would cause, an artefact of one wording, "
             "or a preference for an answer letter. Each is measured here against a control.</p>"]
    parts.append(_flips(run, flips))
    parts.append(_wordings(run, wordings))
    parts.append(_letters(run, letters, calibration))
    if off:
        parts.append(f"<p class=\"note\">Not run: {esc('; '.join(off))}.</p>")
    parts.append("</section>")
    return Markup("".join(parts))
