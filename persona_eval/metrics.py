"""Triage metrics as pure functions: label arrays (and label distributions) in, a plain float out."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Literal, SupportsFloat, TypeAlias

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "METRICS",
    "MetricInfo",
    "accuracy",
    "brier_score",
    "confusion_matrix",
    "consistency_rate",
    "expected_calibration_error",
    "over_triage_rate",
    "parse_rate",
    "reliability_bins",
    "risk_propensity",
    "risk_sensitivity",
    "under_triage_rate",
]

# The triage labels in urgency order: A = stay home / self-care, B = routine or primary care,
# C = emergency. Kept here rather than imported so that `metrics` depends on nothing of the project.
TRIAGE_LABELS: tuple[str, ...] = ("A", "B", "C")

# A sequence of labels, None where an answer could not be parsed.
LabelArray: TypeAlias = "Sequence[Hashable | None] | np.ndarray"

# How far a probability row may sum from 1 and still count as a distribution.
DISTRIBUTION_TOLERANCE = 1e-6

_NAN = float("nan")


# --- input checks ---------------------------------------------------------------------------------

def _check_labels(labels: Sequence[Hashable]) -> dict[Hashable, int]:
    """The urgency rank of each label, after checking `labels` is a usable label order."""
    if isinstance(labels, (str, bytes)) or not isinstance(labels, (Sequence, np.ndarray)):
        raise ValueError(f"labels must be a sequence of labels in urgency order, got {labels!r}")
    labels = list(labels)
    try:
        rank = {label: i for i, label in enumerate(labels)}
    except TypeError:
        raise ValueError(f"labels must be hashable (strings such as 'A'), got {labels!r}") from None
    if None in rank:
        raise ValueError(f"labels must not contain None (None marks an unparsable answer), got {labels!r}")
    if len(rank) != len(labels):
        raise ValueError(f"labels must be distinct, got {labels!r}")
    if len(labels) < 2:
        raise ValueError(f"labels must hold at least two labels, got {labels!r}")
    return rank


def _as_list(values: LabelArray, name: str) -> list[Any]:
    """`values` as a list, refusing a bare string (a common slip: "ABC" is not three labels)."""
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of labels, got the string {values!r}")
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional, got an array of shape {values.shape}")
        return values.tolist()
    try:
        return list(values)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of labels, got {type(values).__name__}") from None


def _encode(values: LabelArray, name: str, rank: dict[Hashable, int], *, allow_none: bool) -> np.ndarray:
    """Urgency ranks of `values` (-1 for None), checking every entry is a known label."""
    items = _as_list(values, name)
    codes = np.empty(len(items), dtype=np.int64)
    for i, value in enumerate(items):
        if value is None:
            if not allow_none:
                raise ValueError(f"{name}[{i}] is None; {name} holds reference labels, which must be known")
            codes[i] = -1
            continue
        try:
            codes[i] = rank[value]
        except (KeyError, TypeError):
            allowed = ", ".join(repr(label) for label in rank)
            extra = " or None" if allow_none else ""
            raise ValueError(f"{name}[{i}] is {value!r}, which is not one of the labels ({allowed}){extra}") \
                from None
    return codes


def _check_same_length(first: np.ndarray, first_name: str, second: np.ndarray, second_name: str) -> None:
    if len(first) != len(second):
        raise ValueError(f"{first_name} and {second_name} must have the same length, "
                         f"got {len(first)} and {len(second)}")


def _encode_pair(y_true: LabelArray, y_pred: LabelArray,
                 labels: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray]:
    rank = _check_labels(labels)
    true = _encode(y_true, "y_true", rank, allow_none=False)
    pred = _encode(y_pred, "y_pred", rank, allow_none=True)
    _check_same_length(true, "y_true", pred, "y_pred")
    return true, pred


def _check_probs(probs: ArrayLike, n_labels: int) -> np.ndarray:
    """`probs` as a float array of shape (cases, labels) whose rows are distributions."""
    try:
        array = np.asarray(probs, dtype=float)
    except (TypeError, ValueError) as error:
        raise ValueError(f"probs must be a 2-D array of numbers, one row per case; could not read it: "
                         f"{error}") from None
    if array.size == 0:
        return np.zeros((0, n_labels))
    if array.ndim != 2 or array.shape[1] != n_labels:
        raise ValueError(f"probs must have shape (cases, {n_labels}): one row per case and one column per "
                         f"label, got shape {array.shape}")
    bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if bad.size:
        raise ValueError(f"probs[{bad[0]}] is {array[bad[0]].tolist()}: probabilities must be finite")
    bad = np.flatnonzero((array < 0).any(axis=1))
    if bad.size:
        raise ValueError(f"probs[{bad[0]}] is {array[bad[0]].tolist()}: probabilities must be non-negative")
    sums = array.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > DISTRIBUTION_TOLERANCE)
    if bad.size:
        row = bad[0]
        raise ValueError(f"probs[{row}] is {array[row].tolist()}, which sums to {float(sums[row])!r}: "
                         f"each row must be a distribution (sum to 1 within {DISTRIBUTION_TOLERANCE})")
    return array


def _check_n_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, Integral) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    return int(n_bins)


def _ratio(numerator: SupportsFloat, denominator: SupportsFloat) -> float:
    """numerator / denominator as a builtin float, NaN when the denominator is 0 (undefined)."""
    return float(numerator) / float(denominator) if float(denominator) != 0 else _NAN


# --- label metrics --------------------------------------------------------------------------------

def accuracy(y_true: LabelArray, y_pred: LabelArray, *,
             labels: Sequence[Hashable] = TRIAGE_LABELS) -> float:
    """Share of cases whose predicted label equals the reference label.

    ``accuracy = #{i : y_pred[i] == y_true[i]} / N``

    An unparsable prediction (None) counts as wrong, so the denominator is every case. ``labels`` is
    used only to check the inputs. Empty input gives NaN.

    >>> accuracy(["A", "B", "C", "C"], ["A", "C", "C", None])
    0.5
    """
    true, pred = _encode_pair(y_true, y_pred, labels)
    return _ratio(np.count_nonzero(true == pred), len(true))


def parse_rate(y_pred: LabelArray, *, labels: Sequence[Hashable] = TRIAGE_LABELS) -> float:
    """Share of predictions that could be parsed, i.e. are not None.

    ``parse_rate = #{i : y_pred[i] is not None} / N``

    ``labels`` is used only to check the inputs. Empty input gives NaN.

    >>> parse_rate(["A", None, "C", "C"])
    0.75
    """
    pred = _encode(y_pred, "y_pred", _check_labels(labels), allow_none=True)
    return _ratio(np.count_nonzero(pred >= 0), len(pred))


def risk_propensity(y_pred: LabelArray, *, labels: Sequence[Hashable] = TRIAGE_LABELS) -> float:
    """Share of parsable predictions that are the most urgent label (the last of ``labels``, C).

    ``risk_propensity = #{i : y_pred[i] == labels[-1]} / #{i : y_pred[i] is not None}``

    It describes how readily the model sends patients to emergency care, whatever the reference.
    NaN when no prediction is parsable (or the input is empty).

    >>> risk_propensity(["A", "C", "C", None])
    0.6666666666666666
    """
    rank = _check_labels(labels)
    pred = _encode(y_pred, "y_pred", rank, allow_none=True)
    return _ratio(np.count_nonzero(pred == len(rank) - 1), np.count_nonzero(pred >= 0))


def over_triage_rate(y_true: LabelArray, y_pred: LabelArray, *,
                     labels: Sequence[Hashable] = TRIAGE_LABELS) -> float:
    """Share of parsable cases predicted more urgent than the reference (order of ``labels``).

    ``over_triage_rate = #{i : rank(y_pred[i]) > rank(y_true[i])} / #{i : y_pred[i] is not None}``

    NaN when no prediction is parsable (or the input is empty).

    >>> over_triage_rate(["A", "A", "B", "C"], ["B", "A", "C", None])
    0.6666666666666666
    """
    true, pred = _encode_pair(y_true, y_pred, labels)
    parsable = pred >= 0
    return _ratio(np.count_nonzero(parsable & (pred > true)), np.count_nonzero(parsable))


def under_triage_rate(y_true: LabelArray, y_pred: LabelArray, *,
                      labels: Sequence[Hashable] = TRIAGE_LABELS) -> float:
    """Share of parsable cases predicted less urgent than the reference (order of ``labels``).

    ``under_triage_rate = #{i : rank(y_pred[i]) < rank(y_true[i])} / #{i : y_pred[i] is not None}``

    NaN when no prediction is parsable (or the input is empty).

    >>> under_triage_rate(["C", "C", "B", "A"], ["A", "C", "B", None])
    0.3333333333333333
    """
    true, pred = _encode_pair(y_true, y_pred, labels)
    parsable = pred >= 0
    return _ratio(np.count_nonzero(parsable & (pred < true)), np.count_nonzero(parsable))


def risk_sensitivity(y_true: LabelArray, y_pred: LabelArray, *,
                     labels: Sequence[Hashable] = TRIAGE_LABELS) -> float:
    """Share of the parsable errors that are over-triage rather than under-triage.

    ``risk_sensitivity = over / (over + under)``, where ``over`` and ``under`` count the parsable
    cases predicted more and less urgent than the reference. 1 means every error errs on the side of
    caution, 0 means every error sends the patient to less care than needed. NaN when there is no
    parsable error (or the input is empty).

    >>> risk_sensitivity(["A", "A", "B", "C"], ["B", "C", "A", None])
    0.6666666666666666
    """
    true, pred = _encode_pair(y_true, y_pred, labels)
    parsable = pred >= 0
    over = np.count_nonzero(parsable & (pred > true))
    under = np.count_nonzero(parsable & (pred < true))
    return _ratio(over, over + under)


def consistency_rate(y_gen: LabelArray, y_logit: LabelArray, *,
                     labels: Sequence[Hashable] = TRIAGE_LABELS) -> float:
    """Percentage of cases whose generated answer agrees with the label the model scores highest.

    ``consistency_rate = 100 * #{i in S : y_gen[i] == y_logit[i]} / #S``, where
    ``S = {i : y_gen[i] is not None and y_logit[i] is not None}``.

    ``y_gen`` is the label parsed from the generated text (None when unparsable); ``y_logit`` is the
    argmax of the model's distribution over the labels (None when no distribution is available).
    A case with no generated label or no logit label cannot be compared and is left out of both the
    numerator and the denominator. NaN when no case can be compared (or the input is empty).

    >>> consistency_rate(["A", "C", None, "B"], ["A", "B", "C", None])
    50.0
    """
    rank = _check_labels(labels)
    generated = _encode(y_gen, "y_gen", rank, allow_none=True)
    scored = _encode(y_logit, "y_logit", rank, allow_none=True)
    _check_same_length(generated, "y_gen", scored, "y_logit")
    comparable = (generated >= 0) & (scored >= 0)
    agree = np.count_nonzero(comparable & (generated == scored))
    return _ratio(100.0 * agree, np.count_nonzero(comparable))


def confusion_matrix(y_true: LabelArray, y_pred: LabelArray, *,
                     labels: Sequence[Hashable] = TRIAGE_LABELS) -> list[list[int]]:
    """Counts of (reference, prediction) pairs, with a last column for unparsable predictions.

    ``matrix[i][j] = #{k : y_true[k] == labels[i] and y_pred[k] == labels[j]}`` for
    ``j < len(labels)``, and ``matrix[i][len(labels)] = #{k : y_true[k] == labels[i] and y_pred[k] is None}``.

    Rows follow ``labels`` (the reference), columns follow ``labels`` then None (the prediction).

    >>> confusion_matrix(["A", "A", "B", "C"], ["A", "B", None, "C"])
    [[1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]
    """
    true, pred = _encode_pair(y_true, y_pred, labels)
    n_labels = len(_check_labels(labels))
    columns = np.where(pred >= 0, pred, n_labels)
    counts = np.zeros((n_labels, n_labels + 1), dtype=np.int64)
    np.add.at(counts, (true, columns), 1)
    return counts.tolist()


# --- probability metrics --------------------------------------------------------------------------

def _confidence_and_correct(y_true: LabelArray, probs: ArrayLike,
                            labels: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray]:
    """Top-label confidence of each row and whether its argmax label (first on ties) is the reference."""
    rank = _check_labels(labels)
    true = _encode(y_true, "y_true", rank, allow_none=False)
    array = _check_probs(probs, len(rank))
    if len(true) != len(array):
        raise ValueError(f"y_true and probs must describe the same cases, got {len(true)} labels "
                         f"and {len(array)} probability rows")
    return array.max(axis=1), array.argmax(axis=1) == true


def reliability_bins(y_true: LabelArray, probs: ArrayLike, *, labels: Sequence[Hashable] = TRIAGE_LABELS,
                     n_bins: int = 10) -> list[dict[str, float | int]]:
    """Top-label confidence against accuracy in ``n_bins`` equal-width bins on [0, 1].

    Each row of ``probs`` is a distribution over ``labels`` (columns in that order). A case's
    confidence is its row maximum; it is correct when the argmax label (the first label in order on
    ties) is the reference. Bin ``b`` covers ``(b / n_bins, (b + 1) / n_bins]``; a confidence of 0
    goes in the first bin. Each bin is a dict with ``lo``, ``hi``, ``count``, ``mean_confidence`` and
    ``accuracy`` (both NaN for an empty bin), ready for a reliability diagram;
    ``sum(count / N * |accuracy - mean_confidence|)`` over the non-empty bins is
    :func:`expected_calibration_error`.

    >>> bins = reliability_bins(["A", "C"], [[0.9, 0.05, 0.05], [0.3, 0.1, 0.6]], n_bins=2)
    >>> [(b["lo"], b["hi"], b["count"], b["accuracy"]) for b in bins]
    [(0.0, 0.5, 0, nan), (0.5, 1.0, 2, 1.0)]
    >>> round(bins[1]["mean_confidence"], 6)
    0.75
    """
    n_bins = _check_n_bins(n_bins)
    confidence, correct = _confidence_and_correct(y_true, probs, labels)
    # Edges as b / n_bins (one correctly rounded division each) so that a confidence written as a
    # decimal edge, e.g. 0.3, lands in the bin it closes.
    edges = np.arange(n_bins + 1) / n_bins
    # side="left" gives edges[i - 1] < c <= edges[i]: bins closed on the right.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    confidence_sums = np.bincount(which, weights=confidence, minlength=n_bins)
    correct_sums = np.bincount(which, weights=correct.astype(float), minlength=n_bins)
    bins: list[dict[str, float | int]] = []
    for b in range(n_bins):
        count = int(counts[b])
        bins.append({
            "lo": float(edges[b]),
            "hi": float(edges[b + 1]),
            "count": count,
            "mean_confidence": _ratio(confidence_sums[b], count),
            "accuracy": _ratio(correct_sums[b], count),
        })
    return bins


def expected_calibration_error(y_true: LabelArray, probs: ArrayLike, *,
                               labels: Sequence[Hashable] = TRIAGE_LABELS, n_bins: int = 10) -> float:
    """Expected calibration error of the top-label confidence, over equal-width bins.

    ``ECE = sum_b (n_b / N) * |acc_b - conf_b|``

    where bin ``b`` holds the ``n_b`` cases whose confidence (row maximum of ``probs``) lies in
    ``(b / n_bins, (b + 1) / n_bins]`` (confidence 0 in the first bin), ``conf_b`` is their mean
    confidence and ``acc_b`` the share whose argmax label (first label in order on ties) is the
    reference. Rows of ``probs`` are distributions over ``labels``, columns in that order. 0 is
    perfect calibration. Empty input gives NaN. See :func:`reliability_bins` for the bins themselves.

    >>> y_true = ["A", "C", "C", "B"]
    >>> probs = [[0.8, 0.1, 0.1], [0.2, 0.2, 0.6], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]]
    >>> round(expected_calibration_error(y_true, probs, n_bins=5), 6)
    0.125
    """
    bins = reliability_bins(y_true, probs, labels=labels, n_bins=n_bins)
    total = sum(int(b["count"]) for b in bins)
    if total == 0:
        return _NAN
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["mean_confidence"])
                     for b in bins if b["count"]))


def brier_score(y_true: LabelArray, probs: ArrayLike, *, labels: Sequence[Hashable] = TRIAGE_LABELS) -> float:
    """Multi-class Brier score: mean squared distance between the distribution and the one-hot truth.

    ``Brier = (1 / N) * sum_i sum_k (probs[i][k] - 1[y_true[i] == labels[k]])^2``

    Rows of ``probs`` are distributions over ``labels``, columns in that order. Ranges from 0 (all
    mass on the reference) to 2 (all mass on one wrong label). Empty input gives NaN.

    >>> round(brier_score(["A", "C"], [[1.0, 0.0, 0.0], [0.5, 0.0, 0.5]]), 6)
    0.25
    """
    rank = _check_labels(labels)
    true = _encode(y_true, "y_true", rank, allow_none=False)
    array = _check_probs(probs, len(rank))
    if len(true) != len(array):
        raise ValueError(f"y_true and probs must describe the same cases, got {len(true)} labels "
                         f"and {len(array)} probability rows")
    if len(true) == 0:
        return _NAN
    one_hot = np.eye(len(rank))[true]
    return float(np.mean(np.sum((array - one_hot) ** 2, axis=1)))


# --- registry -------------------------------------------------------------------------------------

Needs = Literal["pred", "true+pred", "gen+logit", "true+probs"]


@dataclass(frozen=True)
class MetricInfo:
    """What a metric means and how to read it: for tables, reports and the tests of its bounds.

    ``higher_is_better`` is None for metrics that describe behaviour rather than quality.
    ``needs`` names the inputs: "pred" (predictions), "true+pred" (references and predictions),
    "gen+logit" (generated and logit labels) or "true+probs" (references and label distributions).
    """

    name: str
    description: str
    higher_is_better: bool | None
    lower: float
    upper: float
    needs: Needs


METRICS: dict[str, MetricInfo] = {info.name: info for info in (
    MetricInfo("accuracy", "Share of cases triaged to the reference level of care (unreadable answers "
               "count as wrong).", True, 0.0, 1.0, "true+pred"),
    MetricInfo("parse_rate", "Share of answers from which a level of care could be read.",
               True, 0.0, 1.0, "pred"),
    MetricInfo("risk_propensity", "Share of readable answers that send the patient to emergency care.",
               None, 0.0, 1.0, "pred"),
    MetricInfo("over_triage_rate", "Share of readable answers that recommend more urgent care than needed.",
               False, 0.0, 1.0, "true+pred"),
    MetricInfo("under_triage_rate", "Share of readable answers that recommend less urgent care than "
               "needed.", False, 0.0, 1.0, "true+pred"),
    MetricInfo("risk_sensitivity", "Of the wrong readable answers, the share that err towards more urgent "
               "care.", None, 0.0, 1.0, "true+pred"),
    MetricInfo("consistency_rate", "Percentage of answers where the written choice matches the option "
               "the model scores most likely.", True, 0.0, 100.0, "gen+logit"),
    MetricInfo("expected_calibration_error", "Average gap between the model's confidence and how often "
               "it is right (0 = well calibrated).", False, 0.0, 1.0, "true+probs"),
    MetricInfo("brier_score", "Mean squared error of the model's probabilities over the levels of care "
               "(0 = perfect, 2 = worst).", False, 0.0, 2.0, "true+probs"),
)}
