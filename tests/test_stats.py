"""Tests of persona_eval.stats: reference comparisons, published examples, properties and edge cases."""

from __future__ import annotations

import dataclasses
import doctest
import inspect
import itertools
import json
import math
import warnings
from collections.abc import Callable
from typing import Any

import execnet
import numpy as np
import pytest
import scipy.stats
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats import inter_rater
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.multitest import multipletests

from persona_eval import stats
from persona_eval.stats import (
    MCNEMAR_CHI_SQUARE,
    MCNEMAR_CHI_SQUARE_UNCORRECTED,
    MCNEMAR_EXACT,
    cohens_kappa,
    fleiss_kappa,
    holm,
    mcnemar,
    paired_t,
)

# Reference comparisons run many random inputs, but the machine is shared: keep the counts modest.
REFERENCE = settings(max_examples=100, deadline=None)


# ---------------------------------------------------------------------------------------------------------
# The harness: every public function, with a typical call, what it returns and its properties
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Spec:
    call: Callable[[], Any]
    returns: str  # "result", "interval" or "adjusted"
    properties: frozenset[str]


SPECS: dict[str, Spec] = {
    "mcnemar": Spec(
        call=lambda: mcnemar([True, True, False, True, False], [False, True, False, False, True]),
        returns="result", properties=frozenset({"symmetric", "pvalue_in_unit_interval"})),
    "paired_t": Spec(
        call=lambda: paired_t([0.9, 0.7, 0.8, 0.4], [0.8, 0.75, 0.6, 0.3]),
        returns="result", properties=frozenset({"antisymmetric", "pvalue_in_unit_interval"})),
    "cohens_kappa": Spec(
        call=lambda: cohens_kappa(["a", "b", "b", None], ["a", "b", "a", None]),
        returns="result", properties=frozenset({"symmetric", "at_most_one", "item_permutation_invariant"})),
    "fleiss_kappa": Spec(
        call=lambda: fleiss_kappa([["a", "a", "b"], ["b", "b", "b"], ["a", "c", "c"]]),
        returns="result",
        properties=frozenset({"at_most_one", "item_permutation_invariant", "rater_permutation_invariant"})),
    "holm": Spec(
        call=lambda: holm([0.01, 0.2, float("nan"), 0.03]),
        returns="adjusted", properties=frozenset({"monotone", "at_least_raw", "capped_at_one"})),
}


def test_every_public_function_is_in_the_harness() -> None:
    public_functions = {name for name in stats.__all__ if inspect.isfunction(getattr(stats, name))}
    assert public_functions == set(SPECS)


def test_every_public_function_has_a_docstring_with_an_example() -> None:
    for name in SPECS:
        docstring = inspect.getdoc(getattr(stats, name)) or ""
        assert ">>> " in docstring, f"{name} has no runnable example"


def test_docstring_examples_run() -> None:
    outcome = doctest.testmod(stats, optionflags=doctest.ELLIPSIS)
    assert outcome.attempted > 0
    assert outcome.failed == 0


@pytest.mark.parametrize("name", sorted(SPECS))
def test_results_are_builtin_values_that_cross_process_boundaries(name: str) -> None:
    spec = SPECS[name]
    value: Any = spec.call()
    if spec.returns == "adjusted":
        assert isinstance(value, list)
        assert all(type(item) is float for item in value)
        execnet.dumps(value)
        return
    assert isinstance(value, stats.StatResult)
    with pytest.raises(dataclasses.FrozenInstanceError):
        value.method = "changed"  # type: ignore[misc]
    payload = value.to_json()
    assert [field.name for field in dataclasses.fields(value)] == list(payload)
    for key, item in payload.items():
        assert type(item) in (float, int, str), f"{name}.{key} is {type(item).__name__}"
    execnet.dumps(payload)  # what pytest-xdist uses between workers and the controller
    assert json.loads(json.dumps(payload)).keys() == payload.keys()
    assert type(value.statistic) is float
    assert type(value.pvalue) is float
    assert type(value.n) is int
    assert value.method


def test_numpy_scalars_given_to_a_result_become_builtins() -> None:
    result = loose.McNemarResult(statistic=np.float64(1.5), pvalue=np.float32(0.5), method="m",
                                 n=np.int64(3), n01=np.int32(1), n10=np.int64(2))
    assert [type(value) for value in result.to_json().values()] == [float, float, str, int, int, int]


# ---------------------------------------------------------------------------------------------------------
# Validation at the boundary: ValueError whose message names the parameter
# ---------------------------------------------------------------------------------------------------------

# Deliberately wrong inputs: called through an untyped handle so the type checker lets them through.
loose: Any = stats

