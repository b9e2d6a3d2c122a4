"""Triage metrics as pure functions: label arrays (and label distributions) in, a plain float out.

Each metric is also available as per-case terms (:func:`ratio_terms`, :func:`calibration_terms`): columns
with one entry per case whose sums give the metric, so that the metric of a subset or of a bootstrap
resample of the cases follows from weighted sums of the same columns. The metric functions compute their
values from these terms, so each formula is written once.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, fields
from numbers import Integral
from typing import Any, ClassVar, Literal, SupportsFloat, TypeAlias

import numpy as np
from numpy.typing import ArrayLike

from persona_eval.arrays import as_1d_list

__all__ = [
    "METRICS",
    "CalibrationTerms",
    "MetricInfo",
    "RatioTerms",
    "accuracy",
    "brier_score",
    "calibration_terms",
    "confusion_matrix",
    "consistency_rate",
    "expected_calibration_error",
    "over_triage_rate",
    "parse_rate",
    "ratio_terms",
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


def _encode(values: LabelArray, name: str, rank: dict[Hashable, int], *, allow_none: bool) -> np.ndarray:
    """Urgency ranks of `values` (-1 for None), checking every entry is a known label."""
    items = as_1d_list(values, name, what="a sequence of labels")
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


def _ratios(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise numerator / denominator, NaN where the denominator is 0 (undefined)."""
    out = np.full(np.shape(numerator), _NAN)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


# --- per-case terms -------------------------------------------------------------------------------

def _one_per_case(values: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, one entry per case, got an array of shape "
                         f"{array.shape}")
    return array


class _Terms:
    """What the per-case terms share. The first field holds the numerator parts (``_PARTS_NDIM``
    dimensions, one row per case) and the second the denominator (one entry per case); the metric is a
    function of their column sums over cases (``_numerator`` of the parts' sums over the denominator's
    sum), so the metric of any weighting of the cases is :meth:`from_sums` of the weighted sums."""

    _PARTS_NDIM: ClassVar[int]
    _PARTS_SHAPE: ClassVar[str]  # the error's words for the first field's shape

    def __post_init__(self) -> None:
        first, second = (f.name for f in fields(self))  # type: ignore[arg-type]
        parts = np.asarray(getattr(self, first), dtype=float)
        if parts.ndim != self._PARTS_NDIM:
            raise ValueError(f"{first} must {self._PARTS_SHAPE}, got an array of shape {parts.shape}")
        denominator = _one_per_case(getattr(self, second), second)
        _check_same_length(parts, first, denominator, second)
        object.__setattr__(self, first, parts)
        object.__setattr__(self, second, denominator)

    @property
    def columns(self) -> np.ndarray:
        """The terms as one ``(cases, columns)`` array: the parts' column(s), then the denominator."""
        return np.column_stack([getattr(self, f.name) for f in fields(self)])  # type: ignore[arg-type]

    @staticmethod
    def _numerator(sums: np.ndarray) -> np.ndarray:
        """The numerator from the parts' column sums: the one column of a ratio."""
        return sums[..., 0]

    @classmethod
    def from_sums(cls, sums: ArrayLike) -> np.ndarray:
        """The metric from sums of :attr:`columns` over cases, of shape ``(..., columns)``: one value per
        row (e.g. one per bootstrap resample)."""
        array = np.asarray(sums, dtype=float)
        return _ratios(cls._numerator(array[..., :-1]), array[..., -1])

    def value(self) -> float:
        """The metric on the cases, each counted with its weight (once, for a ratio)."""
        return float(self.from_sums(self.columns.sum(axis=0)))


@dataclass(frozen=True, eq=False)
class RatioTerms(_Terms):
    """A metric as per-case terms: ``value = sum_i numerator[i] / sum_i denominator[i]``.

    ``numerator`` and ``denominator`` are float arrays with one entry per case, in the order of the
    metric's inputs. Weighting the cases weights the terms: the metric of a subset (weights 0 and 1)
    or of a bootstrap resample (how often each case was drawn) is :meth:`from_sums` of the weighted
    column sums, without going back to the labels. NaN when the denominator sums to 0.
    """

    numerator: np.ndarray
    denominator: np.ndarray
    _PARTS_NDIM = 1
    _PARTS_SHAPE = "be one-dimensional, one entry per case"


