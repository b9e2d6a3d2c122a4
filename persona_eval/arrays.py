"""Input checks shared by the metrics and the statistics: a sequence of values as a list."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["as_1d_list", "describe"]


def describe(value: Any) -> str:
    """`value`'s repr, cut to 60 characters for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def as_1d_list(values: Any, name: str, *, what: str = "a sequence") -> list[Any]:
    """`values` as a list, refusing a bare string (a common slip: "ABC" is not three labels) and an array
    of more than one dimension. `name` and `what` ("a sequence of labels") word the error."""
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{name} must be {what}, got the string {describe(values)}")
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional, got an array of shape {values.shape}")
        return values.tolist()
    try:
        return list(values)
    except TypeError:
        raise ValueError(f"{name} must be {what}, got {type(values).__name__}") from None