BAD_CALLS: list[tuple[str, Callable[[], Any], str]] = [
    ("mcnemar lengths", lambda: loose.mcnemar([True], [True, False]),
     r"^a and b must have the same length.*1 and 2"),
    ("mcnemar non-boolean a", lambda: loose.mcnemar([True, 2], [True, False]),
     r"^a must contain only booleans.*2"),
    ("mcnemar None in b", lambda: loose.mcnemar([True, False], [None, True]),
     r"^b must contain only booleans.*None"),
    ("mcnemar string", lambda: loose.mcnemar("TF", [True, False]), r"^a must be a sequence"),
    ("mcnemar 2-D", lambda: loose.mcnemar(np.ones((2, 2), bool), [True, False]),
     r"^a must be one-dimensional"),
    ("mcnemar nan", lambda: loose.mcnemar([1.0, math.nan], [1, 0]), r"^a must contain only booleans.*nan"),
    ("mcnemar exact", lambda: loose.mcnemar([True], [False], exact="yes"),
     r"^exact must be True, False or None, got 'yes'"),
    ("mcnemar correction", lambda: loose.mcnemar([True], [False], correction=1),
     r"^correction must be True or False, got 1"),
    ("paired_t nan", lambda: loose.paired_t([1.0, math.nan], [1.0, 2.0]), r"^a must contain finite numbers"),
    ("paired_t text", lambda: loose.paired_t([1.0, 2.0], ["x", 2.0]), r"^b must contain numbers.*'x'"),
    ("paired_t lengths", lambda: loose.paired_t([1.0, 2.0, 3.0], [1.0, 2.0]),
     r"^a and b must have the same length"),
    ("paired_t scalar", lambda: loose.paired_t(3.0, [1.0]), r"^a must be a sequence"),
    ("kappa lengths", lambda: loose.cohens_kappa(["a"], ["a", "b"]), r"^r1 and r2 must have the same length"),
    ("kappa nan", lambda: loose.cohens_kappa(["a", math.nan], ["a", "b"]), r"^r1 contains NaN at position 1"),
    ("kappa unhashable", lambda: loose.cohens_kappa(["a", "b"], [["a"], "b"]), r"^r2 must contain hashable"),
    ("kappa outside labels", lambda: loose.cohens_kappa(["a", "c"], ["a", "b"], labels=["a", "b"]),
     r"^r1 contains 'c' at position 1, which is not in labels"),
    ("kappa repeated labels", lambda: loose.cohens_kappa(["a"], ["a"], labels=["a", "a"]),
     r"^labels must not repeat"),
    ("kappa empty labels", lambda: loose.cohens_kappa(["a"], ["a"], labels=[]),
     r"^labels must list at least one"),
    ("fleiss ragged", lambda: loose.fleiss_kappa([["a", "b"], ["a", "b", "c"]]),
     r"^ratings must have the same number of raters.*item 0 has 2, item 1 has 3"),
    ("fleiss one rater", lambda: loose.fleiss_kappa([["a"], ["b"]]),
     r"^ratings must have at least 2 raters.*1"),
    ("fleiss 1-D array", lambda: loose.fleiss_kappa(np.array(["a", "b"])),
     r"^ratings must be two-dimensional"),
    ("fleiss string row", lambda: loose.fleiss_kappa(["ab", "ab"]), r"^ratings\[0\] must be a sequence"),
    ("fleiss nan", lambda: loose.fleiss_kappa([[1.0, math.nan]]),
     r"^ratings contains NaN at position \[0\]\[1\]"),
    ("fleiss not a table", lambda: loose.fleiss_kappa(5), r"^ratings must be a table"),
    ("holm above one", lambda: loose.holm([0.5, 1.5]),
     r"^pvalues must contain p-values in \[0, 1\].*1.5.*position 1"),
    ("holm text", lambda: loose.holm(["0.1"]), r"^pvalues must contain p-values"),
    ("holm negative", lambda: loose.holm([-0.1]), r"^pvalues must contain p-values.*-0.1"),
    ("holm 2-D", lambda: loose.holm(np.zeros((2, 2))), r"^pvalues must be one-dimensional"),
]


