"""HTML pieces that several sections of the report share: key-value tables and the baseline switch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from persona_eval.personas import CONTROLS
from persona_eval.report.format import DASH, esc
from persona_eval.report.titles import BASELINE_TITLE

SIGNIFICANT_MARK = '<span class="mark" aria-label="significant">*</span>'


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


def baseline_span(baseline: str) -> str:
    """What a control's own cell shows against itself."""
    return f'<span class="d" data-b="{esc(baseline)}"><span class="muted">baseline</span></span>'
