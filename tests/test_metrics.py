"""Tests of persona_eval.metrics: the registry, reference implementations, properties, per-case terms and
input checks."""

from __future__ import annotations

import doctest
import inspect
import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score as sk_accuracy_score
from sklearn.metrics import brier_score_loss as sk_brier_score_loss
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from persona_eval import metrics
from persona_eval.metrics import (
    METRICS,
    CalibrationTerms,
    RatioTerms,
    accuracy,
    brier_score,
    calibration_terms,
    confusion_matrix,
    consistency_rate,
    expected_calibration_error,
    over_triage_rate,
    parse_rate,
    ratio_terms,
    reliability_bins,
    risk_propensity,
    risk_sensitivity,
    under_triage_rate,
)
from persona_eval.tasks import triage

LABELS = ("A", "B", "C")
URGENCY = {label: rank for rank, label in enumerate(LABELS)}
# Public functions that return a table rather than one number, so have no place in METRICS.
NOT_SCALAR = {"confusion_matrix", "reliability_bins"}
# Public functions that return a metric's per-case terms rather than its value.
TERMS = {"ratio_terms", "calibration_terms"}
RATIO_METRICS = sorted(set(METRICS) - {"expected_calibration_error"})
HYPOTHESIS = settings(max_examples=60, deadline=None)


# --- data -----------------------------------------------------------------------------------------

labels_or_none = st.sampled_from([*LABELS, None])
reference_labels = st.sampled_from(LABELS)


@st.composite
def distributions(draw: st.DrawFn, n_labels: int = 3) -> list[float]:
    """A probability row: integer weights normalised, so rows sum to 1 up to rounding."""
    weights = draw(st.lists(st.integers(0, 20), min_size=n_labels, max_size=n_labels)
                   .filter(lambda w: sum(w) > 0))
    total = sum(weights)
    return [w / total for w in weights]


@st.composite
def datasets(draw: st.DrawFn, min_size: int = 0, max_size: int = 20) -> dict[str, list[Any]]:
    """Every input any metric needs, for the same cases."""
    n = draw(st.integers(min_size, max_size))
    return {
        "true": draw(st.lists(reference_labels, min_size=n, max_size=n)),
        "pred": draw(st.lists(labels_or_none, min_size=n, max_size=n)),
        "gen": draw(st.lists(labels_or_none, min_size=n, max_size=n)),
        "logit": draw(st.lists(labels_or_none, min_size=n, max_size=n)),
        "probs": draw(st.lists(distributions(), min_size=n, max_size=n)),
    }


def inputs_of(name: str, data: dict[str, Any]) -> tuple[Any, ...]:
    """The arrays the metric `name` takes, as its registry entry says."""
    needs = METRICS[name].needs
    if needs == "pred":
        return (data["pred"],)
    if needs == "true+pred":
        return data["true"], data["pred"]
    if needs == "gen+logit":
        return data["gen"], data["logit"]
    assert needs == "true+probs"
    return data["true"], data["probs"]


def call_metric(name: str, data: dict[str, Any], **options: Any) -> float:
    """Call the metric `name` with the inputs its registry entry says it needs."""
    return getattr(metrics, name)(*inputs_of(name, data), **options)


def terms_of(name: str, data: dict[str, Any], **options: Any) -> RatioTerms | CalibrationTerms:
    """The per-case terms of the metric `name`, from the same inputs as `call_metric`."""
    if name == "expected_calibration_error":
        return calibration_terms(*inputs_of(name, data), **options)
    return ratio_terms(name, *inputs_of(name, data), **options)


def same_value(first: float, second: float, *, tolerance: float = 1e-9) -> bool:
    """Equal within `tolerance`, or both NaN."""
    if math.isnan(first) or math.isnan(second):
        return math.isnan(first) and math.isnan(second)
    return math.isclose(first, second, rel_tol=tolerance, abs_tol=tolerance)


def with_sentinel(y_pred: list[str | None]) -> list[str]:
    """Predictions with None spelt as a label of its own, for scikit-learn."""
    return ["unparsable" if label is None else label for label in y_pred]


# --- the registry (after sklearn's test_common) ---------------------------------------------------

def test_every_public_metric_is_registered_and_none_left_out() -> None:
    public_functions = {name for name in metrics.__all__ if inspect.isfunction(getattr(metrics, name))}
    assert public_functions - NOT_SCALAR - TERMS == set(METRICS)
    assert public_functions >= NOT_SCALAR | TERMS


