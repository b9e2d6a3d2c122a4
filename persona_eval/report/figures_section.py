"""The report's triage figures (inline SVG): differences from no persona with their intervals, risk
propensity and sensitivity by persona, reliability diagrams and confusion matrices."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from markupsafe import Markup

from persona_eval.metrics import METRICS
from persona_eval.personas import BASELINE
from persona_eval.report.format import DASH, cell_text, ci_text, esc, fmt, fmt_p, number, unavailable
from persona_eval.report.run import Run
from persona_eval.report.svg import coord, nice_limit, svg_open, svg_text, tick_label
from persona_eval.report.titles import metric_title, stratum_title
from persona_eval.tasks import spec_of

_DELTA_FIGURE_METRICS = ("accuracy", "expected_calibration_error", "consistency_rate")
_PERSONA_FIGURE_METRICS = ("risk_propensity", "risk_sensitivity")


def _hint(metric: str) -> str:
    info = METRICS.get(metric)
    if info is None or info.higher_is_better is None:
        return "\u2190 lower \u00b7 higher \u2192"
    return "\u2190 worse \u00b7 better \u2192" if info.higher_is_better else "\u2190 better \u00b7 worse \u2192"


def _delta_figure(run: Run, model: str, task: str, metric: str, strata: list[str]) -> str:
    personas = [p for p in run.personas_of(model, task) if p != BASELINE]
    entries = {(s, p): run.comparison(model, task, s, metric, p, BASELINE) for s in strata for p in personas}
    extent = 0.0
    for comparison in entries.values():
        for key in ("delta", "ci_low", "ci_high"):
            value = number(comparison.get(key)) if comparison else None
            if value is not None:
                extent = max(extent, abs(value))
    floor = 5.0 if metric == "consistency_rate" else 0.02 if metric == "expected_calibration_error" else 0.05
    limit = nice_limit(extent, floor)
    label_w, panel_w, gap, row_h, top, bottom = 170.0, 220.0, 34.0, 24.0, 34.0, 46.0
    width = label_w + len(strata) * (panel_w + gap)
    height = top + row_h * max(len(personas), 1) + bottom
    title = f"{metric_title(metric)}: difference from no persona, by stratum ({model})"
    out = [svg_open(width, height, title)]
    for i, persona in enumerate(personas):
        y = top + row_h * (i + 0.5)
        out.append(svg_text(label_w - 8, y + 4, run.name(persona), anchor="end", css="lab"))
    for s_index, stratum in enumerate(strata):
        x0 = label_w + s_index * (panel_w + gap)

        def x(value: float, x0: float = x0) -> float:
            return x0 + (value + limit) / (2 * limit) * panel_w

        out.append(svg_text(x0 + panel_w / 2, 16, stratum_title(stratum), anchor="middle", css="ptitle"))
        out.append(f'<rect x="{coord(x0)}" y="{coord(top - 6)}" width="{coord(panel_w)}" '
                   f'height="{coord(row_h * len(personas) + 12)}" class="panel"/>')
        for tick in (-limit, -limit / 2, 0.0, limit / 2, limit):
            tx = x(tick)
            css = "zero" if tick == 0 else "grid"
            out.append(f'<line x1="{coord(tx)}" y1="{coord(top - 6)}" x2="{coord(tx)}" '
                       f'y2="{coord(top + row_h * len(personas) + 6)}" class="{css}"/>')
            # The outer labels lean inwards so that neighbouring panels' labels never collide.
            anchor = "start" if tick == -limit else "end" if tick == limit else "middle"
            out.append(svg_text(tx, top + row_h * len(personas) + 20, tick_label(tick), anchor=anchor, css="tick"))
        out.append(svg_text(x0 + panel_w / 2, top + row_h * len(personas) + 38, _hint(metric), anchor="middle",
                            css="hint"))
        for i, persona in enumerate(personas):
            y = top + row_h * (i + 0.5)
            comparison = entries[(stratum, persona)]
            delta = number(comparison.get("delta")) if comparison else None
            if comparison is None or delta is None:
                out.append(svg_text(x(0.0) + 6, y + 4, DASH if comparison else "no comparison", css="tick"))
                continue
            colour = run.colour(persona)
            significant = bool(comparison.get("significant"))
            tip = (f"{run.name(persona)}, {stratum_title(stratum)}: {fmt(metric, delta, signed=True)} "
                   f"({ci_text(comparison)}), adjusted p {fmt_p(comparison.get('pvalue_adjusted'))}"
                   f"{', significant' if significant else ''}")
            out.append(f"<g><title>{esc(tip)}</title>")
            low, high = number(comparison.get("ci_low")), number(comparison.get("ci_high"))
            if low is not None and high is not None:
                lx, hx = x(max(low, -limit)), x(min(high, limit))
                out.append(f'<line x1="{coord(lx)}" y1="{coord(y)}" x2="{coord(hx)}" y2="{coord(y)}" stroke="{colour}" '
                           'stroke-width="2"/>')
                for cap in (lx, hx):
                    out.append(f'<line x1="{coord(cap)}" y1="{coord(y - 5)}" x2="{coord(cap)}" y2="{coord(y + 5)}" '
                               f'stroke="{colour}" stroke-width="2"/>')
            fill = colour if significant else "#ffffff"
            out.append(f'<circle cx="{coord(x(delta))}" cy="{coord(y)}" r="5" fill="{fill}" stroke="{colour}" '
                       'stroke-width="2"/></g>')
    out.append("</svg>")
    return "".join(out)


def _persona_bars(run: Run, model: str, task: str, metric: str, strata: list[str]) -> str:
    personas = run.personas_of(model, task)
    label_w, panel_w, gap, row_h, top, bottom = 170.0, 200.0, 18.0, 22.0, 34.0, 30.0
    width = label_w + len(strata) * (panel_w + gap)
    height = top + row_h * max(len(personas), 1) + bottom
    out = [svg_open(width, height, f"{metric_title(metric)} by persona and stratum ({model})")]
    for i, persona in enumerate(personas):
        out.append(svg_text(label_w - 8, top + row_h * (i + 0.5) + 4, run.name(persona), anchor="end", css="lab"))
    info = METRICS.get(metric)
    upper = info.upper if info else 1.0
    for s_index, stratum in enumerate(strata):
        x0 = label_w + s_index * (panel_w + gap)
        plot_w = panel_w - 36  # room for the value label

        def x(value: float, x0: float = x0, plot_w: float = plot_w) -> float:
            return x0 + value / upper * plot_w

        out.append(svg_text(x0 + panel_w / 2, 16, stratum_title(stratum), anchor="middle", css="ptitle"))
        bottom_y = top + row_h * len(personas)
        for tick in (0.0, upper / 2, upper):
            out.append(f'<line x1="{coord(x(tick))}" y1="{coord(top - 4)}" x2="{coord(x(tick))}" '
                       f'y2="{coord(bottom_y + 4)}" class="grid"/>')
            out.append(svg_text(x(tick), bottom_y + 18, fmt(metric, tick), anchor="middle", css="tick"))
        baseline_row = run.rows.get((model, task, stratum, BASELINE))
        baseline_value = number(baseline_row["metrics"].get(metric)) if baseline_row else None
        for i, persona in enumerate(personas):
            row = run.rows.get((model, task, stratum, persona))
            y = top + row_h * i + 4
            value = number(row["metrics"].get(metric)) if row else None
            if value is None:
                note = (row.get("notes") or {}).get(metric) if row else None
                out.append(svg_text(x0 + 4, y + 12, "n/a" if unavailable(note) else f"{DASH} (undefined)",
                                    css="tick"))
                continue
            colour = run.colour(persona)
            tip = f"{run.name(persona)}, {stratum_title(stratum)}: {fmt(metric, value)}"
            out.append(f'<g><title>{esc(tip)}</title><rect x="{coord(x0)}" y="{coord(y)}" '
                       f'width="{coord(max(x(value) - x0, 0.0))}" height="{coord(row_h - 8)}" fill="{colour}"/>')
            out.append(svg_text(x(value) + 4, y + 11, fmt(metric, value), css="val") + "</g>")
        if baseline_value is not None:
            bx = x(baseline_value)
            out.append(f'<line x1="{coord(bx)}" y1="{coord(top - 4)}" x2="{coord(bx)}" y2="{coord(bottom_y + 4)}" '
                       'class="ref"><title>no persona</title></line>')
    out.append("</svg>")
    return "".join(out)


def _reliability_svg(bins: Any, colour: str, label: str, note: str | None) -> str:
    size, margin_l, margin_b, margin_t = 130.0, 36.0, 26.0, 8.0
    width, height = margin_l + size + 10, margin_t + size + margin_b
    out = [svg_open(width, height, label)]

    def px(value: float) -> float:
        return margin_l + value * size

    def py(value: float) -> float:
        return margin_t + (1 - value) * size

    out.append(f'<rect x="{coord(px(0))}" y="{coord(py(1))}" width="{coord(size)}" height="{coord(size)}" '
               'class="panel"/>')
    for tick in (0.0, 0.5, 1.0):
        out.append(svg_text(px(tick), height - 12, f"{tick:g}", anchor="middle", css="tick"))
        out.append(svg_text(margin_l - 4, py(tick) + 3, f"{tick:g}", anchor="end", css="tick"))
    out.append(svg_text(px(0.5), height - 1, "confidence", anchor="middle", css="tick"))
    out.append(f'<text x="9" y="{coord(py(0.5))}" text-anchor="middle" class="tick" '
               f'transform="rotate(-90 9 {coord(py(0.5))})">accuracy</text>')
    out.append(f'<line x1="{coord(px(0))}" y1="{coord(py(0))}" x2="{coord(px(1))}" y2="{coord(py(1))}" class="diag"/>')
    if not isinstance(bins, list):
        out.append(svg_text(px(0.5), py(0.55), "n/a" if unavailable(note) else DASH, anchor="middle", css="lab"))
        out.append("</svg>")
        return "".join(out)
    filled = [b for b in bins if isinstance(b, Mapping) and b.get("count")]
    largest = max((int(b["count"]) for b in filled), default=1)
    for b in filled:
        lo, hi = number(b.get("lo")), number(b.get("hi"))
        accuracy, confidence = number(b.get("accuracy")), number(b.get("mean_confidence"))
        if None in (lo, hi, accuracy, confidence):
            continue
        assert lo is not None and hi is not None and accuracy is not None and confidence is not None
        tip = (f"confidence {lo:.1f}-{hi:.1f}: {b['count']} cases, mean confidence {confidence:.3f}, "
               f"accuracy {accuracy:.3f}")
        radius = 2.5 + 4.0 * math.sqrt(int(b["count"]) / largest)
        out.append(f'<g><title>{esc(tip)}</title><rect x="{coord(px(lo))}" y="{coord(py(accuracy))}" '
                   f'width="{coord((hi - lo) * size)}" height="{coord(accuracy * size)}" fill="{colour}" '
                   'fill-opacity="0.25" stroke="none"/>'
                   f'<circle cx="{coord(px(confidence))}" cy="{coord(py(accuracy))}" r="{coord(radius)}" '
                   f'fill="{colour}"/></g>')
    if not filled:
        out.append(svg_text(px(0.5), py(0.55), "no cases", anchor="middle", css="lab"))
    out.append("</svg>")
    return "".join(out)


def _confusion_svg(matrix: Any, label: str, labels: tuple[str, ...]) -> str:
    cell, left, top = 30.0, 24.0, 18.0
    columns = (*labels, "none")
    if not (isinstance(matrix, list) and matrix and all(isinstance(r, list) for r in matrix)):
        out = [svg_open(left + cell * len(columns) + 4, top + cell * len(labels) + 4, label),
               svg_text(left + cell * 2, top + cell * 1.5, DASH, anchor="middle", css="lab"), "</svg>"]
        return "".join(out)
    n_rows = len(matrix)
    n_cols = max(len(r) for r in matrix)
    width, height = left + cell * n_cols + 4, top + cell * n_rows + 4
    out = [svg_open(width, height, label)]
    row_names = list(labels) if n_rows == len(labels) else [str(i) for i in range(n_rows)]
    col_names = list(columns) if n_cols == len(columns) else [str(i) for i in range(n_cols)]
    for j, name in enumerate(col_names):
        out.append(svg_text(left + cell * (j + 0.5), top - 5, name if name != "none" else "\u2205", anchor="middle",
                            css="tick"))
    for i, row in enumerate(matrix):
        out.append(svg_text(left - 6, top + cell * (i + 0.5) + 4, row_names[i], anchor="end", css="tick"))
        total = sum(int(v) for v in row if isinstance(v, (int, float))) or 1
        for j in range(n_cols):
            count = int(row[j]) if j < len(row) and isinstance(row[j], (int, float)) else 0
            share = count / total
            kind = ("none" if j >= n_rows else "hit" if i == j else "under" if j < i else "over")
            tip = f"reference {row_names[i]}, predicted {col_names[j]}: {count} of {total}"
            out.append(f'<g><title>{esc(tip)}</title><rect x="{coord(left + cell * j)}" y="{coord(top + cell * i)}" '
                       f'width="{coord(cell - 2)}" height="{coord(cell - 2)}" class="cm {kind}" '
                       f'fill-opacity="{0.08 + 0.92 * share:.2f}"/>')
            css = "cmv dark" if share > 0.55 else "cmv"
            out.append(svg_text(left + cell * (j + 0.5) - 1, top + cell * (i + 0.5) + 4, str(count), anchor="middle",
                                css=css) + "</g>")
    out.append("</svg>")
    return "".join(out)


def _figure_grid(run: Run, model: str, task: str, strata: list[str], kind: str) -> str:
    personas = run.personas_of(model, task)
    key = "reliability" if kind == "reliability" else "confusion_matrix"
    if not any(key in (row.get("figures") or {}) for (m, t, _, _), row in run.rows.items()
               if m == model and t == task):
        what = "reliability bins" if kind == "reliability" else "confusion matrices"
        return f'<p class="muted">This run\'s summary holds no {what} (it was written before they were recorded).</p>'
    head = "".join(f"<th>{esc(stratum_title(s))}</th>" for s in strata)
    body = []
    for persona in personas:
        cells = []
        for stratum in strata:
            row = run.rows.get((model, task, stratum, persona))
            figures = (row.get("figures") or {}) if row else {}
            label = f"{run.name(persona)}, {stratum_title(stratum)}"
            if kind == "reliability":
                note = (row.get("notes") or {}).get("expected_calibration_error") if row else None
                ece = row["metrics"].get("expected_calibration_error") if row else None
                svg = _reliability_svg(figures.get("reliability"), run.colour(persona),
                                       f"Reliability diagram: {label}", note)
                caption = f"ECE {cell_text(ece, note, 'expected_calibration_error')}"
            else:
                svg = _confusion_svg(figures.get("confusion_matrix"), f"Confusion matrix: {label}", run.labels(task))
                caption = f"n {row.get('n', DASH)}" if row else DASH
            cells.append(f'<td>{svg}<div class="cap">{esc(caption)}</div></td>')
        body.append(f'<tr><th scope="row">{esc(run.name(persona))}</th>{"".join(cells)}</tr>')
    return (f'<div class="table-wrap"><table class="figgrid"><thead><tr><th></th>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _rows_text(task: str) -> str:
    """"reference level of care (A self-care, B primary care, C emergency)": the spec's short label names."""
    spec = spec_of(task) or spec_of("triage")
    if spec is None:
        return "reference answer"
    names = ", ".join(f"{label} {spec.label_names[label]}" for label in spec.labels if label in spec.label_names)
    return f"reference {spec.answer_noun}" + (f" ({names})" if names else "")