@pytest.mark.parametrize(("label", "call", "message"), BAD_CALLS, ids=[case[0] for case in BAD_CALLS])
def test_bad_input_raises_value_error_naming_the_parameter(label: str, call: Callable[[], Any],
                                                           message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_every_public_function_is_checked_for_bad_input() -> None:
    checked = {label.split()[0] for label, _, _ in BAD_CALLS}
    aliases = {"kappa": "cohens_kappa", "fleiss": "fleiss_kappa"}
    assert {aliases.get(name, name) for name in checked} == set(SPECS)


# ---------------------------------------------------------------------------------------------------------
# McNemar
# ---------------------------------------------------------------------------------------------------------

paired_booleans = st.lists(st.tuples(st.booleans(), st.booleans()), max_size=80)


def _table(pairs: list[tuple[bool, bool]]) -> np.ndarray:
    table = np.zeros((2, 2), dtype=int)
    for first, second in pairs:
        table[int(first), int(second)] += 1
    return table


exact_options = st.one_of(st.none(), st.booleans())


def _split(pairs: list[tuple[bool, bool]]) -> tuple[list[bool], list[bool]]:
    return [first for first, _ in pairs], [second for _, second in pairs]


def _discordant_pairs(n01: int, n10: int, concordant: int = 3) -> list[tuple[bool, bool]]:
    return [(False, True)] * n01 + [(True, False)] * n10 + [(True, True)] * concordant + [(False, False)]


@REFERENCE
@given(pairs=paired_booleans, exact=exact_options, correction=st.booleans())
def test_mcnemar_matches_statsmodels(pairs: list[tuple[bool, bool]], exact: bool | None, correction: bool) -> None:
    a, b = _split(pairs)
    result = mcnemar(a, b, exact=exact, correction=correction)
    table = _table(pairs)
    assert (result.n01, result.n10, result.n) == (table[0, 1], table[1, 0], len(pairs))
    assert result.discordant == result.n01 + result.n10
    used_exact = result.discordant < 25 if exact is None else exact
    chi_square = MCNEMAR_CHI_SQUARE if correction else MCNEMAR_CHI_SQUARE_UNCORRECTED
    assert result.method == (MCNEMAR_EXACT if used_exact else chi_square)
    if result.discordant == 0:
        assert (result.statistic, result.pvalue) == (0.0, 1.0)  # statsmodels' chi-square divides 0 by 0 here
        return
    reference = sm_mcnemar(table, exact=used_exact, correction=correction)
    assert result.statistic == pytest.approx(float(reference.statistic), rel=1e-12)
    assert result.pvalue == pytest.approx(float(reference.pvalue), rel=1e-9, abs=1e-15)


@REFERENCE
@given(pairs=paired_booleans, exact=exact_options, correction=st.booleans())
def test_mcnemar_is_symmetric_and_pvalue_is_a_probability(pairs: list[tuple[bool, bool]], exact: bool | None,
                                                          correction: bool) -> None:
    a, b = _split(pairs)
    forward = mcnemar(a, b, exact=exact, correction=correction)
    backward = mcnemar(b, a, exact=exact, correction=correction)
    assert (forward.statistic, forward.pvalue, forward.method) == \
        (backward.statistic, backward.pvalue, backward.method)
    assert (forward.n01, forward.n10) == (backward.n10, backward.n01)
    assert 0.0 <= forward.pvalue <= 1.0


@REFERENCE
@given(n01=st.integers(0, 40), n10=st.integers(0, 40), exact=exact_options)
def test_mcnemar_depends_only_on_the_discordant_counts_symmetrically(n01: int, n10: int,
                                                                    exact: bool | None) -> None:
    forward = mcnemar(*_split(_discordant_pairs(n01, n10)), exact=exact)
    swapped = mcnemar(*_split(_discordant_pairs(n10, n01, concordant=11)), exact=exact)
    assert (forward.statistic, forward.pvalue, forward.method) == (swapped.statistic, swapped.pvalue, swapped.method)
    assert 0.0 <= forward.pvalue <= 1.0


@pytest.mark.parametrize(("n01", "n10", "method"), [
    (0, 24, MCNEMAR_EXACT), (9, 15, MCNEMAR_EXACT), (12, 12, MCNEMAR_EXACT),
    (0, 25, MCNEMAR_CHI_SQUARE), (10, 15, MCNEMAR_CHI_SQUARE), (3, 40, MCNEMAR_CHI_SQUARE),
])
def test_mcnemar_is_exact_below_25_discordant_pairs_and_chi_square_from_25(n01: int, n10: int,
                                                                         method: str) -> None:
    pairs = _discordant_pairs(n01, n10)
    result = mcnemar(*_split(pairs))
    assert result.method == method
    assert result.discordant == n01 + n10
    reference = sm_mcnemar(_table(pairs), exact=method == MCNEMAR_EXACT, correction=True)
    assert result.statistic == pytest.approx(float(reference.statistic), rel=1e-12)
    assert result.pvalue == pytest.approx(float(reference.pvalue), rel=1e-12)


def test_mcnemar_can_be_forced_to_either_test() -> None:
    small = _split(_discordant_pairs(1, 6))
    large = _split(_discordant_pairs(10, 30))
    assert mcnemar(*small, exact=False).method == MCNEMAR_CHI_SQUARE
    assert mcnemar(*small, exact=False, correction=False).method == MCNEMAR_CHI_SQUARE_UNCORRECTED
    assert mcnemar(*large, exact=True).method == MCNEMAR_EXACT
    assert mcnemar(*large, exact=True).statistic == 10.0
    assert mcnemar(*large, exact=True).pvalue == pytest.approx(2 * scipy.stats.binom.cdf(10, 40, 0.5))


def test_mcnemar_on_a_small_stratum_gives_the_exact_pvalue_not_the_chi_square() -> None:
    # An emergency stratum of 12 cases in which the persona is right on 5 cases the baseline gets wrong,
    # and never the other way round: two-sided exact p = 2 / 2^5 = 0.0625, while the corrected chi-square
    # (5 - 1)^2 / 5 = 3.2 would claim p = 0.074.
    persona = [True] * 5 + [True] * 4 + [False] * 3
    baseline = [False] * 5 + [True] * 4 + [False] * 3
    result = mcnemar(persona, baseline)
    assert (result.method, result.n01, result.n10, result.n) == (MCNEMAR_EXACT, 0, 5, 12)
    assert result.statistic == 0.0
    assert result.pvalue == pytest.approx(0.0625, rel=1e-12)
    table = [[4, 5], [0, 3]]
    assert result.pvalue == pytest.approx(float(sm_mcnemar(table, exact=True).pvalue), rel=1e-12)
    chi_square = float(sm_mcnemar(table, exact=False, correction=True).pvalue)
    assert chi_square == pytest.approx(float(scipy.stats.chi2.sf(3.2, 1)))
    assert abs(result.pvalue - chi_square) > 0.01


def test_mcnemar_agresti_presidential_approval() -> None:
    # Agresti, An Introduction to Categorical Data Analysis (2nd ed., 2007), Table 8.1: approval of the
    # President's performance by 1600 Americans in two surveys a month apart. Approve/approve 794,
    # approve/disapprove 150, disapprove/approve 86, disapprove/disapprove 570. By hand:
    # z = (86 - 150) / sqrt(86 + 150) = -4.17, so chi-square = 64^2 / 236 = 4096 / 236 = 17.36;
    # with the continuity correction (64 - 1)^2 / 236 = 3969 / 236 = 16.82; p = 2 P(Z > 4.166) = 3.1e-5.
    # 236 discordant pairs: the default is the chi-square test.
    first = [True] * 794 + [True] * 150 + [False] * 86 + [False] * 570
    second = [True] * 794 + [False] * 150 + [True] * 86 + [False] * 570
    plain = mcnemar(first, second, correction=False)
    assert (plain.n10, plain.n01, plain.n, plain.discordant) == (150, 86, 1600, 236)
    assert plain.method == MCNEMAR_CHI_SQUARE_UNCORRECTED
    assert round(plain.statistic, 2) == 17.36
    assert plain.statistic == pytest.approx(4096 / 236)
    assert plain.pvalue == pytest.approx(2 * scipy.stats.norm.sf(64 / math.sqrt(236)))
    assert plain.pvalue == pytest.approx(3.1e-5, abs=0.05e-5)
    corrected = mcnemar(first, second)
    assert corrected.statistic == pytest.approx(3969 / 236)
    assert corrected.pvalue == pytest.approx(float(scipy.stats.chi2.sf(3969 / 236, 1)))
    assert corrected.method == MCNEMAR_CHI_SQUARE == "McNemar continuity-corrected chi-square"


def test_mcnemar_without_discordant_pairs_gives_p_one() -> None:
    for exact in (None, False, True):
        for correction in (False, True):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no division by zero, not even a warning
                result = mcnemar([True, False, True], [True, False, True], exact=exact, correction=correction)
            assert (result.statistic, result.pvalue, result.n01, result.n10) == (0.0, 1.0, 0, 0)
    default = mcnemar([True, False], [True, False])
    assert default.method == MCNEMAR_EXACT == "McNemar exact binomial"
    empty = mcnemar([], [])
    assert (empty.statistic, empty.pvalue, empty.n, empty.method) == (0.0, 1.0, 0, MCNEMAR_EXACT)


def test_mcnemar_accepts_numpy_booleans_and_zero_one() -> None:
    from_numpy = mcnemar(np.array([True, False, True]), np.array([1, 1, 0]), exact=np.bool_(False))
    from_lists = mcnemar([1, 0, 1], [True, True, False], exact=False)
    assert from_numpy == from_lists
    assert (from_numpy.n01, from_numpy.n10) == (1, 1)


def test_mcnemar_corrected_statistic_follows_statsmodels_when_counts_are_equal() -> None:
    # The correction is not floored at zero: |3 - 3| - 1 squared over 6.
    result = mcnemar([True] * 3 + [False] * 3, [False] * 3 + [True] * 3, exact=False)
    assert result.statistic == pytest.approx(1 / 6)
    assert result.pvalue == pytest.approx(float(sm_mcnemar([[0, 3], [3, 0]], exact=False).pvalue))


# ---------------------------------------------------------------------------------------------------------
# Paired t
# ---------------------------------------------------------------------------------------------------------

values = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)
paired_values = st.lists(st.tuples(values, values), min_size=2, max_size=40)


