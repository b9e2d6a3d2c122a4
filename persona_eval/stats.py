"""Paired significance tests, agreement coefficients and the multiplicity correction, as thin checked wrappers
over statsmodels and scipy."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from scipy import stats as scipy_stats
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.inter_rater import cohens_kappa as sm_cohens_kappa
from statsmodels.stats.inter_rater import fleiss_kappa as sm_fleiss_kappa

from persona_eval.arrays import as_1d_list, describe

__all__ = [
    "MCNEMAR_CHI_SQUARE",
    "MCNEMAR_CHI_SQUARE_UNCORRECTED",
    "MCNEMAR_EXACT",
    "MCNEMAR_EXACT_BELOW",
    "KappaResult",
    "McNemarResult",
    "PairedTResult",
    "StatResult",
    "cohens_kappa",
    "fleiss_kappa",
    "holm",
    "mcnemar",
    "paired_t",
]


# ---------------------------------------------------------------------------------------------------------
# Result types
# ---------------------------------------------------------------------------------------------------------

def _coerce_builtin_fields(instance: Any) -> None:
    """Turn every float/int field into a builtin float/int.

    Results travel between pytest-xdist workers and the controller, whose serializer accepts builtin
    types only; a numpy.float64 slipping through would fail far from where it was made.
    """
    for field in fields(instance):
        value = getattr(instance, field.name)
        if field.type == "float":
            object.__setattr__(instance, field.name, float(value))
        elif field.type == "int":
            object.__setattr__(instance, field.name, int(value))
        elif field.type == "str":
            object.__setattr__(instance, field.name, str(value))


@dataclass(frozen=True)
class StatResult:
    """The result of a test or coefficient: plain builtin values, safe to send between processes.

    ``statistic`` and ``pvalue`` may be NaN (or inf where a function documents it); ``to_json`` keeps
    them as floats, which Python's json module writes as ``NaN`` / ``Infinity``.
    """

    statistic: float
    pvalue: float
    method: str
    n: int

    def __post_init__(self) -> None:
        _coerce_builtin_fields(self)

    def to_json(self) -> dict[str, Any]:
        """The fields as a dict of builtin values, in declaration order."""
        return {field.name: getattr(self, field.name) for field in fields(self)}


@dataclass(frozen=True)
class McNemarResult(StatResult):
    """McNemar's test; ``n01`` counts pairs with a false and b true, ``n10`` a true and b false, and
    ``method`` names the test used (exact binomial or chi-square, see :func:`mcnemar`)."""

    n01: int
    n10: int

    @property
    def discordant(self) -> int:
        """The number of pairs on which a and b differ, ``n01 + n10``."""
        return self.n01 + self.n10


@dataclass(frozen=True)
class PairedTResult(StatResult):
    """The paired t-test; ``mean_difference`` is the mean of ``a - b`` (scipy's sign convention)."""

    mean_difference: float


@dataclass(frozen=True)
class KappaResult(StatResult):
    """An agreement coefficient (``statistic`` is kappa) with the number of raters and categories seen."""

    n_raters: int
    n_categories: int


# ---------------------------------------------------------------------------------------------------------
# Input checks (the boundary: every message names the parameter and shows what it got)
# ---------------------------------------------------------------------------------------------------------

def _is_nan(value: Any) -> bool:
    return isinstance(value, (float, np.floating)) and bool(np.isnan(value))


def _check_same_length(a: Sequence[Any] | np.ndarray, b: Sequence[Any] | np.ndarray, name_a: str,
                       name_b: str) -> None:
    if len(a) != len(b):
        raise ValueError(
            f"{name_a} and {name_b} must have the same length (one entry per paired case), "
            f"got {len(a)} and {len(b)}"
        )


def _as_booleans(values: Any, name: str) -> np.ndarray:
    items = as_1d_list(values, name)
    for position, value in enumerate(items):
        is_number = isinstance(value, (bool, int, float, np.bool_, np.integer, np.floating))
        if not (is_number and value in (0, 1)):
            raise ValueError(
                f"{name} must contain only booleans (or 0/1), got {describe(value)} at position {position}"
            )
    return np.array([bool(value) for value in items], dtype=bool)


def _as_finite_numbers(values: Any, name: str) -> np.ndarray:
    items = as_1d_list(values, name)
    numbers = np.empty(len(items), dtype=float)
    for position, value in enumerate(items):
        if isinstance(value, (str, bytes)) or value is None:
            raise ValueError(f"{name} must contain numbers, got {describe(value)} at position {position}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"{name} must contain numbers, got {describe(value)} at position {position}"
            ) from None
        if not math.isfinite(number):
            raise ValueError(f"{name} must contain finite numbers, got {number!r} at position {position}")
        numbers[position] = number
    return numbers


def _check_category(value: Any, name: str, position: Any) -> None:
    if _is_nan(value):
        raise ValueError(
            f"{name} contains NaN at position {position}; use None or an explicit label for a missing rating"
        )
    if not isinstance(value, Hashable):
        raise ValueError(
            f"{name} must contain hashable category labels, got {type(value).__name__} "
            f"{describe(value)} at position {position}"
        )


def _as_categories(values: Any, name: str) -> list[Hashable]:
    items = as_1d_list(values, name)
    for position, value in enumerate(items):
        _check_category(value, name, position)
    return items


def _as_probabilities(values: Any, name: str) -> np.ndarray:
    items = as_1d_list(values, name)
    pvalues = np.empty(len(items), dtype=float)
    for position, value in enumerate(items):
        is_number = isinstance(value, (bool, int, float, np.bool_, np.integer, np.floating))
        if not (is_number and (_is_nan(value) or 0 <= value <= 1)):
            raise ValueError(
                f"{name} must contain p-values in [0, 1] (or NaN), "
                f"got {describe(value)} at position {position}"
            )
        pvalues[position] = float(value)
    return pvalues


# ---------------------------------------------------------------------------------------------------------
# Paired tests
# ---------------------------------------------------------------------------------------------------------

MCNEMAR_EXACT = "McNemar exact binomial"
MCNEMAR_CHI_SQUARE = "McNemar continuity-corrected chi-square"
MCNEMAR_CHI_SQUARE_UNCORRECTED = "McNemar uncorrected chi-square"
# Below this many discordant pairs the chi-square approximation is poor and the exact test is used.
MCNEMAR_EXACT_BELOW = 25


def mcnemar(a: Sequence[bool | int] | np.ndarray, b: Sequence[bool | int] | np.ndarray, *,
            exact: bool | None = None, correction: bool = True) -> McNemarResult:
    """McNemar's test of paired binary outcomes (e.g. correct under a persona vs under the baseline).

    Only the discordant pairs carry information: ``n01`` cases where ``a`` is false and ``b`` true and
    ``n10`` cases where ``a`` is true and ``b`` false, ``discordant = n01 + n10``. The test is
    ``statsmodels.stats.contingency_tables.mcnemar`` on the 2x2 table of ``a`` by ``b``:

    - exact binomial (``method`` = ``MCNEMAR_EXACT``), two-sided::

          statistic = min(n01, n10),   pvalue = min(1, 2 * P[Binomial(discordant, 1/2) <= statistic])

    - chi-square with 1 degree of freedom (``MCNEMAR_CHI_SQUARE``, or ``MCNEMAR_CHI_SQUARE_UNCORRECTED``
      when ``correction`` is false)::

          statistic = (|n01 - n10| - c)^2 / discordant,   c = 1 if correction else 0

      statsmodels does not floor the correction at zero: ``n01 == n10 > 0`` gives ``1 / discordant``.

    By default the exact test is used when ``discordant < MCNEMAR_EXACT_BELOW`` (25), where the
    chi-square approximation is poor, and the chi-square test otherwise; ``result.method`` names the
    test used. When the two never disagree (``discordant == 0``, including empty input) there is no
    evidence of a difference: ``statistic = 0.0`` and ``pvalue = 1.0``, whichever test is named
    (statsmodels' chi-square would divide 0 by 0).

    Parameters
    ----------
    a, b : sequences of bool (or 0/1), one entry per matched case, same length.
    exact : True for the exact binomial test, False for the chi-square test, None (default) to choose
        by the number of discordant pairs as above.
    correction : apply the continuity correction to the chi-square statistic (ignored by the exact test).

    Examples
    --------
    >>> persona = [True, True, False, True, True, True, False, True]
    >>> baseline = [False, True, False, False, True, False, False, True]
    >>> result = mcnemar(persona, baseline)
    >>> result.method, result.n01, result.n10, result.statistic, result.pvalue
    ('McNemar exact binomial', 0, 3, 0.0, 0.25)
    >>> forced = mcnemar(persona, baseline, exact=False)
    >>> forced.method, round(forced.statistic, 4), round(forced.pvalue, 4)
    ('McNemar continuity-corrected chi-square', 1.3333, 0.2482)
    >>> mcnemar([True, False], [True, False]).pvalue
    1.0
    """
    first = _as_booleans(a, "a")
    second = _as_booleans(b, "b")
    _check_same_length(first, second, "a", "b")
    if exact is not None and not isinstance(exact, (bool, np.bool_)):
        raise ValueError(f"exact must be True, False or None, got {describe(exact)}")
    if not isinstance(correction, (bool, np.bool_)):
        raise ValueError(f"correction must be True or False, got {describe(correction)}")
    n01 = int(np.count_nonzero(~first & second))
    n10 = int(np.count_nonzero(first & ~second))
    discordant = n01 + n10
    use_exact = discordant < MCNEMAR_EXACT_BELOW if exact is None else bool(exact)
    if use_exact:
        method = MCNEMAR_EXACT
    elif correction:
        method = MCNEMAR_CHI_SQUARE
    else:
        method = MCNEMAR_CHI_SQUARE_UNCORRECTED
    if discordant == 0:
        statistic, pvalue = 0.0, 1.0
    else:
        table = [[int(np.count_nonzero(first & second)), n10], [n01, int(np.count_nonzero(~first & ~second))]]
        library = sm_mcnemar(table, exact=use_exact, correction=bool(correction))
        statistic, pvalue = float(library.statistic), float(library.pvalue)
    return McNemarResult(statistic=statistic, pvalue=pvalue, method=method, n=len(first), n01=n01, n10=n10)


def paired_t(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> PairedTResult:
    """Two-sided paired t-test on matched numeric values, as ``scipy.stats.ttest_rel(a, b)``.

    With differences ``d = a - b`` over ``n`` pairs::

        statistic = mean(d) / (sd(d) / sqrt(n)),   sd with ddof = 1,   df = n - 1
        pvalue = 2 * P[T_df >= |statistic|]

    Defined values where scipy gives NaN or a rounding artefact:

    - ``n < 2``: statistic, p-value and (for ``n == 0``) ``mean_difference`` are NaN.
    - every difference exactly 0: ``statistic = 0.0``, ``pvalue = 1.0`` (no difference at all).
    - every difference the same non-zero value: ``statistic = ±inf`` (the sign of the difference),
      ``pvalue = 0.0`` (a perfectly consistent shift).

    Differences so close that their variance underflows to 0 are treated as these last two cases.

    Parameters
    ----------
    a, b : sequences of finite numbers, one entry per matched case, same length.

    Examples
    --------
    >>> result = paired_t([0.9, 0.8, 0.7, 0.95], [0.7, 0.75, 0.7, 0.8])
    >>> round(result.statistic, 4), round(result.pvalue, 4), round(result.mean_difference, 4)
    (2.1909, 0.1162, 0.1)
    >>> paired_t([1.0, 2.0], [1.0, 2.0]).pvalue
    1.0
    >>> paired_t([2.0, 3.0], [1.0, 2.0]).statistic
    inf
    """
    first = _as_finite_numbers(a, "a")
    second = _as_finite_numbers(b, "b")
    _check_same_length(first, second, "a", "b")
    n = len(first)
    differences = first - second
    mean_difference = float(differences.mean()) if n else math.nan
    if n < 2:
        statistic = pvalue = math.nan
    elif np.all(differences == differences[0]):
        # Decided before scipy, whose mean of equal values can be off by a rounding step: an exact shift
        # would come out as a huge but finite t, with a precision-loss warning.
        statistic, pvalue = _constant_shift(float(differences[0]))
    else:
        library = scipy_stats.ttest_rel(first, second)
        statistic, pvalue = float(library.statistic), float(library.pvalue)
        if not math.isfinite(statistic):  # differences so close that their variance underflows to 0
            statistic, pvalue = _constant_shift(mean_difference)
    return PairedTResult(statistic=statistic, pvalue=pvalue, method="paired t-test", n=n,
                         mean_difference=mean_difference)


def _constant_shift(difference: float) -> tuple[float, float]:
    """The t statistic and p-value of differences without spread: no difference, or a certain one."""
    if difference == 0.0:
        return 0.0, 1.0
    return math.copysign(math.inf, difference), 0.0


# ---------------------------------------------------------------------------------------------------------
# Agreement
# ---------------------------------------------------------------------------------------------------------

def cohens_kappa(r1: Sequence[Hashable] | np.ndarray, r2: Sequence[Hashable] | np.ndarray, *,
                 labels: Sequence[Hashable] | None = None) -> KappaResult:
    """Cohen's kappa between two raters of the same items, with a z-test of kappa = 0.

    With observed agreement ``p_o`` (share of items both raters put in the same category) and chance
    agreement ``p_e = sum_k p1_k * p2_k`` from each rater's category shares::

        kappa = (p_o - p_e) / (1 - p_e)

    The p-value is two-sided, from ``z = kappa / sqrt(var0)`` with the variance under kappa = 0 of
    Fleiss, Cohen & Everitt (1969)::

        var0 = (p_e + p_e^2 - sum_k p1_k p2_k (p1_k + p2_k)) / (n (1 - p_e)^2)

    Kappa and the p-value are ``statsmodels.stats.inter_rater.cohens_kappa(table)``'s ``kappa`` and
    ``pvalue_two_sided``, on the table of ``r1`` by ``r2``.

    Undefined values are NaN, never an error: kappa is NaN when ``p_e == 1`` (both raters used one and
    the same single category, so chance explains all agreement) and for empty input; the p-value is NaN
    also when ``var0 == 0`` (one rater used a single category, or the raters share no category).

    Categories are any hashable values (strings, ints, None for "no answer"); NaN is refused as
    ambiguous. ``labels``, if given, is the full category set: a rating outside it is an error (unlike
    scikit-learn, which drops such items); unused labels do not change kappa.

    Examples
    --------
    >>> rater_1 = ["urgent", "urgent", "routine", "routine", "urgent", "routine"]
    >>> rater_2 = ["urgent", "routine", "routine", "routine", "urgent", "routine"]
    >>> round(cohens_kappa(rater_1, rater_2).statistic, 4)
    0.6667
    >>> import math
    >>> math.isnan(cohens_kappa(["a", "a"], ["a", "a"]).statistic)
    True
    """
    first = _as_categories(r1, "r1")
    second = _as_categories(r2, "r2")
    _check_same_length(first, second, "r1", "r2")
    if labels is None:
        categories = list(dict.fromkeys(first + second))
    else:
        categories = _as_categories(labels, "labels")
        if not categories:
            raise ValueError("labels must list at least one category, got an empty sequence")
        if len(set(categories)) != len(categories):
            raise ValueError(f"labels must not repeat a category, got {describe(categories)}")
    index = {category: position for position, category in enumerate(categories)}
    for name, ratings in (("r1", first), ("r2", second)):
        for position, value in enumerate(ratings):
            if value not in index:
                raise ValueError(f"{name} contains {describe(value)} at position {position}, "
                                 f"which is not in labels {describe(categories)}")
    n = len(first)
    method = "Cohen's kappa (z-test of kappa = 0)"
    if n == 0:
        return KappaResult(statistic=math.nan, pvalue=math.nan, method=method, n=0, n_raters=2,
                           n_categories=len(categories))
    table = np.zeros((len(categories), len(categories)), dtype=np.int64)
    np.add.at(table, ([index[value] for value in first], [index[value] for value in second]), 1)
    # The undefined cases are read off which categories each rater used, exactly: statsmodels would
    # divide by 1 - p_e or var0, in floating point, where they are zero or a rounding error from it.
    used_by_r1 = table.sum(axis=1) > 0
    used_by_r2 = table.sum(axis=0) > 0
    if np.count_nonzero(used_by_r1 | used_by_r2) == 1:  # p_e == 1
        kappa = pvalue = math.nan
    elif (np.count_nonzero(used_by_r1) == 1 or np.count_nonzero(used_by_r2) == 1
          or not np.any(used_by_r1 & used_by_r2)):  # exactly the tables with var0 == 0
        kappa, pvalue = float(sm_cohens_kappa(table, return_results=False)), math.nan
    else:
        # statsmodels also takes the square root of var_kappa (not used here), which rounds a little
        # below zero when kappa is 1.
        with np.errstate(invalid="ignore"):
            library = sm_cohens_kappa(table)
        kappa, pvalue = float(library.kappa), float(library.pvalue_two_sided)
    return KappaResult(statistic=kappa, pvalue=pvalue, method=method, n=n, n_raters=2,
                       n_categories=len(categories))


def fleiss_kappa(ratings: Sequence[Sequence[Hashable]] | np.ndarray) -> KappaResult:
    """Fleiss' kappa for many raters: one row per item, one column per rater, any hashable categories.

    With ``N`` items, ``m`` raters per item and ``n_ij`` raters putting item ``i`` in category ``j``::

        P_i   = (sum_j n_ij^2 - m) / (m (m - 1))          agreement on item i
        p_j   = sum_i n_ij / (N m)                         share of category j
        kappa = (mean_i P_i - sum_j p_j^2) / (1 - sum_j p_j^2)

    Kappa is ``statsmodels.stats.inter_rater.fleiss_kappa`` of the item x category counts (what
    ``aggregate_raters(ratings)[0]`` gives, for any hashable categories). Every item needs the same number
    of raters (at least 2). No test of kappa = 0 is made: ``pvalue`` is always NaN (use a bootstrap over
    items for an interval). Kappa is NaN for no items and when every rating is the same single category
    (chance agreement is then 1).

    Examples
    --------
    >>> ratings = [["ESI-2", "ESI-2", "ESI-2"],
    ...            ["ESI-3", "ESI-3", "ESI-2"],
    ...            ["ESI-3", "ESI-3", "ESI-3"],
    ...            ["ESI-4", "ESI-3", "ESI-4"]]
    >>> result = fleiss_kappa(ratings)
    >>> round(result.statistic, 4), result.n, result.n_raters, result.n_categories
    (0.4545, 4, 3, 3)
    """
    if isinstance(ratings, (str, bytes)):
        raise ValueError(f"ratings must be a table (one row per item), got the string {describe(ratings)}")
    if not isinstance(ratings, (np.ndarray, list, tuple)) and hasattr(ratings, "__array__"):
        ratings = np.asarray(ratings, dtype=object)  # a pandas DataFrame iterates over its column names
    if isinstance(ratings, np.ndarray):
        if ratings.ndim != 2:
            raise ValueError(f"ratings must be two-dimensional (items x raters), got shape {ratings.shape}")
        rows = ratings.tolist()
    else:
        try:
            rows = [as_1d_list(row, f"ratings[{item}]") for item, row in enumerate(ratings)]
        except TypeError:
            raise ValueError(f"ratings must be a table (one row per item), got {type(ratings).__name__}") \
                from None
    method = "Fleiss' kappa"
    if not rows:
        return KappaResult(statistic=math.nan, pvalue=math.nan, method=method, n=0, n_raters=0,
                           n_categories=0)
    raters = len(rows[0])
    for item, row in enumerate(rows):
        if len(row) != raters:
            raise ValueError(f"ratings must have the same number of raters for every item: item 0 has "
                             f"{raters}, item {item} has {len(row)}")
        for rater, value in enumerate(row):
            _check_category(value, "ratings", f"[{item}][{rater}]")
    if raters < 2:
        raise ValueError(f"ratings must have at least 2 raters per item, got {raters}")
    index: dict[Hashable, int] = {}
    for row in rows:
        for value in row:
            index.setdefault(value, len(index))
    counts = np.zeros((len(rows), len(index)), dtype=np.int64)
    for item, row in enumerate(rows):
        for value in row:
            counts[item, index[value]] += 1
    # A single category overall makes chance agreement 1, and statsmodels' kappa 0 / 0.
    kappa = math.nan if len(index) == 1 else float(sm_fleiss_kappa(counts))
    return KappaResult(statistic=kappa, pvalue=math.nan, method=method, n=len(rows), n_raters=raters,
                       n_categories=len(index))


# ---------------------------------------------------------------------------------------------------------
# Multiple comparisons
# ---------------------------------------------------------------------------------------------------------

def holm(pvalues: Sequence[float] | np.ndarray) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error rate), in input order.

    With the ``m`` non-NaN p-values sorted ascending, ``p_(1) <= ... <= p_(m)``::

        adjusted_(i) = min(1, max_{j <= i} (m - j + 1) p_(j))

    as ``statsmodels.stats.multitest.multipletests(pvalues, method="holm")[1]``. NaN p-values (a test
    that could not be run) are returned as NaN and do not count in ``m``. Ties get equal values.

    Examples
    --------
    >>> holm([0.01, 0.04, 0.03, float("nan")])
    [0.03, 0.06, 0.06, nan]
    """
    values = _as_probabilities(pvalues, "pvalues")
    adjusted = np.full(len(values), math.nan)
    present = np.flatnonzero(~np.isnan(values))
    order = present[np.argsort(values[present], kind="stable")]
    family = len(order)
    if family:
        # multipletests' arithmetic, not a call to it: its Holm branch runs a full gc.collect() every
        # time, about 0.2 s per family in a run's heap (over a minute for the golden run's 324 families).
        scaled = (family - np.arange(family)) * values[order]
        adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return [float(value) for value in adjusted]