def figures_section(run: Run) -> Markup:
    parts = ['<section id="figures"><h2>Figures</h2>']
    for model, task in run.model_tasks():
        if not run.labels(task):
            continue  # the figures of a classification task
        strata = run.strata(model, task)
        metrics = run.metrics_of(model, task)
        parts.append(f"<h3>{esc(task)} \u00b7 {esc(model)}</h3>")
        parts.append("<h4>Difference from no persona, with confidence intervals</h4>")
        if run.has_comparisons:
            parts.append('<p class="muted">Filled dot: significant after adjustment; hollow: not significant. '
                         "Whiskers: the confidence interval of the paired difference.</p>")
            for metric in _DELTA_FIGURE_METRICS:
                if metric in metrics:
                    parts.append(f"<figure><figcaption>{esc(metric_title(metric))}</figcaption>"
                                 f"{_delta_figure(run, model, task, metric, strata)}</figure>")
        else:
            parts.append('<p class="muted">No paired comparisons in this run\'s summary.</p>')
        parts.append("<h4>Risk propensity and risk sensitivity by persona</h4>"
                     '<p class="muted">Dashed line: the no-persona value. Risk propensity: share of answers that '
                     "send the patient to emergency care. Risk sensitivity: of the wrong answers, the share that "
                     "err towards more urgent care.</p>")
        for metric in _PERSONA_FIGURE_METRICS:
            if metric in metrics:
                parts.append(f"<figure><figcaption>{esc(metric_title(metric))}</figcaption>"
                             f"{_persona_bars(run, model, task, metric, strata)}</figure>")
        parts.append("<h4>Reliability diagrams</h4>"
                     '<p class="muted">Accuracy against the model\'s confidence in its most likely answer, in '
                     "ten bins; dot size follows the number of cases; on the diagonal the model is calibrated."
                     "</p>")
        parts.append(_figure_grid(run, model, task, strata, "reliability"))
        parts.append("<h4>Confusion matrices</h4>"
                     f'<p class="muted">Rows: {esc(_rows_text(task))}; '
                     "columns: the answer given (\u2205 unreadable). "
                     '<span class="k hit">correct</span> <span class="k under">under-triage</span> '
                     '<span class="k over">over-triage</span> <span class="k none">unreadable</span>; '
                     "shade: share of the row.</p>")
        parts.append(_figure_grid(run, model, task, strata, "confusion"))
    parts.append("</section>")
    return Markup("".join(parts))
