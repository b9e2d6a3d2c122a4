"""The minimum detectable effect of a comparison that is not significant, in words, for every report format."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from persona_eval.tasks import metric_text

__all__ = ["mde_phrase"]

_DEFAULT_DECIMALS = 2


def _rounded_up(metric: str, value: float) -> str:
    """`value` with the metric's decimals, rounded up: a run that detects 0.304 does not detect 0.30."""
    text_of = metric_text(metric)
    decimals = text_of.decimals if text_of else _DEFAULT_DECIMALS
    scale = 10 ** decimals
    # The small allowance keeps a value that is already round (0.31 as 0.31000000000000005) from going up.
    return f"{math.ceil(value * scale - 1e-9) / scale:.{decimals}f}"


def mde_phrase(comparison: Mapping[str, Any], *, short: bool = False) -> str | None:
    """What a comparison that is not significant could have detected: ``"not significant; could detect >=
    0.31"`` (``short``: ``"could detect >= 0.31"``), the comparison's ``mde`` in its metric's units and
    decimals, rounded up. ``"not significant; too few cases to detect any difference"`` when its ``mde``
    is None because no difference is detectable on its cases.

    None when there is nothing to say: a significant comparison, one without a p-value, or one made
    before comparisons carried an ``mde``.

    >>> mde_phrase({"metric": "accuracy", "significant": False, "mde": 0.3042})
    'not significant; could detect >= 0.31'
    >>> mde_phrase({"metric": "consistency_rate", "significant": False, "mde": 12.2}, short=True)
    'could detect >= 13'
    >>> mde_phrase({"metric": "accuracy", "significant": True, "mde": 0.08}) is None
    True
    """
    if comparison.get("significant") is not False or "mde" not in comparison:
        return None
    mde = comparison.get("mde")
    if isinstance(mde, bool) or not isinstance(mde, (int, float)) or not math.isfinite(mde):
        text = "too few cases to detect any difference"
    else:
        text = f"could detect >= {_rounded_up(str(comparison.get('metric')), float(mde))}"
    return text if short else f"not significant; {text}"