@REFERENCE
@given(pairs=paired_values)
def test_paired_t_matches_scipy_ttest_rel(pairs: list[tuple[float, float]]) -> None:
    a = np.array([first for first, _ in pairs])
    b = np.array([second for _, second in pairs])
    differences = a - b
    # Near-constant differences make both implementations divide rounding noise; exactly constant ones
    # are the documented special case tested below.
    assume(np.std(differences) > 1e-6 * (1.0 + np.abs(differences).max()))
    result = paired_t(a, b)
    reference = scipy.stats.ttest_rel(a, b)
    assert result.statistic == pytest.approx(float(reference.statistic), rel=1e-7, abs=1e-12)
    assert result.pvalue == pytest.approx(float(reference.pvalue), rel=1e-6, abs=1e-12)
    assert result.mean_difference == pytest.approx(float(np.mean(differences)), rel=1e-9, abs=1e-9)
    assert result.n == len(pairs)


@REFERENCE
@given(pairs=paired_values)
def test_paired_t_is_antisymmetric(pairs: list[tuple[float, float]]) -> None:
    a = [first for first, _ in pairs]
    b = [second for _, second in pairs]
    forward, backward = paired_t(a, b), paired_t(b, a)
    assert forward.statistic == pytest.approx(-backward.statistic, rel=1e-9, abs=1e-12)
    assert forward.pvalue == pytest.approx(backward.pvalue, rel=1e-9, abs=1e-12)
    assert 0.0 <= forward.pvalue <= 1.0