def test_registry_names_the_metrics_the_triage_task_reports() -> None:
    assert set(METRICS) == set(triage.LABEL_METRIC_NAMES)
    assert set(triage.METRIC_NAMES) - set(METRICS) == {"too_long_rate", "truncated_rate"}  # counts records, not labels


@pytest.mark.parametrize("name", sorted(METRICS))
def test_registry_entry_is_well_formed(name: str) -> None:
    info = METRICS[name]
    assert info.name == name
    assert info.description and "\n" not in info.description
    assert info.higher_is_better in (True, False, None)
    assert info.lower < info.upper
    assert info.needs in ("pred", "true+pred", "gen+logit", "true+probs")
    with pytest.raises(AttributeError):
        info.name = "renamed"  # type: ignore[misc]


@pytest.mark.parametrize("name", sorted(set(METRICS) | NOT_SCALAR | {"calibration_terms"}))
def test_arrays_come_first_and_options_are_keyword_only(name: str) -> None:
    parameters = list(inspect.signature(getattr(metrics, name)).parameters.values())
    positional = [p for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    keyword_only = [p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert len(positional) + len(keyword_only) == len(parameters)
    n_arrays = 1 if name in METRICS and METRICS[name].needs == "pred" else 2
    assert len(positional) == n_arrays
    assert all(p.default is inspect.Parameter.empty for p in positional)
    assert [p.name for p in keyword_only][:1] == ["labels"]
    assert keyword_only[0].default == LABELS


def test_ratio_terms_takes_the_metric_name_then_its_arrays() -> None:
    parameters = list(inspect.signature(ratio_terms).parameters.values())
    assert [(p.name, p.kind) for p in parameters] == [
        ("metric", inspect.Parameter.POSITIONAL_OR_KEYWORD), ("arrays", inspect.Parameter.VAR_POSITIONAL),
        ("labels", inspect.Parameter.KEYWORD_ONLY)]
    assert parameters[-1].default == LABELS
    calibration = inspect.signature(calibration_terms).parameters
    assert calibration["n_bins"].default == inspect.signature(expected_calibration_error).parameters["n_bins"].default


@pytest.mark.parametrize("name", sorted(set(METRICS) | NOT_SCALAR | TERMS))
def test_docstring_states_a_formula_and_an_example(name: str) -> None:
    docstring = inspect.getdoc(getattr(metrics, name)) or ""
    assert "``" in docstring and "=" in docstring
    assert ">>> " in docstring


def test_docstring_examples_run() -> None:
    result = doctest.testmod(metrics, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= len(METRICS) + len(NOT_SCALAR) + len(TERMS)
    assert result.failed == 0


@HYPOTHESIS
@given(data=datasets())
@pytest.mark.parametrize("name", sorted(METRICS))
def test_value_is_a_builtin_float_within_the_registered_bounds(name: str, data: dict[str, Any]) -> None:
    info = METRICS[name]
    value = call_metric(name, data)
    assert type(value) is float
    assert math.isnan(value) or info.lower - 1e-12 <= value <= info.upper + 1e-12


@HYPOTHESIS
@given(data=datasets(), seed=st.randoms(use_true_random=False))
@pytest.mark.parametrize("name", sorted(METRICS))
def test_value_does_not_depend_on_case_order(name: str, data: dict[str, Any], seed: Any) -> None:
    order = list(range(len(data["true"])))
    seed.shuffle(order)
    shuffled = {key: [values[i] for i in order] for key, values in data.items()}
    assert same_value(call_metric(name, data), call_metric(name, shuffled))


@pytest.mark.parametrize("name", sorted(METRICS))
def test_empty_input_gives_nan(name: str) -> None:
    empty: dict[str, Any] = {"true": [], "pred": [], "gen": [], "logit": [], "probs": []}
    value = call_metric(name, empty)
    assert type(value) is float and math.isnan(value)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_numpy_arrays_give_the_same_value_as_lists(name: str) -> None:
    data = {
        "true": ["A", "B", "C", "C", "B"],
        "pred": ["A", "C", None, "B", "A"],
        "gen": ["A", "C", None, "B", "A"],
        "logit": ["A", "B", "C", "B", None],
        "probs": [[0.7, 0.2, 0.1], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3], [0.5, 0.5, 0.0]],
    }
    arrays = {key: np.array(values, dtype=object if key in ("pred", "gen", "logit") else None)
              for key, values in data.items()}
    value = call_metric(name, arrays)
    assert type(value) is float
    assert same_value(value, call_metric(name, data))


@pytest.mark.parametrize("name", sorted(METRICS))
def test_an_unknown_label_is_refused_naming_the_parameter(name: str) -> None:
    data = {"true": ["A", "B"], "pred": ["A", "B"], "gen": ["A", "B"], "logit": ["A", "B"],
            "probs": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]}
    needs = METRICS[name].needs
    parameter = {"pred": "pred", "true+pred": "pred", "gen+logit": "logit", "true+probs": "true"}[needs]
    data[parameter] = ["A", "D"]
    with pytest.raises(ValueError, match=rf"y_{parameter}\[1\] is 'D'"):
        call_metric(name, data)


@pytest.mark.parametrize("name", sorted(METRICS))
@pytest.mark.parametrize("labels", [("A",), ("A", "A", "B"), "ABC", ("A", None), (["A"], "B")])
def test_a_bad_label_order_is_refused_naming_labels(name: str, labels: Any) -> None:
    data = {"true": ["A"], "pred": ["A"], "gen": ["A"], "logit": ["A"], "probs": [[1.0, 0.0, 0.0]]}
    with pytest.raises(ValueError, match=r"^labels "):
        call_metric(name, data, labels=labels)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_custom_labels_are_accepted(name: str) -> None:
    data = {"true": ["low", "high"], "pred": ["high", "high"], "gen": ["low", "high"],
            "logit": ["high", "high"], "probs": [[0.4, 0.6], [0.1, 0.9]]}
    assert type(call_metric(name, data, labels=("low", "high"))) is float


# --- reference computations -----------------------------------------------------------------------

@HYPOTHESIS
@given(data=datasets(min_size=1))
def test_accuracy_matches_sklearn(data: dict[str, Any]) -> None:
    expected = sk_accuracy_score(data["true"], with_sentinel(data["pred"]))
    assert same_value(accuracy(data["true"], data["pred"]), expected)


@HYPOTHESIS
@given(data=datasets())
def test_confusion_matrix_matches_sklearn(data: dict[str, Any]) -> None:
    table = confusion_matrix(data["true"], data["pred"])
    assert all(type(count) is int for row in table for count in row)
    if not data["true"]:
        assert table == [[0] * 4 for _ in LABELS]
        return
    expected = sk_confusion_matrix(data["true"], with_sentinel(data["pred"]),
                                   labels=[*LABELS, "unparsable"])
    # sklearn's last row is the (never seen) reference "unparsable"; ours has no such row.
    assert table == expected[: len(LABELS)].tolist()


@HYPOTHESIS
@given(data=datasets())
def test_label_rates_match_a_direct_count(data: dict[str, Any]) -> None:
    pairs = list(zip(data["true"], data["pred"], strict=True))
    parsed = [(URGENCY[t], URGENCY[p]) for t, p in pairs if p is not None]
    over = sum(p > t for t, p in parsed)
    under = sum(p < t for t, p in parsed)
    emergency = sum(p == URGENCY["C"] for _, p in parsed)

    def share(count: int, total: int) -> float:
        return count / total if total else math.nan

    assert same_value(parse_rate(data["pred"]), share(len(parsed), len(pairs)))
    assert same_value(risk_propensity(data["pred"]), share(emergency, len(parsed)))
    assert same_value(over_triage_rate(data["true"], data["pred"]), share(over, len(parsed)))
    assert same_value(under_triage_rate(data["true"], data["pred"]), share(under, len(parsed)))
    assert same_value(risk_sensitivity(data["true"], data["pred"]), share(over, over + under))


@HYPOTHESIS
@given(data=datasets())
def test_consistency_rate_matches_a_direct_count(data: dict[str, Any]) -> None:
    pairs = zip(data["gen"], data["logit"], strict=True)
    compared = [(g, s) for g, s in pairs if g is not None and s is not None]
    agree = sum(g == s for g, s in compared)
    expected = 100 * agree / len(compared) if compared else math.nan
    assert same_value(consistency_rate(data["gen"], data["logit"]), expected)


def plain_ece(y_true: list[str], probs: list[list[float]], n_bins: int) -> float:
    """ECE written independently: a mask per bin, gaps weighted by the bin's share of cases."""
    probs_array = np.array(probs, dtype=float)
    truth = np.array([URGENCY[label] for label in y_true])
    confidence = probs_array.max(axis=1)
    correct = (probs_array.argmax(axis=1) == truth).astype(float)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = (confidence > lo) & (confidence <= hi)
        if b == 0:
            inside |= confidence == 0
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return total


@HYPOTHESIS
@given(data=datasets(min_size=1), n_bins=st.integers(1, 20))
def test_expected_calibration_error_matches_a_plain_numpy_computation(data: dict[str, Any],
                                                                       n_bins: int) -> None:
    value = expected_calibration_error(data["true"], data["probs"], n_bins=n_bins)
    assert same_value(value, plain_ece(data["true"], data["probs"], n_bins))


@HYPOTHESIS
@given(data=datasets(min_size=1))
def test_brier_score_matches_sklearn_multiclass(data: dict[str, Any]) -> None:
    expected = sk_brier_score_loss(data["true"], data["probs"], labels=list(LABELS), scale_by_half=False)
    assert same_value(brier_score(data["true"], data["probs"]), expected)


@HYPOTHESIS
@given(st.lists(st.tuples(st.sampled_from(["no", "yes"]), distributions(n_labels=2)), min_size=1,
                max_size=30))
def test_brier_score_is_twice_sklearns_binary_brier_score(cases: list[tuple[str, list[float]]]) -> None:
    y_true = [label for label, _ in cases]
    probs = [row for _, row in cases]
    binary = sk_brier_score_loss([label == "yes" for label in y_true], [row[1] for row in probs])
    assert same_value(brier_score(y_true, probs, labels=("no", "yes")), 2 * binary)


def test_brier_score_one_hot_computation() -> None:
    probs = [[0.6, 0.3, 0.1], [0.0, 0.0, 1.0], [0.2, 0.5, 0.3]]
    y_true = ["A", "A", "B"]
    one_hot = np.eye(3)[[0, 0, 1]]
    expected = float(((np.array(probs) - one_hot) ** 2).sum(axis=1).mean())
    assert brier_score(y_true, probs) == pytest.approx(expected)
    assert brier_score(["A"], [[0.0, 0.0, 1.0]]) == 2.0
    assert brier_score(["C"], [[0.0, 0.0, 1.0]]) == 0.0


# --- properties -----------------------------------------------------------------------------------

@HYPOTHESIS
@given(data=datasets(min_size=1))
def test_over_under_and_accuracy_on_parsable_cases_add_up_to_one(data: dict[str, Any]) -> None:
    parsable = [(t, p) for t, p in zip(data["true"], data["pred"], strict=True) if p is not None]
    over = over_triage_rate(data["true"], data["pred"])
    under = under_triage_rate(data["true"], data["pred"])
    if not parsable:
        assert math.isnan(over) and math.isnan(under)
        return
    accuracy_on_parsable = accuracy([t for t, _ in parsable], [p for _, p in parsable])
    assert over + under + accuracy_on_parsable == pytest.approx(1.0)
    # accuracy over all cases is accuracy on the parsable ones scaled by the parse rate
    assert accuracy(data["true"], data["pred"]) == pytest.approx(
        accuracy_on_parsable * parse_rate(data["pred"]))


@HYPOTHESIS
@given(data=datasets())
def test_risk_sensitivity_is_a_share_of_errors_or_nan(data: dict[str, Any]) -> None:
    value = risk_sensitivity(data["true"], data["pred"])
    has_error = any(p is not None and p != t for t, p in zip(data["true"], data["pred"], strict=True))
    if has_error:
        assert 0.0 <= value <= 1.0
        over = over_triage_rate(data["true"], data["pred"])
        under = under_triage_rate(data["true"], data["pred"])
        assert value == pytest.approx(over / (over + under))
    else:
        assert math.isnan(value)


@HYPOTHESIS
@given(y_true=st.lists(reference_labels, min_size=1, max_size=30), n_bins=st.integers(1, 20))
def test_ece_is_zero_for_one_hot_correct_probabilities(y_true: list[str], n_bins: int) -> None:
    probs = np.eye(3)[[URGENCY[label] for label in y_true]]
    assert expected_calibration_error(y_true, probs, n_bins=n_bins) == 0.0
    assert brier_score(y_true, probs) == 0.0


@HYPOTHESIS
@given(groups=st.lists(st.sampled_from([2, 3, 4]), min_size=1, max_size=6),
       n_bins=st.integers(1, 20))
def test_ece_is_zero_when_each_bins_accuracy_equals_its_confidence(groups: list[int], n_bins: int) -> None:
    # Each group: 4 cases of confidence k/4 on label A, k of them with reference A. Every group is
    # calibrated on its own, so any bin (however groups fall into bins) has accuracy = confidence.
    y_true: list[str] = []
    probs: list[list[float]] = []
    for k in groups:
        confidence = k / 4
        row = [confidence, (1 - confidence) / 2, (1 - confidence) / 2]
        for case in range(4):
            y_true.append("A" if case < k else "B")
            probs.append(row)
    assert expected_calibration_error(y_true, probs, n_bins=n_bins) == pytest.approx(0.0, abs=1e-12)


@HYPOTHESIS
@given(data=datasets(min_size=1))
def test_ece_with_one_bin_is_the_gap_between_accuracy_and_mean_confidence(data: dict[str, Any]) -> None:
    probs = np.array(data["probs"])
    correct = probs.argmax(axis=1) == np.array([URGENCY[label] for label in data["true"]])
    expected = abs(correct.mean() - probs.max(axis=1).mean())
    assert expected_calibration_error(data["true"], data["probs"], n_bins=1) == pytest.approx(expected)


@HYPOTHESIS
@given(data=datasets(), n_bins=st.integers(1, 20))
def test_reliability_bins_tile_the_unit_interval_and_reproduce_ece(data: dict[str, Any], n_bins: int) -> None:
    bins = reliability_bins(data["true"], data["probs"], n_bins=n_bins)
    assert len(bins) == n_bins
    assert bins[0]["lo"] == 0.0 and bins[-1]["hi"] == 1.0
    assert all(before["hi"] == after["lo"] for before, after in itertools.pairwise(bins))
    assert sum(b["count"] for b in bins) == len(data["true"])
    for b in bins:
        assert type(b["count"]) is int
        assert all(type(b[key]) is float for key in ("lo", "hi", "mean_confidence", "accuracy"))
        if b["count"]:
            assert b["lo"] < b["mean_confidence"] <= b["hi"] + 1e-12
            assert 0.0 <= b["accuracy"] <= 1.0
        else:
            assert math.isnan(b["mean_confidence"]) and math.isnan(b["accuracy"])
    total = len(data["true"])
    gaps = [b["count"] / total * abs(b["accuracy"] - b["mean_confidence"]) for b in bins if b["count"]]
    recomputed = sum(gaps) if total else math.nan
    assert same_value(recomputed, expected_calibration_error(data["true"], data["probs"], n_bins=n_bins))


def test_a_confidence_on_a_bin_edge_goes_in_the_bin_it_closes() -> None:
    probs = [[0.3, 0.3, 0.4], [0.5, 0.25, 0.25], [1.0, 0.0, 0.0]]
    bins = reliability_bins(["C", "A", "A"], probs, n_bins=10)
    assert [b["count"] for b in bins] == [0, 0, 0, 1, 1, 0, 0, 0, 0, 1]
    assert [b["count"] for b in reliability_bins(["A"], [[0.5, 0.5, 0.0]], n_bins=2)] == [1, 0]


def test_a_tie_picks_the_first_label_in_order() -> None:
    tie = [[0.5, 0.5, 0.0]]
    assert reliability_bins(["A"], tie, n_bins=1)[0]["accuracy"] == 1.0
    assert reliability_bins(["B"], tie, n_bins=1)[0]["accuracy"] == 0.0
    assert expected_calibration_error(["B"], tie, n_bins=1) == 0.5


def test_risk_propensity_counts_the_last_label_as_most_urgent() -> None:
    assert risk_propensity(["A", "C", "C", None]) == pytest.approx(2 / 3)
    assert risk_propensity(["A", "C", "C", None], labels=("C", "B", "A")) == pytest.approx(1 / 3)


def test_over_and_under_triage_follow_the_label_order() -> None:
    y_true, y_pred = ["A", "C"], ["C", "A"]
    assert over_triage_rate(y_true, y_pred) == 0.5
    assert over_triage_rate(y_true, y_pred, labels=("C", "B", "A")) == 0.5
    assert risk_sensitivity(["A"], ["B"]) == 1.0
    assert risk_sensitivity(["A"], ["B"], labels=("C", "B", "A")) == 0.0


# --- per-case terms -------------------------------------------------------------------------------

@HYPOTHESIS
@given(data=datasets())
@pytest.mark.parametrize("name", RATIO_METRICS)
def test_every_ratio_metric_is_its_summed_numerator_over_its_summed_denominator(name: str,
                                                                               data: dict[str, Any]) -> None:
    terms = ratio_terms(name, *inputs_of(name, data))
    n = len(data["true"])
    for column in (terms.numerator, terms.denominator):
        assert column.dtype == np.float64 and column.shape == (n,)
    assert (terms.denominator >= 0).all()
    total = float(terms.denominator.sum())
    expected = float(terms.numerator.sum()) / total if total != 0 else math.nan
    assert same_value(call_metric(name, data), expected)
    # The metric function is computed from these terms, so it gives their value exactly.
    assert same_value(call_metric(name, data), terms.value(), tolerance=0.0)


@HYPOTHESIS
@given(data=datasets(), n_bins=st.integers(1, 20))
def test_ece_is_its_summed_bin_gaps_over_its_summed_weights(data: dict[str, Any], n_bins: int) -> None:
    terms = calibration_terms(data["true"], data["probs"], n_bins=n_bins)
    n = len(data["true"])
    assert terms.gaps.dtype == np.float64 and terms.gaps.shape == (n, n_bins)
    assert terms.weight.tolist() == [1.0] * n
    assert (np.count_nonzero(terms.gaps, axis=1) <= 1).all()  # a case's gap sits in its own bin only
    for b, column in zip(reliability_bins(data["true"], data["probs"], n_bins=n_bins), terms.gaps.T, strict=True):
        if b["count"]:
            assert column.sum() == pytest.approx(b["count"] * (b["accuracy"] - b["mean_confidence"]), abs=1e-9)
        else:
            assert not column.any()
    total = float(terms.weight.sum())
    expected = float(np.abs(terms.gaps.sum(axis=0)).sum()) / total if total else math.nan
    value = expected_calibration_error(data["true"], data["probs"], n_bins=n_bins)
    assert same_value(value, expected)
    assert same_value(value, terms.value(), tolerance=0.0)


@HYPOTHESIS
@given(data=datasets(min_size=1), seed=st.integers(0, 2**32 - 1))
@pytest.mark.parametrize("name", sorted(METRICS))
def test_terms_weighted_by_draw_counts_give_the_metric_of_the_resample(name: str, data: dict[str, Any],
                                                                       seed: int) -> None:
    # What a paired bootstrap relies on: a resample's metric from count-weighted sums of the terms.
    n = len(data["true"])
    draws = np.random.default_rng(seed).integers(0, n, size=(4, n))
    counts = np.vstack([np.ones(n), [np.bincount(cases, minlength=n) for cases in draws]])
    terms = terms_of(name, data)
    values = terms.from_sums(counts @ terms.columns)
    assert values.shape == (5,)
    assert same_value(float(values[0]), call_metric(name, data))
    for value, cases in zip(values[1:], draws, strict=True):
        resample = {key: [column[i] for i in cases] for key, column in data.items()}
        assert same_value(float(value), call_metric(name, resample))


def test_terms_of_cases_that_count_for_nothing_leave_the_metric_unchanged() -> None:
    terms = ratio_terms("over_triage_rate", ["A", "B", "C"], ["B", None, "A"])
    padded = RatioTerms(np.append(terms.numerator, 0.0), np.append(terms.denominator, 0.0))
    assert padded.value() == terms.value() == 0.5
    calibration = calibration_terms(["A", "C"], [[0.7, 0.2, 0.1], [0.6, 0.1, 0.3]], n_bins=4)
    padded_calibration = CalibrationTerms(np.vstack([calibration.gaps, np.zeros(4)]),
                                          np.append(calibration.weight, 0.0))
    assert padded_calibration.value() == calibration.value()
    assert math.isnan(RatioTerms([1.0], [0.0]).value())
    assert math.isnan(CalibrationTerms(np.zeros((1, 3)), [0.0]).value())


@pytest.mark.parametrize(("name", "fault"), [
    (name, fault) for name in sorted(METRICS) for fault in ("unknown label", "length", "label order")
    if not (fault == "length" and METRICS[name].needs == "pred")])  # one array has no length to mismatch
def test_terms_check_their_inputs_as_the_metric_does(name: str, fault: str) -> None:
    data: dict[str, Any] = {"true": ["A", "B"], "pred": ["A", "B"], "gen": ["A", "B"], "logit": ["A", "B"],
                            "probs": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]}
    options: dict[str, Any] = {}
    if fault == "label order":
        options["labels"] = ("A", "A", "B")
    else:
        last = {"pred": "pred", "true+pred": "pred", "gen+logit": "logit", "true+probs": "probs"}[METRICS[name].needs]
        data[last] = data[last][:1] if fault == "length" else [data[last][0], "D"]
    with pytest.raises(ValueError) as from_metric:
        call_metric(name, data, **options)
    with pytest.raises(ValueError) as from_terms:
        terms_of(name, data, **options)
    assert str(from_terms.value) == str(from_metric.value)


