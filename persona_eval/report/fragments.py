"""HTML pieces that several sections of the report share: key-value tables, the baseline switch and a
model's reply."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from persona_eval.personas import CONTROLS
from persona_eval.report.format import DASH, esc
from persona_eval.report.titles import BASELINE_TITLE

SIGNIFICANT_MARK = '<span class="mark" aria-label="significant">*</span>'


def reply_html(record: Mapping[str, Any], text_field: str) -> str:
    """A model's reply as a response record holds it: the reasoning trace collapsed ("Reasoning (N words)")
    above the final response. A record written before traces were kept apart shows its `text_field`
    whole. Everything is model text, escaped."""
    if "final_response" not in record:
        return f"<pre>{esc(record.get(text_field))}</pre>"
    reasoning = record.get("reasoning")
    final = record.get("final_response") or ""
    if not reasoning:
        return f"<pre>{esc(final)}</pre>"
    words = len(str(reasoning).split())
    trace = (f'<details class="trace"><summary>Reasoning ({words} word{"" if words == 1 else "s"})</summary>'
             f"<pre>{esc(reasoning)}</pre></details>")
    if not str(final).strip():
        return trace + '<p class="muted">no final response: the reply ended inside its reasoning</p>'
    return trace + f"<pre>{esc(final)}</pre>"


def kv_table(pairs: Sequence[tuple[str, Any]]) -> str:
    rows = "".join(f'<tr><th scope="row">{esc(k)}</th><td>{value_html(v)}</td></tr>' for k, v in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def value_html(value: Any) -> str:
    """A metadata value: a nested table for a mapping, a comma list for a list, code for anything else."""
    if isinstance(value, Mapping):
        return kv_table([(str(k), v) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return esc(", ".join(str(v) for v in value)) if value else DASH
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"<code>{esc(value)}</code>"


def baseline_select() -> str:
    """The control the differences are shown against; report.js shows the chosen one's spans."""
    options = "".join(f'<option value="{esc(b)}">{esc(BASELINE_TITLE[b])}</option>' for b in CONTROLS)
    return f'<label>Differences against <select id="baseline-select">{options}</select></label>'


def deltas_html(persona: str, span: Callable[[str], str]) -> str:
    """A cell's differences against every control, `span(baseline)` each; a control's own cell says
    "baseline" against itself."""
    return "".join(f'<span class="d" data-b="{esc(b)}"><span class="muted">baseline</span></span>'
                   if b == persona else span(b) for b in CONTROLS)


def delta_span(baseline: str, *, direction: str, significant: bool, title: str, difference: str, p: str,
               interval: str | None = None) -> str:
    """A difference against one control (shown while that control is chosen): the difference, a mark when
    it is significant, its p-value and, where given, its interval; `title` is the hover text and
    `direction` ("better", "worse", "changed") its colour."""
    mark = SIGNIFICANT_MARK if significant else ""
    ci = f'<span class="ci">{esc(interval)}</span>' if interval is not None else ""
    return (f'<span class="d {direction}{" sig" if significant else ""}" data-b="{esc(baseline)}" '
            f'title="{esc(title)}"><span class="dv">\u0394 {esc(difference)}{mark} '
            f'<span class="p">p {esc(p)}</span></span>{ci}</span>')