def test_paired_t_student_sleep_data() -> None:
    # Cushny & Peebles (1905) as analysed by Student (1908), "The probable error of a mean", and shipped as
    # R's `sleep` data: extra hours of sleep of 10 patients under two drugs. R's
    # t.test(extra ~ group, data = sleep, paired = TRUE) reports t = -4.0621, df = 9, p-value = 0.002833,
    # mean difference -1.58 (by hand: differences -1.2 -2.4 -1.3 -1.3 0 -1 -1.8 -0.8 -4.6 -1.4,
    # mean -1.58, sd 1.2300, t = -1.58 / (1.2300 / sqrt(10)) = -4.062).
    drug_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
    drug_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]
    result = paired_t(drug_1, drug_2)
    assert round(result.statistic, 4) == -4.0621
    assert round(result.pvalue, 6) == 0.002833
    assert result.mean_difference == pytest.approx(-1.58)


def test_paired_t_zero_variance_and_small_samples() -> None:
    no_difference = paired_t([0.5, 0.7, 0.9], [0.5, 0.7, 0.9])
    assert (no_difference.statistic, no_difference.pvalue, no_difference.mean_difference) == (0.0, 1.0, 0.0)
    constant_gain = paired_t([2.0, 3.0, 5.0], [1.0, 2.0, 4.0])
    assert (constant_gain.statistic, constant_gain.pvalue) == (math.inf, 0.0)
    constant_loss = paired_t([1.0, 2.0], [2.0, 3.0])
    assert (constant_loss.statistic, constant_loss.pvalue) == (-math.inf, 0.0)
    single = paired_t([1.0], [0.0])
    assert math.isnan(single.statistic) and math.isnan(single.pvalue)
    assert single.mean_difference == 1.0
    empty = paired_t([], [])
    assert math.isnan(empty.statistic) and math.isnan(empty.mean_difference) and empty.n == 0


def test_paired_t_treats_a_variance_that_underflows_as_no_spread() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shift = paired_t([1e-300, 2e-300], [0.0, 0.0])  # variance 5e-601 underflows to 0
        centred = paired_t([1e-300, -1e-300], [0.0, 0.0])
    assert (shift.statistic, shift.pvalue, shift.mean_difference) == (math.inf, 0.0, 1.5e-300)
    assert (centred.statistic, centred.pvalue, centred.mean_difference) == (0.0, 1.0, 0.0)


