"""The report's clinician review (RUN_DIR/review_results.json): which response the clinicians preferred,
how far they agree with each other, and how far with the LLM judges."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from markupsafe import Markup

from persona_eval.report.format import DASH, esc, fmt, fmt_p, number, ordered_unique, share
from persona_eval.report.run import mapping


def _threshold_title(name: str, thresholds: Mapping[str, Any]) -> str:
    minimum = number(thresholds.get(name))
    if name == "all" or minimum == 0:
        return "All annotations"
    return f"Confidence \u2265 {minimum:g}" if minimum is not None else name


def _count_and_share(block: Mapping[str, Any], key: str) -> str:
    count = block.get(key)
    return f"{count if count is not None else DASH} ({share(block.get(f'{key}_share'))})"


def _not_computable(reason: Any) -> str:
    text = str(reason or "no reason recorded")
    return text if text.startswith("not computable") else f"not computable: {text}"


def review_section(review: Any) -> Markup:
    """RUN_DIR/review_results.json (persona_eval.review.import_review): the clinicians' preferences by
    confidence threshold, their agreement with each other, and with the judges."""
    parts = ['<section id="review"><h2>Clinician review</h2>']
    if not isinstance(review, Mapping) or review.get("error"):
        reason = review.get("error") if isinstance(review, Mapping) else "not a JSON object"
        parts.append(f'<p class="bad">The clinician review results could not be read: {esc(reason)}</p></section>')
        return Markup("".join(parts))
    thresholds = mapping(review.get("thresholds"))
    preference = mapping(review.get("preference"))
    kappas = mapping(review.get("clinician_kappa"))
    agreement = mapping(review.get("judge_agreement"))
    names = ordered_unique([*thresholds, *preference, *kappas, *agreement])
    annotators = review.get("annotators")
    annotator_text = ", ".join(str(a) for a in annotators) if isinstance(annotators, list) and annotators else DASH
    unannotated = review.get("unannotated_pairs")
    parts.append(f'<p class="muted">{esc(review.get("n_annotations", DASH))} annotations by '
                 f"{len(annotators) if isinstance(annotators, list) else DASH} clinicians ({esc(annotator_text)}) "
                 f"of {esc(review.get('n_pairs', DASH))} blinded pairs: the response of the persona every judge "
                 "put on top and that of the best-ranked persona of the other group (medical / non-medical), to the "
                 "same query, sides randomized, personas and models hidden."
                 + (f" {len(unannotated)} pairs were not annotated." if isinstance(unannotated, list) and unannotated
                    else "") + "</p>")
    rows = []
    for name in names:
        for task, block in mapping(preference.get(name)).items():
            block = mapping(block)
            rows.append(f"<tr><td>{esc(_threshold_title(name, thresholds))}</td>"
                        f"<td>{esc('all tasks' if task == 'all' else task)}</td><td>{esc(block.get('n', DASH))}</td>"
                        f"<td>{esc(_count_and_share(block, 'medical'))}</td>"
                        f"<td>{esc(_count_and_share(block, 'non_medical'))}</td>"
                        f"<td>{esc(_count_and_share(block, 'tie'))}</td></tr>")
    parts.append("<h3>Which response the clinicians preferred, by confidence</h3>")
    parts.append('<div class="table-wrap"><table class="kv wide" id="review-preference"><thead><tr><th>annotations'
                 "</th><th>task</th><th>n</th><th>medical persona preferred</th><th>non-medical persona preferred"
                 f'</th><th>tie</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>' if rows
                 else '<p class="muted">No preference table in the review results.</p>')
    rows = []
    for name in names:
        entries = kappas.get(name)
        for entry in entries if isinstance(entries, list) else []:
            entry = mapping(entry)
            pair = entry.get("annotators")
            pair_text = " vs ".join(str(a) for a in pair) if isinstance(pair, list) and pair else DASH
            kappa = number(entry.get("kappa"))
            value = (f"<td>{esc(fmt('kappa', kappa))}</td><td>{esc(fmt_p(entry.get('pvalue')))}</td>"
                     if kappa is not None else f'<td colspan="2">{esc(_not_computable(entry.get("reason")))}</td>')
            rows.append(f"<tr><td>{esc(_threshold_title(name, thresholds))}</td><td>{esc(pair_text)}</td>{value}"
                        f"<td>{esc(entry.get('n', DASH))}</td></tr>")
    parts.append("<h3>Agreement between clinicians</h3>")
    parts.append('<div class="table-wrap"><table class="kv wide" id="review-kappa"><thead><tr><th>annotations</th>'
                 "<th>clinicians</th><th>Cohen's \u03ba (left / right / tie)</th><th>p</th><th>pairs rated by both"
                 f'</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>' if rows
                 else '<p class="muted">No clinician kappas in the review results.</p>')
    rows = []
    for name in names:
        if name not in agreement:
            continue
        entry = mapping(agreement[name])
        kappa = number(entry.get("kappa"))
        rows.append(f"<tr><td>{esc(_threshold_title(name, thresholds))}</td><td>{esc(entry.get('n', DASH))}</td>"
                    f"<td>{esc(entry.get('agree', DASH))} ({esc(share(entry.get('agreement')))})</td>"
                    f"<td>{esc(entry.get('ties', DASH))}</td>"
                    f"<td>{esc(share(entry.get('agreement_excluding_ties')))}</td>"
                    + (f"<td>{esc(fmt('kappa', kappa))}</td><td>{esc(fmt_p(entry.get('pvalue')))}</td>"
                       if kappa is not None else f'<td colspan="2">{esc(_not_computable(entry.get("reason")))}</td>')
                    + "</tr>")
    parts.append("<h3>Agreement of the LLM judges with the clinicians</h3>")
    parts.append('<div class="table-wrap"><table class="kv wide" id="review-judges"><thead><tr><th>annotations</th>'
                 "<th>n</th><th>clinician chose the judges' side</th><th>ties</th><th>agreement without ties</th>"
                 "<th>Cohen's \u03ba (judges vs clinicians)</th><th>p</th></tr></thead>"
                 f'<tbody>{"".join(rows)}</tbody></table></div>' if rows
                 else '<p class="muted">No judge-clinician agreement in the review results.</p>')
    files = review.get("files")
    if isinstance(files, list) and files:
        listed = "".join(f"<li><code>{esc(f)}</code></li>" for f in files)
        parts.append(f"<details><summary>Annotation files ({len(files)})</summary><ul>{listed}</ul></details>")
    parts.append("</section>")
    return Markup("".join(parts))
