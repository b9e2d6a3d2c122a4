"""Hand-written inline SVG for the report's figures: the element helpers and axis arithmetic they share."""

from __future__ import annotations

import math

from persona_eval.report.format import MINUS, esc


def coord(x: float) -> str:
    """A coordinate or length: one decimal is finer than a pixel and keeps the page small."""
    return f"{x:.1f}"


def nice_limit(value: float, floor: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k at or above max(value, floor)."""
    value = max(value, floor)
    exponent = math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        candidate = step * 10.0 ** exponent
        if candidate >= value - 1e-12:
            return candidate
    return 10.0 ** (exponent + 1)


def svg_open(width: float, height: float, label: str) -> str:
    """The opening tag of a figure, labelled for screen readers and as its tooltip."""
    return (f'<svg class="fig" viewBox="0 0 {coord(width)} {coord(height)}" '
            f'width="{coord(width)}" height="{coord(height)}" role="img" aria-label="{esc(label)}">'
            f"<title>{esc(label)}</title>")


def svg_text(x: float, y: float, content: str, *, anchor: str = "start", css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    return f'<text x="{coord(x)}" y="{coord(y)}" text-anchor="{anchor}"{cls}>{esc(content)}</text>'


def tick_label(value: float) -> str:
    """An axis label: as few digits as the value needs, signed ("+0.25", "\u22125", "0")."""
    return "0" if value == 0 else f"{value:+g}".replace("-", MINUS)