@pytest.mark.parametrize(("arguments", "error", "message"), [
    (("f1", ["A"], ["A"]), ValueError, r"metric must be one of the ratio metrics \(accuracy, .*\), got 'f1'$"),
    ((None, ["A"]), ValueError, r"got None$"),
    (("expected_calibration_error", ["A"], [[1.0, 0.0, 0.0]]), ValueError, r"its terms are calibration_terms'"),
    (("accuracy", ["A"]), TypeError, r"^accuracy takes 2 arrays \(y_true, y_pred\), got 1$"),
    (("parse_rate", ["A"], ["A"]), TypeError, r"^parse_rate takes 1 array \(y_pred\), got 2$"),
    (("brier_score", ["A"]), TypeError, r"^brier_score takes 2 arrays \(y_true, probs\), got 1$"),
])
def test_ratio_terms_refuses_what_is_not_a_ratio_metric_and_its_arrays(arguments: tuple[Any, ...],
                                                                      error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        ratio_terms(*arguments)


@pytest.mark.parametrize(("build", "message"), [
    (lambda: RatioTerms([1.0, 0.0], [1.0]), r"numerator and denominator must have the same length, got 2 and 1"),
    (lambda: RatioTerms([[1.0]], [1.0]), r"numerator must be one-dimensional, .* shape \(1, 1\)"),
    (lambda: CalibrationTerms([0.1, 0.2], [1.0, 1.0]), r"gaps must have shape \(cases, bins\), .* shape \(2,\)"),
    (lambda: CalibrationTerms(np.zeros((2, 3)), [1.0]), r"gaps and weight must have the same length, got 2 and 1"),
])
def test_terms_refuse_columns_of_different_cases(build: Callable[[], Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


# --- undefined values ------------------------------------------------------------------------------

@pytest.mark.parametrize(("function", "arguments"), [
    (risk_propensity, ([None, None],)),
    (over_triage_rate, (["A", "B"], [None, None])),
    (under_triage_rate, (["A", "B"], [None, None])),
    (risk_sensitivity, (["A", "B"], [None, None])),
    (risk_sensitivity, (["A", "B", "C"], ["A", "B", "C"])),
    (risk_sensitivity, (["A", "B"], ["A", None])),
    (consistency_rate, ([None, None], ["A", "B"])),
    (consistency_rate, (["A", "B"], [None, None])),
    (consistency_rate, (["A", None], [None, "B"])),
])
def test_undefined_values_are_nan(function: Callable[..., float], arguments: tuple[Any, ...]) -> None:
    value = function(*arguments)
    assert type(value) is float and math.isnan(value)


def test_all_unparsable_predictions_score_zero_accuracy_and_parse_rate() -> None:
    assert accuracy(["A", "B"], [None, None]) == 0.0
    assert parse_rate([None, None]) == 0.0


def test_consistency_rate_leaves_out_cases_without_a_logit_label() -> None:
    assert consistency_rate(["A", "B", "C"], ["A", None, "B"]) == 50.0
    assert consistency_rate(["A", "B"], ["A", "B"]) == 100.0


def test_empty_probability_input_gives_nan_and_empty_bins() -> None:
    assert math.isnan(expected_calibration_error([], np.zeros((0, 3))))
    assert math.isnan(brier_score([], np.zeros((0, 3))))
    assert [b["count"] for b in reliability_bins([], [], n_bins=3)] == [0, 0, 0]


# --- input checks ---------------------------------------------------------------------------------

ONE_HOT = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


@pytest.mark.parametrize(("function", "arguments", "options", "message"), [
    (accuracy, (["A"], ["A", "B"]), {}, r"y_true and y_pred must have the same length, got 1 and 2"),
    (over_triage_rate, (["A", "B"], ["A"]), {}, r"y_true and y_pred .* got 2 and 1"),
    (confusion_matrix, (["A"], ["A", "B"]), {}, r"y_true and y_pred .* got 1 and 2"),
    (consistency_rate, (["A"], ["A", "B"]), {}, r"y_gen and y_logit .* got 1 and 2"),
    (accuracy, (["A", None], ["A", "B"]), {}, r"y_true\[1\] is None"),
    (under_triage_rate, (["A", "E"], ["A", "B"]), {}, r"y_true\[1\] is 'E'"),
    (risk_sensitivity, (["A", "B"], ["A", "b"]), {}, r"y_pred\[1\] is 'b'"),
    (parse_rate, ([["A"]],), {}, r"y_pred\[0\] is \['A'\]"),
    (consistency_rate, (["X"], ["A"]), {}, r"y_gen\[0\] is 'X'"),
    (accuracy, ("ABC", ["A", "B", "C"]), {}, r"y_true must be a sequence of labels, got the string 'ABC'"),
    (parse_rate, (np.array([["A", "B"]]),), {}, r"y_pred must be one-dimensional, got .* shape \(1, 2\)"),
    (risk_propensity, (3,), {}, r"y_pred must be a sequence of labels, got int"),
    (brier_score, (["A", None], ONE_HOT), {}, r"y_true\[1\] is None"),
    (brier_score, (["A"], ONE_HOT), {}, r"y_true and probs .* got 1 labels and 2 probability rows"),
    (expected_calibration_error, (["A", "B"], [[0.5, 0.4, 0.0], [0.0, 1.0, 0.0]]), {},
     r"probs\[0\] is \[0.5, 0.4, 0.0\], which sums to 0.9"),
    (expected_calibration_error, (["A"], [[1.2, -0.2, 0.0]]), {}, r"probs\[0\] .* must be non-negative"),
    (brier_score, (["A"], [[math.nan, 0.5, 0.5]]), {}, r"probs\[0\] .* must be finite"),
    (brier_score, (["A"], [[0.5, 0.5]]), {}, r"probs must have shape \(cases, 3\).* got shape \(1, 2\)"),
    (reliability_bins, (["A"], [0.2, 0.3, 0.5]), {}, r"probs must have shape .* got shape \(3,\)"),
    (brier_score, (["A", "B"], [[1.0, 0.0, 0.0], [1.0]]), {}, r"probs must be a 2-D array of numbers"),
    (brier_score, (["A"], [["x", 0.5, 0.5]]), {}, r"probs must be a 2-D array of numbers"),
    (expected_calibration_error, (["A", "B"], ONE_HOT), {"n_bins": 0},
     r"n_bins must be a positive integer, got 0"),
    (expected_calibration_error, (["A", "B"], ONE_HOT), {"n_bins": -3}, r"n_bins .* got -3"),
    (reliability_bins, (["A", "B"], ONE_HOT), {"n_bins": 2.5}, r"n_bins .* got 2.5"),
    (reliability_bins, (["A", "B"], ONE_HOT), {"n_bins": True}, r"n_bins .* got True"),
    (confusion_matrix, (["A"], ["A"]), {"labels": ("A", "A")}, r"labels must be distinct, got \['A', 'A'\]"),
    (accuracy, (["A"], ["A"]), {"labels": ("A",)}, r"labels must hold at least two labels, got \['A'\]"),
    (accuracy, (["A"], ["A"]), {"labels": "ABC"}, r"labels must be a sequence .* got 'ABC'"),
    (parse_rate, (["A"],), {"labels": ("A", None)}, r"labels must not contain None"),
    (parse_rate, (["A"],), {"labels": (["A"], "B")}, r"labels must be hashable"),
])
def test_bad_input_is_refused_with_a_message_naming_the_parameter(
        function: Callable[..., Any], arguments: tuple[Any, ...], options: dict[str, Any],
        message: str) -> None:
    with pytest.raises(ValueError, match=message):
        function(*arguments, **options)


def test_a_distribution_within_the_tolerance_is_accepted() -> None:
    assert brier_score(["A"], [[1.0 - 5e-7, 0.0, 0.0]]) == pytest.approx(0.0, abs=1e-12)
    numpy_integer: Any = np.int64(3)
    assert expected_calibration_error(["A", "B"], ONE_HOT, n_bins=numpy_integer) == 0.0