# ---------------------------------------------------------------------------------------------------------
# Cohen's kappa
# ---------------------------------------------------------------------------------------------------------

ratings_pairs = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=60)


def _sklearn_kappa(r1: list[Any], r2: list[Any], labels: list[Any] | None = None) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(cohen_kappa_score(r1, r2, labels=labels))


def _same_or_both_nan(value: float, reference: float, *, rel: float, abs: float = 0.0) -> bool:
    if math.isnan(reference):
        return math.isnan(value)
    return value == pytest.approx(reference, rel=rel, abs=abs)


@REFERENCE
@given(pairs=ratings_pairs, extra_labels=st.booleans())
def test_cohens_kappa_matches_sklearn(pairs: list[tuple[int, int]], extra_labels: bool) -> None:
    r1 = [first for first, _ in pairs]
    r2 = [second for _, second in pairs]
    labels = [0, 1, 2, 3, 4] if extra_labels else None
    result = cohens_kappa(r1, r2, labels=labels)
    assert _same_or_both_nan(result.statistic, _sklearn_kappa(r1, r2, labels), rel=1e-9, abs=1e-12)
    assert result.n == len(pairs)


@REFERENCE
@given(pairs=ratings_pairs)
def test_cohens_kappa_pvalue_matches_statsmodels(pairs: list[tuple[int, int]]) -> None:
    r1 = [first for first, _ in pairs]
    r2 = [second for _, second in pairs]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = cohens_kappa(r1, r2)
    table = np.zeros((4, 4))
    for first, second in pairs:
        table[first, second] += 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = inter_rater.cohens_kappa(table)
    if math.isnan(result.pvalue):
        # Undefined exactly when the variance under kappa = 0 is zero: a rater who used a single
        # category, or raters who share no category (chance agreement 0 with no agreement).
        assert len(set(r1)) == 1 or len(set(r2)) == 1 or not set(r1) & set(r2)
        assert math.isnan(reference.var_kappa0) or reference.var_kappa0 == pytest.approx(0.0, abs=1e-15)
        return
    assert result.statistic == pytest.approx(float(reference.kappa), rel=1e-9, abs=1e-12)
    assert result.pvalue == pytest.approx(float(reference.pvalue_two_sided), rel=1e-6, abs=1e-12)


@REFERENCE
@given(pairs=ratings_pairs, seed=st.integers(0, 2**32 - 1))
def test_cohens_kappa_is_symmetric_bounded_and_permutation_invariant(pairs: list[tuple[int, int]],
                                                                     seed: int) -> None:
    r1 = [first for first, _ in pairs]
    r2 = [second for _, second in pairs]
    result = cohens_kappa(r1, r2)
    # statsmodels sums in floating point, over the categories in the order first seen: reordered input
    # can turn a kappa of exactly 0 into 1e-17, hence the absolute tolerance here and for Fleiss' kappa.
    assert _same_or_both_nan(cohens_kappa(r2, r1).statistic, result.statistic, rel=1e-12, abs=1e-12)
    order = np.random.default_rng(seed).permutation(len(pairs))
    shuffled = cohens_kappa([r1[i] for i in order], [r2[i] for i in order])
    assert _same_or_both_nan(shuffled.statistic, result.statistic, rel=1e-12, abs=1e-12)
    relabelled = cohens_kappa([f"level {value}" for value in r1], [f"level {value}" for value in r2])
    assert _same_or_both_nan(relabelled.statistic, result.statistic, rel=1e-12, abs=1e-12)
    assert math.isnan(result.statistic) or -1.0 - 1e-12 <= result.statistic <= 1.0 + 1e-12


def test_cohens_kappa_textbook_tables() -> None:
    # Fleiss, Levin & Paik, Statistical Methods for Rates and Proportions (3rd ed., 2003), section 18.1:
    # two raters, 100 subjects, three diagnoses; rows rater A, columns rater B:
    #   [[75, 1, 4], [5, 4, 1], [0, 0, 10]].
    # By hand: p_o = (75 + 4 + 10) / 100 = 0.89; margins A (0.80, 0.10, 0.10), B (0.80, 0.05, 0.15);
    # p_e = 0.64 + 0.005 + 0.015 = 0.66; kappa = (0.89 - 0.66) / 0.34 = 0.676.
    table = [[75, 1, 4], [5, 4, 1], [0, 0, 10]]
    r1, r2 = _raters_from_table(table, ["psychotic", "neurotic", "organic"])
    result = cohens_kappa(r1, r2)
    assert result.statistic == pytest.approx(0.23 / 0.34)
    assert round(result.statistic, 3) == 0.676
    assert result.pvalue == pytest.approx(float(inter_rater.cohens_kappa(np.array(table)).pvalue_two_sided))
    # Wikipedia, "Cohen's kappa", worked example: 50 grant proposals, yes/yes 20, A yes B no 5, A no B yes
    # 10, no/no 15: p_o = 0.7, p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5, kappa = 0.4. And its "same percentages,
    # different numbers" tables: [[45, 15], [25, 15]] gives (0.60 - 0.54) / 0.46 = 3/23 and
    # [[25, 35], [5, 35]] gives (0.60 - 0.46) / 0.54 = 7/27.
    for table, expected in (([[20, 5], [10, 15]], 0.4), ([[45, 15], [25, 15]], 3 / 23),
                            ([[25, 35], [5, 35]], 7 / 27)):
        r1, r2 = _raters_from_table(table, ["yes", "no"])
        assert cohens_kappa(r1, r2).statistic == pytest.approx(expected)