@dataclass(frozen=True, eq=False)
class CalibrationTerms(_Terms):
    """Expected calibration error as per-case terms: ``ECE = sum_b |sum_i gaps[i, b]| / sum_i weight[i]``.

    ``gaps`` has one row per case and one column per confidence bin: ``correct - confidence`` in the
    column of the case's bin, 0 in the others. A bin's column sums to ``n_b * (acc_b - conf_b)``, so
    the formula is :func:`expected_calibration_error`'s with ``N = sum_i weight[i]``; ``weight`` holds 1
    per case, or 0 for a case that is to count for nothing. As with :class:`RatioTerms`, the ECE of a
    weighting of the cases is :meth:`from_sums` of the weighted column sums. NaN when the weights sum
    to 0.
    """

    gaps: np.ndarray
    weight: np.ndarray
    _PARTS_NDIM = 2
    _PARTS_SHAPE = "have shape (cases, bins)"

    @staticmethod
    def _numerator(sums: np.ndarray) -> np.ndarray:
        return np.abs(sums).sum(axis=-1)


# --- label metrics --------------------------------------------------------------------------------

def _accuracy_terms(y_true: LabelArray, y_pred: LabelArray, labels: Sequence[Hashable]) -> RatioTerms:
    true, pred = _encode_pair(y_true, y_pred, labels)
    return RatioTerms(true == pred, np.ones(len(true)))


def accuracy(y_true: LabelArray, y_pred: LabelArray, *,
             labels: Sequence[Hashable] = TRIAGE_LABELS) -> float:
    """Share of cases whose predicted label equals the reference label.

    ``accuracy = #{i : y_pred[i] == y_true[i]} / N``

    An unparsable prediction (None) counts as wrong, so the denominator is every case. ``labels`` is
    used only to check the inputs. Empty input gives NaN.

    >>> accuracy(["A", "B", "C", "C"], ["A", "C", "C", None])
    0.5
    """
    return _accuracy_terms(y_true, y_pred, labels).value()


def _parse_rate_terms(y_pred: LabelArray, labels: Sequence[Hashable]) -> RatioTerms:
    pred = _encode(y_pred, "y_pred", _check_labels(labels), allow_none=True)
    return RatioTerms(pred >= 0, np.ones(len(pred)))


def parse_rate(y_pred: LabelArray, *, labels: Sequence[Hashable] = TRIAGE_LABELS) -> float:
    """Share of predictions that could be parsed, i.e. are not None.

    ``parse_rate = #{i : y_pred[i] is not None} / N``

    ``labels`` is used only to check the inputs. Empty input gives NaN.

    >>> parse_rate(["A", None, "C", "C"])
    0.75
    """
    return _parse_rate_terms(y_pred, labels).value()


def _risk_propensity_terms(y_pred: LabelArray, labels: Sequence[Hashable]) -> RatioTerms:
    rank = _check_labels(labels)
    pred = _encode(y_pred, "y_pred", rank, allow_none=True)
    return RatioTerms(pred == len(rank) - 1, pred >= 0)


def risk_propensity(y_pred: LabelArray, *, labels: Sequence[Hashable] = TRIAGE_LABELS) -> float:
    """Share of parsable predictions that are the most urgent label (the last of ``labels``, C).

    ``risk_propensity = #{i : y_pred[i] == labels[-1]} / #{i : y_pred[i] is not None}``

    It describes how readily the model sends patients to emergency care, whatever the reference.
    NaN when no prediction is parsable (or the input is empty).

    >>> risk_propensity(["A", "C", "C", None])
    0.6666666666666666
    """
    return _risk_propensity_terms(y_pred, labels).value()


