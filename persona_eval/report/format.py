"""How the HTML report writes values: escaping, numbers, differences, p-values, shares and durations."""

from __future__ import annotations

import html
import math
from collections.abc import Hashable, Iterable, Mapping
from typing import Any, TypeVar

from persona_eval.tasks import metric_text

_T = TypeVar("_T", bound=Hashable)

DASH = "\u2013"  # what an undefined value shows
MINUS = "\u2212"
_DEFAULT_DECIMALS = 2


def esc(value: Any) -> str:
    """Text for HTML content or a double-quoted attribute value."""
    return html.escape("" if value is None else str(value), quote=True)


def number(value: Any) -> float | None:
    """A finite float, or None (JSON null, NaN, text, a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    result = float(value)
    return result if math.isfinite(result) else None


def fmt(metric: str, value: Any, *, signed: bool = False) -> str:
    """A metric's value (or, signed, a difference in it) with the metric's number of decimals."""
    finite = number(value)
    if finite is None:
        return DASH
    text_of = metric_text(metric)
    decimals = text_of.decimals if text_of else _DEFAULT_DECIMALS
    pattern = f"{{:{'+' if signed else ''}.{decimals}f}}"
    text = pattern.format(finite)
    if text.lstrip("+-").strip("0.") == "":  # "-0.00" and "+0.00" read as 0
        text = pattern.format(0.0)
    return text.replace("-", MINUS)


def fmt_p(value: Any) -> str:
    finite = number(value)
    if finite is None:
        return DASH
    return "<0.001" if finite < 0.001 else f"{finite:.3f}"


def share(value: Any, digits: int = 0) -> str:
    """A fraction as a percentage ("42%")."""
    finite = number(value)
    return DASH if finite is None else f"{finite * 100:.{digits}f}%"


def duration(seconds: Any) -> str:
    finite = number(seconds)
    if finite is None:
        return DASH
    minutes, rest = divmod(finite, 60)
    return f"{int(minutes)} min {rest:.0f} s" if minutes else f"{rest:.1f} s"


def unavailable(note: str | None) -> bool:
    """Whether a metric's note says the model cannot give it (no log-probabilities), not that it is undefined."""
    return bool(note) and "not available" in str(note)


def cell_text(value: Any, note: str | None, metric: str) -> str:
    """A metric's value in a table cell: the number, "n/a" (not available) or a dash (undefined)."""
    if number(value) is None:
        return "n/a" if unavailable(note) else DASH
    return fmt(metric, value)


def ci_text(comparison: Mapping[str, Any]) -> str:
    """A paired comparison's confidence interval ("95% CI +0.01 to +0.20")."""
    metric = str(comparison.get("metric"))
    level = number(comparison.get("confidence_level"))
    label = f"{level * 100:.0f}% CI" if level is not None else "CI"
    low, high = number(comparison.get("ci_low")), number(comparison.get("ci_high"))
    if low is None or high is None:
        return f"{label} {DASH}"
    return f"{label} {fmt(metric, low, signed=True)} to {fmt(metric, high, signed=True)}"


def slug(*parts: Any) -> str:
    """An id for anchors: letters, digits and dashes only (derived from escaped-anyway names)."""
    text = "-".join(str(p) for p in parts).lower()
    return "".join(c if c.isalnum() else "-" for c in text)


def ordered_unique(items: Iterable[_T]) -> list[_T]:
    """The items in first-seen order, each once."""
    return list(dict.fromkeys(items))