def _raters_from_table(table: list[list[int]], categories: list[str]) -> tuple[list[str], list[str]]:
    r1: list[str] = []
    r2: list[str] = []
    for row, counts in enumerate(table):
        for column, count in enumerate(counts):
            r1 += [categories[row]] * count
            r2 += [categories[column]] * count
    return r1, r2


def test_cohens_kappa_undefined_cases() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided before statsmodels could divide by zero
        one_category = cohens_kappa(["ESI-3"] * 4, ["ESI-3"] * 4)
        one_constant_rater = cohens_kappa(["a", "a", "a"], ["a", "b", "a"])
        no_shared_category = cohens_kappa(["a", "b", "a"], ["c", "c", "d"])
        empty = cohens_kappa([], [])
        perfect = cohens_kappa(["a", "b", None], ["a", "b", None])
    assert math.isnan(one_category.statistic) and math.isnan(one_category.pvalue)
    assert one_constant_rater.statistic == 0.0 and math.isnan(one_constant_rater.pvalue)
    assert no_shared_category.statistic == 0.0 and math.isnan(no_shared_category.pvalue)
    assert math.isnan(empty.statistic) and empty.n == 0
    assert perfect.statistic == 1.0 and perfect.n_categories == 3


def test_cohens_kappa_unused_labels_do_not_change_kappa() -> None:
    r1, r2 = ["a", "b", "a", "b"], ["a", "b", "b", "b"]
    assert cohens_kappa(r1, r2, labels=["a", "b", "c"]).statistic == cohens_kappa(r1, r2).statistic


# ---------------------------------------------------------------------------------------------------------
# Fleiss' kappa
# ---------------------------------------------------------------------------------------------------------

@st.composite
def rating_tables(draw: st.DrawFn) -> list[list[int]]:
    raters = draw(st.integers(2, 6))
    items = draw(st.integers(1, 30))
    row = st.lists(st.integers(0, 3), min_size=raters, max_size=raters)
    return draw(st.lists(row, min_size=items, max_size=items))