def _triage_errors(y_true: LabelArray, y_pred: LabelArray,
                   labels: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per case: whether the prediction is parsable, more urgent than the reference, less urgent."""
    true, pred = _encode_pair(y_true, y_pred, labels)
    parsable = pred >= 0
    return parsable, parsable & (pred > true), parsable & (pred < true)


def _over_triage_terms(y_true: LabelArray, y_pred: LabelArray, labels: Sequence[Hashable]) -> RatioTerms:
    parsable, over, _ = _triage_errors(y_true, y_pred, labels)
    return RatioTerms(over, parsable)


def over_triage_rate(y_true: LabelArray, y_pred: LabelArray, *,
                     labels: Sequence[Hashable] = TRIAGE_LABELS) -> float:
    """Share of parsable cases predicted more urgent than the reference (order of ``labels``): the error
    that costs care and the patient's time rather than safety.

    ``over_triage_rate = #{i : rank(y_pred[i]) > rank(y_true[i])} / #{i : y_pred[i] is not None}``,
    NaN when no prediction is parsable (or the input is empty).

    >>> over_triage_rate(["A", "A", "B", "C"], ["B", "A", "C", None])
    0.6666666666666666
    """
    return _over_triage_terms(y_true, y_pred, labels).value()


def _under_triage_terms(y_true: LabelArray, y_pred: LabelArray, labels: Sequence[Hashable]) -> RatioTerms:
    parsable, _, under = _triage_errors(y_true, y_pred, labels)
    return RatioTerms(under, parsable)


def under_triage_rate(y_true: LabelArray, y_pred: LabelArray, *,
                      labels: Sequence[Hashable] = TRIAGE_LABELS) -> float:
    """Share of parsable cases predicted less urgent than the reference (order of ``labels``).

    ``under_triage_rate = #{i : rank(y_pred[i]) < rank(y_true[i])} / #{i : y_pred[i] is not None}``

    The dangerous error: the patient is sent to less care than they need, which is why the default
    thresholds bound it on emergency cases. NaN when no prediction is parsable (or the input is empty).

    >>> under_triage_rate(["C", "C", "B", "A"], ["A", "C", "B", None])
    0.3333333333333333
    """
    return _under_triage_terms(y_true, y_pred, labels).value()


def _risk_sensitivity_terms(y_true: LabelArray, y_pred: LabelArray, labels: Sequence[Hashable]) -> RatioTerms:
    _, over, under = _triage_errors(y_true, y_pred, labels)
    return RatioTerms(over, over | under)


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
    return _risk_sensitivity_terms(y_true, y_pred, labels).value()


def _consistency_terms(y_gen: LabelArray, y_logit: LabelArray, labels: Sequence[Hashable]) -> RatioTerms:
    rank = _check_labels(labels)
    generated = _encode(y_gen, "y_gen", rank, allow_none=True)
    scored = _encode(y_logit, "y_logit", rank, allow_none=True)
    _check_same_length(generated, "y_gen", scored, "y_logit")
    comparable = (generated >= 0) & (scored >= 0)
    return RatioTerms(100.0 * (comparable & (generated == scored)), comparable)


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
    return _consistency_terms(y_gen, y_logit, labels).value()


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

def _encode_with_probs(y_true: LabelArray, probs: ArrayLike,
                       labels: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray]:
    """The reference ranks and the checked probability rows, one of each per case."""
    rank = _check_labels(labels)
    true = _encode(y_true, "y_true", rank, allow_none=False)
    array = _check_probs(probs, len(rank))
    if len(true) != len(array):
        raise ValueError(f"y_true and probs must describe the same cases, got {len(true)} labels "
                         f"and {len(array)} probability rows")
    return true, array


def _confidence_and_correct(y_true: LabelArray, probs: ArrayLike,
                            labels: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray]:
    """Top-label confidence of each row and whether its argmax label (first on ties) is the reference."""
    true, array = _encode_with_probs(y_true, probs, labels)
    return array.max(axis=1), array.argmax(axis=1) == true


def _confidence_bins(confidence: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """The edges of ``n_bins`` equal-width bins on [0, 1], closed on the right, and the bin of each
    confidence (a confidence of 0 in the first)."""
    # Edges as b / n_bins (one correctly rounded division each) so that a confidence written as a
    # decimal edge, e.g. 0.3, lands in the bin it closes.
    edges = np.arange(n_bins + 1) / n_bins
    # side="left" gives edges[i - 1] < c <= edges[i]: bins closed on the right.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    return edges, which


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
    edges, which = _confidence_bins(confidence, n_bins)
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


def calibration_terms(y_true: LabelArray, probs: ArrayLike, *, labels: Sequence[Hashable] = TRIAGE_LABELS,
                      n_bins: int = 10) -> CalibrationTerms:
    """The per-case terms of :func:`expected_calibration_error`, one row per case.

    ``ECE = sum_b |sum_i gaps[i, b]| / sum_i weight[i]``, where ``gaps[i, b] = correct_i - confidence_i``
    when case ``i``'s confidence lies in bin ``b`` and 0 otherwise, and ``weight[i] = 1``. Confidence,
    correctness and bins are those of :func:`reliability_bins`; inputs are checked as
    :func:`expected_calibration_error` checks them.

    >>> terms = calibration_terms(["A", "C"], [[0.9, 0.05, 0.05], [0.3, 0.1, 0.6]], n_bins=2)
    >>> terms.gaps.round(6).tolist(), terms.weight.tolist()
    ([[0.0, 0.1], [0.0, 0.4]], [1.0, 1.0])
    >>> round(terms.value(), 6)
    0.25
    """
    n_bins = _check_n_bins(n_bins)
    confidence, correct = _confidence_and_correct(y_true, probs, labels)
    _, which = _confidence_bins(confidence, n_bins)
    gaps = np.zeros((len(confidence), n_bins))
    gaps[np.arange(len(confidence)), which] = correct.astype(float) - confidence
    return CalibrationTerms(gaps, np.ones(len(confidence)))


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
    return calibration_terms(y_true, probs, labels=labels, n_bins=n_bins).value()


def _brier_terms(y_true: LabelArray, probs: ArrayLike, labels: Sequence[Hashable]) -> RatioTerms:
    true, array = _encode_with_probs(y_true, probs, labels)
    one_hot = np.eye(array.shape[1])[true]
    return RatioTerms(np.sum((array - one_hot) ** 2, axis=1), np.ones(len(true)))


def brier_score(y_true: LabelArray, probs: ArrayLike, *, labels: Sequence[Hashable] = TRIAGE_LABELS) -> float:
    """Multi-class Brier score: mean squared distance between the distribution and the one-hot truth.

    ``Brier = (1 / N) * sum_i sum_k (probs[i][k] - 1[y_true[i] == labels[k]])^2``

    Rows of ``probs`` are distributions over ``labels``, columns in that order. Ranges from 0 (all
    mass on the reference) to 2 (all mass on one wrong label). Empty input gives NaN.

    >>> round(brier_score(["A", "C"], [[1.0, 0.0, 0.0], [0.5, 0.0, 0.5]]), 6)
    0.25
    """
    return _brier_terms(y_true, probs, labels).value()


# --- terms by metric ------------------------------------------------------------------------------

_RATIO_TERMS: dict[str, Callable[..., RatioTerms]] = {
    "accuracy": _accuracy_terms,
    "parse_rate": _parse_rate_terms,
    "risk_propensity": _risk_propensity_terms,
    "over_triage_rate": _over_triage_terms,
    "under_triage_rate": _under_triage_terms,
    "risk_sensitivity": _risk_sensitivity_terms,
    "consistency_rate": _consistency_terms,
    "brier_score": _brier_terms,
}

# The arrays each kind of metric takes, by MetricInfo.needs.
_ARRAYS: dict[str, tuple[str, ...]] = {
    "pred": ("y_pred",),
    "true+pred": ("y_true", "y_pred"),
    "gen+logit": ("y_gen", "y_logit"),
    "true+probs": ("y_true", "probs"),
}


def ratio_terms(metric: str, *arrays: Any, labels: Sequence[Hashable] = TRIAGE_LABELS) -> RatioTerms:
    """The per-case terms of a ratio metric, so that ``metric(*arrays) = sum(numerator) / sum(denominator)``.

    ``metric`` names any metric of :data:`METRICS` but ``expected_calibration_error`` (whose terms are
    :func:`calibration_terms`); ``arrays`` are its arrays, in the order the metric function takes
    them, checked as it checks them. With ``parsable[i] = y_pred[i] is not None``, comparisons in the
    order of ``labels``, and a condition counting 1 when it holds and 0 otherwise, case ``i`` has:

    - accuracy: ``y_pred[i] == y_true[i]`` over 1;
    - parse_rate: ``parsable[i]`` over 1;
    - risk_propensity: ``y_pred[i] == labels[-1]`` over ``parsable[i]``;
    - over_triage_rate: ``parsable[i] and y_pred[i] > y_true[i]`` over ``parsable[i]``;
    - under_triage_rate: ``parsable[i] and y_pred[i] < y_true[i]`` over ``parsable[i]``;
    - risk_sensitivity: ``parsable[i] and y_pred[i] > y_true[i]`` over
      ``parsable[i] and y_pred[i] != y_true[i]``;
    - consistency_rate: ``100 * (comparable[i] and y_gen[i] == y_logit[i])`` over ``comparable[i]``,
      where ``comparable[i] = y_gen[i] is not None and y_logit[i] is not None``;
    - brier_score: ``sum_k (probs[i][k] - 1[y_true[i] == labels[k]])^2`` over 1.

    >>> terms = ratio_terms("risk_propensity", ["A", "C", "C", None])
    >>> terms.numerator.tolist(), terms.denominator.tolist()
    ([0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0])
    >>> terms.value() == risk_propensity(["A", "C", "C", None])
    True
    """
    terms_of = _RATIO_TERMS.get(metric) if isinstance(metric, str) else None
    if terms_of is None:
        hint = "; its terms are calibration_terms'" if metric == "expected_calibration_error" else ""
        raise ValueError(f"metric must be one of the ratio metrics ({', '.join(_RATIO_TERMS)}), "
                         f"got {metric!r}{hint}")
    names = _ARRAYS[METRICS[metric].needs]
    if len(arrays) != len(names):
        raise TypeError(f"{metric} takes {len(names)} array{'s' if len(names) > 1 else ''} "
                        f"({', '.join(names)}), got {len(arrays)}")
    return terms_of(*arrays, labels)


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