def _statsmodels_fleiss(ratings: list[list[int]]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(inter_rater.fleiss_kappa(inter_rater.aggregate_raters(np.array(ratings))[0]))


@REFERENCE
@given(ratings=rating_tables())
def test_fleiss_kappa_matches_statsmodels(ratings: list[list[int]]) -> None:
    result = fleiss_kappa(ratings)
    assert _same_or_both_nan(result.statistic, _statsmodels_fleiss(ratings), rel=1e-9, abs=1e-12)
    assert (result.n, result.n_raters) == (len(ratings), len(ratings[0]))
    assert math.isnan(result.pvalue)


@REFERENCE
@given(ratings=rating_tables(), seed=st.integers(0, 2**32 - 1))
def test_fleiss_kappa_is_invariant_to_item_and_rater_order_and_labels(ratings: list[list[int]],
                                                                      seed: int) -> None:
    rng = np.random.default_rng(seed)
    table = np.array(ratings)
    shuffled = table[rng.permutation(len(table))][:, rng.permutation(table.shape[1])]
    result = fleiss_kappa(ratings)
    assert _same_or_both_nan(fleiss_kappa(shuffled).statistic, result.statistic, rel=1e-12, abs=1e-12)
    labelled = [[("ESI", value) for value in row] for row in ratings]
    assert _same_or_both_nan(fleiss_kappa(labelled).statistic, result.statistic, rel=1e-12, abs=1e-12)
    assert math.isnan(result.statistic) or result.statistic <= 1.0 + 1e-12


def test_fleiss_kappa_wikipedia_worked_example() -> None:
    # Wikipedia, "Fleiss' kappa", worked example: 14 raters put 10 subjects into 5 categories; the table
    # gives n_ij (rows subjects, columns categories). By hand: sum of n_ij^2 = 828, so
    # P_bar = (828 - 140) / (10 * 14 * 13) = 0.378; category totals 20, 28, 39, 21, 32 give
    # P_e = (20^2 + 28^2 + 39^2 + 21^2 + 32^2) / 140^2 = 4170 / 19600 = 0.213;
    # kappa = (0.378 - 0.213) / (1 - 0.213) = 42110 / 200590 = 0.210.
    counts = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
              [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    ratings = [[category for category, count in enumerate(row, start=1) for _ in range(count)]
               for row in counts]
    result = fleiss_kappa(ratings)
    assert result.statistic == pytest.approx(42110 / 200590)
    assert round(result.statistic, 3) == 0.210
    assert (result.n, result.n_raters, result.n_categories) == (10, 14, 5)
    assert result.statistic == pytest.approx(float(inter_rater.fleiss_kappa(np.array(counts))))


def test_fleiss_kappa_undefined_cases_and_objects() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unanimous = fleiss_kappa([["ESI-2", "ESI-2"], ["ESI-2", "ESI-2"]])
        empty = fleiss_kappa([])
    assert math.isnan(unanimous.statistic) and math.isnan(unanimous.pvalue)
    assert math.isnan(empty.statistic) and empty.n == 0
    perfect = fleiss_kappa(np.array([["a", "a", "a"], [None, None, None]], dtype=object))
    assert perfect.statistic == 1.0


def test_pandas_inputs_are_read_by_value() -> None:
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame(
        {"judge_1": ["a", "b", "a"], "judge_2": ["a", "b", "b"], "judge_3": ["a", "a", "b"]}, index=[10, 11, 12])
    assert fleiss_kappa(frame).statistic == fleiss_kappa(frame.to_numpy().tolist()).statistic
    kappa = cohens_kappa(frame["judge_1"], frame["judge_2"])
    assert kappa.statistic == cohens_kappa(["a", "b", "a"], ["a", "b", "b"]).statistic
    outcomes = pandas.Series([True, False, True], index=[5, 6, 7])
    assert mcnemar(outcomes, pandas.Series([False, False, True])).n10 == 1
    assert paired_t(pandas.Series([1.0, 2.0, 4.0]), [0.5, 1.0, 1.0]).n == 3


# ---------------------------------------------------------------------------------------------------------
# Holm
# ---------------------------------------------------------------------------------------------------------

probability = st.one_of(st.floats(min_value=0.0, max_value=1.0), st.sampled_from([0.0, 0.01, 0.05, 0.5, 1.0]))
pvalue_lists = st.lists(st.one_of(probability, st.just(math.nan)), max_size=30)


# Fewer examples: statsmodels' multipletests runs a full gc.collect() on every call (~0.1 s here).
@settings(max_examples=40, deadline=None)
@given(pvalues=pvalue_lists)
def test_holm_matches_statsmodels_and_passes_nan_through(pvalues: list[float]) -> None:
    adjusted = holm(pvalues)
    assert len(adjusted) == len(pvalues)
    present = [i for i, value in enumerate(pvalues) if not math.isnan(value)]
    assert [i for i, value in enumerate(adjusted) if math.isnan(value)] == [
        i for i in range(len(pvalues)) if i not in present]
    if present:
        reference = multipletests([pvalues[i] for i in present], method="holm")[1]
        assert [adjusted[i] for i in present] == pytest.approx(list(reference), rel=1e-12, abs=1e-15)


@REFERENCE
@given(pvalues=st.lists(probability, max_size=30))
def test_holm_is_monotone_and_between_the_raw_and_bonferroni_values(pvalues: list[float]) -> None:
    adjusted = holm(pvalues)
    family = len(pvalues)
    for raw, value in zip(pvalues, adjusted, strict=True):
        assert raw <= value + 1e-15
        assert value <= min(1.0, family * raw) + 1e-15  # Holm never exceeds Bonferroni
    in_order = [adjusted[i] for i in np.argsort(pvalues, kind="stable")]
    assert all(low <= high + 1e-15 for low, high in itertools.pairwise(in_order))


def test_holm_of_nothing_of_nan_only_and_of_an_array() -> None:
    assert holm([]) == []
    assert all(math.isnan(value) for value in holm([math.nan, math.nan]))
    # NaN leaves the family: Holm multiplies the smallest of the two real p-values by 2, not by 3.
    assert holm([0.01, math.nan, 0.04])[0] == pytest.approx(0.02)
    assert holm(np.array([0.01, 0.04])) == pytest.approx([0.02, 0.04])
