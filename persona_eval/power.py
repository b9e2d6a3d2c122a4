"""Statistical power of the suite's paired tests: the smallest difference a comparison could detect (the
minimum detectable effect, MDE) and the number of cases a study needs to detect a given one.

Two tests decide significance in :mod:`persona_eval.comparisons`: McNemar's test of paired binary outcomes
(:func:`persona_eval.stats.mcnemar`) and the paired bootstrap. For McNemar the power here is exact, for
the very rule the suite applies (the exact binomial test below ``MCNEMAR_EXACT_BELOW`` discordant pairs,
the continuity-corrected chi-square from there); for the bootstrap it is the normal approximation.

Notation: ``n`` pairs (cases), ``discordance`` psi = the share of pairs whose outcome differs between the
two conditions, ``difference`` delta = p10 - p01, the share of pairs with the outcome under the first
condition only minus the share with it under the second only (the difference of the two conditions'
shares, as a comparison's ``delta``). A difference needs at least that many disagreeing pairs:
``|delta| <= psi``. ``level`` is the two-sided significance level a p-value must be below.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import optimize, special
from scipy import stats as scipy_stats

from persona_eval.errors import ConfigError
from persona_eval.stats import MCNEMAR_EXACT_BELOW

__all__ = [
    "DEFAULT_POWER",
    "cases_needed",
    "implied_discordance",
    "mcnemar_mde",
    "mcnemar_power",
    "normal_mde",
]

DEFAULT_POWER = 0.8
# Discordant counts further than this from the mean (in standard deviations of Binomial(n, psi), beyond
# a margin of pairs) are left out of the power sum: their total probability is far below 1e-12.
_TAIL_SDS = 10.0
_TAIL_MARGIN = 30
# The MDE is solved for to this absolute precision (a share of the pairs).
_XTOL = 1e-9
# The power of the bootstrap p-value (normal_mde with n_resamples) integrates over this many standard
# normal deviations each side.
_Z_RANGE = 12.0
# cases_needed gives up above this many cases per stratum.
MAX_CASES = 1_000_000


# ---------------------------------------------------------------------------------------------------------
# Input checks (each message names the parameter and shows what it got)
# ---------------------------------------------------------------------------------------------------------

def _check_share(value: object, name: str, *, low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    number = float(value)
    below = number <= 0 if low_open else number < 0
    above = number >= 1 if high_open else number > 1
    if math.isnan(number) or below or above:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ConfigError(f"{name} must be a number in {interval}, got {value!r}")
    return number


def _check_level(alpha: object, power: object | None = None) -> tuple[float, float | None]:
    level = _check_share(alpha, "alpha", low_open=True, high_open=True)
    if power is None:
        return level, None
    target = _check_share(power, "power", low_open=True, high_open=True)
    return level, target


def _check_cases(n: object, name: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ConfigError(f"{name} must be a non-negative whole number of pairs, got {n!r}")
    return int(n)


def _check_difference(difference: object, discordance: float) -> float:
    if isinstance(difference, bool) or not isinstance(difference, (int, float, np.integer, np.floating)) \
            or math.isnan(float(difference)) or abs(float(difference)) > 1:
        raise ConfigError(f"difference must be a number in [-1, 1], got {difference!r}")
    delta = abs(float(difference))
    if delta > discordance:
        raise ConfigError(f"difference {difference!r} is larger than discordance {discordance!r}: a difference "
                          "of delta needs at least a share delta of the pairs to disagree")
    return delta


# ---------------------------------------------------------------------------------------------------------
# The rejection region of stats.mcnemar, for every number of discordant pairs
# ---------------------------------------------------------------------------------------------------------

def _exact_pvalue(smaller: np.ndarray, discordant: np.ndarray) -> np.ndarray:
    # statsmodels' exact McNemar p-value, computed the same way (stats.mcnemar delegates to it)
    return np.minimum(scipy_stats.binom.cdf(smaller, discordant, 0.5) * 2, 1)


def _chi_square_pvalue(smaller: np.ndarray, discordant: np.ndarray) -> np.ndarray:
    # statsmodels' continuity-corrected chi-square p-value, computed the same way (scipy's chi2.sf is chdtrc)
    statistic = (np.abs(discordant - 2 * smaller) - 1) ** 2 / (1.0 * discordant)
    return np.asarray(special.chdtrc(1, statistic))


@lru_cache(maxsize=256)
def _exact_bounds(level: float) -> np.ndarray:
    """For D = 0 .. MCNEMAR_EXACT_BELOW - 1: the largest smaller count that the exact test rejects at
    `level` (-1: none)."""
    bounds = np.full(MCNEMAR_EXACT_BELOW, -1, dtype=np.int64)
    for discordant in range(1, MCNEMAR_EXACT_BELOW):
        smaller = np.arange(discordant // 2 + 1)
        rejected = np.flatnonzero(_exact_pvalue(smaller, np.full_like(smaller, discordant)) < level)
        bounds[discordant] = rejected[-1] if rejected.size else -1  # the p-value rises with the smaller count
    return bounds


def _rejection_region(discordant: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Where :func:`persona_eval.stats.mcnemar` rejects at `level`, given D discordant pairs of which b
    fall one way: ``b <= low`` or ``b >= D - low`` (``low`` = -1: never), and, where ``tie`` is true,
    also ``b = D / 2``.

    The p-value rises as ``min(b, D - b)`` rises towards ``D / 2`` (for the chi-square, up to
    ``|D - 2b| = 1``), so each side of the region is a tail. The tie is the one exception: statsmodels'
    correction is not floored at 0, so ``b = D / 2`` gives the statistic ``1 / D``, which rejects only at
    levels above 0.84 (chi-square with D >= 25).
    """
    low = np.full(discordant.shape, -1, dtype=np.int32)
    tie = np.zeros(discordant.shape, dtype=bool)
    exact = discordant < MCNEMAR_EXACT_BELOW
    low[exact] = _exact_bounds(level)[discordant[exact]]
    chi = ~exact
    if chi.any():
        d = discordant[chi]
        # reject when (D - 2b - 1)^2 / D > t, t the chi-square quantile; then checked on the p-values
        # themselves, so that a rounding at the boundary cannot move it
        threshold = float(special.chdtri(1, level))
        guess = np.ceil((d - 1 - np.sqrt(threshold * d)) / 2).astype(np.int64) - 1
        guess = np.clip(guess, -1, (d - 1) // 2)
        step_up = (guess + 1 <= (d - 1) // 2)
        up = np.where(step_up, guess + 1, guess)
        guess = np.where(step_up & (_chi_square_pvalue(up, d) < level), up, guess)
        down = guess >= 0
        guess = np.where(down & (_chi_square_pvalue(np.maximum(guess, 0), d) >= level), guess - 1, guess)
        low[chi] = guess
        tie[chi] = (d % 2 == 0) & (_chi_square_pvalue(d // 2, d) < level)
    return low, tie


@lru_cache(maxsize=64)
def _region_table(level: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_rejection_region` for D = 0 .. size - 1, kept: a search evaluates the power many times."""
    low, tie = _rejection_region(np.arange(size, dtype=np.int64), level)
    low.flags.writeable = False
    tie.flags.writeable = False
    return low, tie


def _region(discordant: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    last = int(discordant[-1])
    low, tie = _region_table(level, max(1024, 1 << (last + 1).bit_length()))
    return low[discordant], tie[discordant]


# ---------------------------------------------------------------------------------------------------------
# McNemar
# ---------------------------------------------------------------------------------------------------------

def _binomial_pmf(k: np.ndarray, n: np.ndarray | int, p: float | np.ndarray) -> np.ndarray:
    """Binomial probabilities from log-gamma (scipy.special), defined at p = 0 and 1."""
    log = (special.gammaln(np.asarray(n) + 1.0) - special.gammaln(k + 1.0) - special.gammaln(n - k + 1.0)
           + special.xlogy(k, p) + special.xlog1py(n - k, -np.asarray(p)))
    return np.asarray(np.exp(log))


def _power(n: int, discordance: float, difference: float, level: float) -> float:
    """Exact power of stats.mcnemar at `level`; arguments already checked, ``0 <= difference <=
    discordance``."""
    if n == 0 or discordance == 0:
        return 0.0
    spread = _TAIL_SDS * math.sqrt(n * discordance * (1 - discordance)) + _TAIL_MARGIN
    first = max(1, math.floor(n * discordance - spread))
    last = min(n, math.ceil(n * discordance + spread))
    discordant = np.arange(first, last + 1, dtype=np.int64)
    weight = _binomial_pmf(discordant, n, discordance)
    one_way = min(1.0, (discordance + difference) / (2 * discordance))
    low, tie = _region(discordant, level)
    # P(b <= low) + P(b >= D - low), b ~ Binomial(D, one_way), nothing when low = -1; bdtr(k, D, q) is
    # P(b <= k) and bdtrc(k, D, q) is P(b > k)
    lower = np.where(low >= 0, special.bdtr(np.maximum(low, 0), discordant, one_way), 0.0)
    upper = np.where(low >= 0, special.bdtrc(discordant - np.maximum(low, 0) - 1, discordant, one_way), 0.0)
    middle = np.where(tie, _binomial_pmf(discordant // 2, discordant, one_way), 0.0)
    return float(np.clip(np.sum(weight * (lower + upper + middle)), 0.0, 1.0))


def mcnemar_power(n: int, difference: float, *, discordance: float, alpha: float) -> float:
    """Exact power of the suite's McNemar test (:func:`persona_eval.stats.mcnemar`) at the two-sided
    level `alpha`, for `n` pairs, a share `discordance` (psi) of them discordant and a difference
    `difference` (delta = p10 - p01) between the two shares.

    The number of discordant pairs is ``D ~ Binomial(n, psi)``, and of these ``b ~ Binomial(D, q)`` fall
    one way, ``q = (psi + |delta|) / (2 psi)``. With ``R(D)`` the values of ``b`` for which
    ``stats.mcnemar`` gives a p-value below `alpha` (the exact binomial test when ``D < 25``, the
    continuity-corrected chi-square otherwise, exactly as statsmodels computes them)::

        power = sum_D P(D) * P(b in R(D) | D)

    computed in closed form (scipy.special's binomial distribution functions) over the discordant counts
    within ten standard deviations (and 30 pairs) of ``n psi``; the counts left out have a total
    probability below 1e-12, so the result is exact for any ``n`` to that precision. No normal
    approximation is used. The test is two-sided and symmetric: the sign of `difference` does not matter.

    Parameters
    ----------
    n : the number of pairs (cases), ``>= 0``.
    difference : delta in ``[-1, 1]``, with ``|delta| <= discordance``.
    discordance : psi in ``[0, 1]``.
    alpha : the level a p-value must be below, in ``(0, 1)``.

    Examples
    --------
    >>> round(mcnemar_power(200, 0.1, discordance=0.2, alpha=0.05), 4)
    0.8726
    >>> mcnemar_power(200, 0.0, discordance=0.2, alpha=0.05) < 0.05   # the size of the test
    True
    >>> mcnemar_power(5, 1.0, discordance=1.0, alpha=0.05)   # 2 * 0.5**5 = 0.0625: never significant
    0.0
    """
    pairs = _check_cases(n)
    psi = _check_share(discordance, "discordance")
    delta = _check_difference(difference, psi)
    level, _ = _check_level(alpha)
    return _power(pairs, psi, delta, level)


@lru_cache(maxsize=4096)
def _mcnemar_mde(n: int, discordance: float, level: float, target: float) -> float:
    def shortfall(delta: float) -> float:
        return _power(n, max(discordance, delta), delta, level) - target

    if n == 0 or shortfall(1.0) < 0:
        return math.nan
    if shortfall(0.0) >= 0:
        return 0.0
    return float(optimize.brentq(shortfall, 0.0, 1.0, xtol=_XTOL))


def mcnemar_mde(n: int, discordance: float, *, alpha: float, power: float = DEFAULT_POWER) -> float:
    """The minimum detectable effect of the suite's McNemar test: the smallest ``|delta|`` (a share, as
    ``p10 - p01``) that :func:`mcnemar_power` detects with at least `power` at the two-sided level
    `alpha`, on `n` pairs with the observed `discordance`.

    A shift of ``delta`` needs at least a share ``delta`` of the pairs to disagree, so the power of each
    candidate is taken at the discordance ``max(discordance, delta)``: with no discordant pair observed,
    the MDE is the shift in which every disagreeing pair falls one way. Power rises with ``delta``: up to
    the observed discordance, the further ``q`` is from 1/2 the more often a two-sided, symmetric test
    rejects; beyond it, every disagreeing pair falls one way and there are more of them. So the MDE is
    the root of ``power(delta) = power`` on ``[0, 1]`` (Brent's method, to 1e-9).

    Returns NaN when no shift is detectable: even ``delta = 1`` (every pair changes, all one way) is not
    significant at `alpha` with `power`, as on 5 pairs at 0.05 (``2 * 0.5**5 = 0.0625``) or on 8 at 0.005,
    and for ``n = 0``.

    Examples
    --------
    >>> round(mcnemar_mde(200, 0.2, alpha=0.05), 4)
    0.0916
    >>> round(mcnemar_mde(40, 0.0, alpha=0.01), 4)    # no disagreement seen: all of it one way
    0.2454
    >>> import math
    >>> math.isnan(mcnemar_mde(5, 0.1, alpha=0.05))
    True
    """
    pairs = _check_cases(n)
    psi = _check_share(discordance, "discordance")
    level, target = _check_level(alpha, power)
    assert target is not None
    return _mcnemar_mde(pairs, psi, level, target)


def cases_needed(difference: float, *, discordance: float, alpha: float, power: float = DEFAULT_POWER,
                 max_cases: int = MAX_CASES) -> int | None:
    """The fewest pairs (cases per stratum) for which the suite's McNemar test detects a difference of
    `difference` with at least `power` at the two-sided level `alpha`, when a share `discordance` of the
    pairs disagree (:func:`mcnemar_power`, exact).

    Found by doubling, then bisection: the ``n`` returned has power at least `power` and ``n - 1`` less.
    Power rises with ``n`` but for the small saw-tooth of a discrete test, so a case or two more than the
    answer can fall a hair short; plan for a few more. None when even `max_cases` pairs are not enough.

    Examples
    --------
    >>> cases_needed(0.1, discordance=0.2, alpha=0.05)
    168
    >>> cases_needed(0.1, discordance=0.2, alpha=0.05 / 5)
    244
    >>> cases_needed(0.01, discordance=1.0, alpha=0.05, max_cases=1000) is None
    True
    """
    psi = _check_share(discordance, "discordance")
    delta = _check_difference(difference, psi)
    if delta == 0:
        raise ConfigError(f"difference must not be 0: no number of cases detects no difference, got {difference!r}")
    level, target = _check_level(alpha, power)
    assert target is not None
    limit = _check_cases(max_cases, "max_cases")

    def enough(n: int) -> bool:
        return _power(n, psi, delta, level) >= target

    high = min(8, limit)
    while not enough(high):
        if high >= limit:
            return None
        high = min(2 * high, limit)
    low = 0  # enough(low) is false: no pair detects nothing
    while high - low > 1:
        middle = (low + high) // 2
        if enough(middle):
            high = middle
        else:
            low = middle
    return high


# ---------------------------------------------------------------------------------------------------------
# The paired bootstrap
# ---------------------------------------------------------------------------------------------------------

def implied_discordance(standard_error: float, n: int, *, difference: float) -> float:
    """The discordance of ``n`` paired binary outcomes implied by the standard error of the difference of
    their shares, for planning with :func:`cases_needed` when only a bootstrap comparison is at hand.

    A case contributes ``x_i`` in {-1, 0, 1} to the difference ``delta`` (1: the outcome under the first
    condition only), so ``Var(x) = psi - delta^2`` and the bootstrap's ``SE^2 = Var(x) / n``::

        psi = n * SE^2 + delta^2,   clipped to [|delta|, 1]

    Approximate for shares whose denominator is not every case (a rate over the readable answers), and
    as noisy as the standard error itself. NaN for a NaN standard error or ``n = 0``.

    Examples
    --------
    >>> round(implied_discordance(0.03, 200, difference=0.05), 4)
    0.1825
    """
    if isinstance(standard_error, bool) or not isinstance(standard_error, (int, float, np.integer, np.floating)) \
            or float(standard_error) < 0 or math.isinf(float(standard_error)):
        raise ConfigError(f"standard_error must be a finite number >= 0, got {standard_error!r}")
    cases = _check_cases(n)
    if isinstance(difference, bool) or not isinstance(difference, (int, float, np.integer, np.floating)) \
            or not abs(float(difference)) <= 1:
        raise ConfigError(f"difference must be a number in [-1, 1], got {difference!r}")
    if math.isnan(float(standard_error)) or cases == 0:
        return math.nan
    delta = abs(float(difference))
    return min(1.0, max(delta, cases * float(standard_error) ** 2 + delta ** 2))


@lru_cache(maxsize=256)
def _bootstrap_multiplier(level: float, target: float, resamples: int) -> float:
    """The MDE of the suite's bootstrap test in standard errors (see normal_mde); NaN when it can never
    reject."""
    # The most resampled differences on the far side of 0 that still reject: the largest c with
    # 2 (1 + c) / (R + 1) < level, tested as comparisons computes the p-value.
    most = math.ceil(level * (resamples + 1) / 2) - 2
    while most >= 0 and not 2.0 * (1 + most) / (resamples + 1) < level:
        most -= 1
    while 2.0 * (2 + most) / (resamples + 1) < level:
        most += 1
    if most < 0:
        return math.nan
    # Where the far side's expected count crosses c: the integrand's one steep step (at large R), a point
    # for the quadrature to look at.
    crossing = float(scipy_stats.norm.isf(min(0.5, (most + 2.0 / 3.0) / resamples)))

    def shortfall(multiplier: float) -> float:
        # The estimate is multiplier + Z standard errors from 0, Z ~ N(0, 1); the resamples on each side of
        # 0 are binomial. A trapezoid rule on a grid that is fine where the count crosses c.
        grid = np.unique(np.concatenate([
            np.linspace(-_Z_RANGE, _Z_RANGE, 2401),
            *(np.linspace(centre - 1.0, centre + 1.0, 2001) for centre in (crossing - multiplier,
                                                                            -crossing - multiplier))]))
        estimate = multiplier + grid
        rejected = np.minimum(1.0, special.bdtr(most, resamples, special.ndtr(-estimate))
                              + special.bdtr(most, resamples, special.ndtr(estimate)))
        return float(np.trapezoid(rejected * np.exp(-grid * grid / 2) / math.sqrt(2 * math.pi), grid)) - target

    if shortfall(0.0) >= 0:
        return 0.0
    high = float(scipy_stats.norm.isf(level / 2) + scipy_stats.norm.ppf(target)) + 1.0
    while shortfall(high) < 0:
        high *= 2
    return float(optimize.brentq(shortfall, 0.0, high, xtol=1e-10))


def normal_mde(standard_error: float, *, alpha: float, power: float = DEFAULT_POWER, n: int | None = None,
               n_resamples: int | None = None) -> float:
    """The minimum detectable effect of a test of a difference with an approximately normal estimate, such
    as the suite's paired bootstrap, whose `standard_error` is the standard deviation of the resampled
    differences::

        mde = k * SE,   k = z_{1 - alpha/2} + z_{power}

    the difference at which a two-sided test at `alpha` rejects with probability `power` (the other tail
    neglected), in the units of the standard error.

    `n_resamples` (R) makes ``k`` that of the suite's bootstrap p-value itself,
    ``min(1, 2 min(1 + #{d* <= 0}, 1 + #{d* >= 0}) / (R + 1))`` (:mod:`persona_eval.comparisons`), whose
    resolution matters at small levels: below ``alpha`` only when at most ``c`` resampled differences fall
    on the far side of 0, ``c`` the largest count with ``2 (1 + c) / (R + 1) < alpha`` (0 for R = 300 at
    0.01). With the estimate ``Z ~ N(mde / SE, 1)`` standard errors from 0 and the resamples on each side
    of 0 binomial, ``k`` solves (a trapezoid rule over Z, fine where the count on the far side crosses c)::

        E[ P(Binomial(R, Phi(-Z)) <= c) + P(Binomial(R, Phi(Z)) <= c) ] = power

    which tends to the ``k`` above as R grows (1% larger at R = 2000 and 0.01, 11% at R = 300).

    `n`, for a share of ``n`` paired binary outcomes (risk propensity, under- and over-triage rates), floors
    the standard error at that of a shift in which a share ``delta`` of the cases change, all one way,
    ``sqrt(delta (1 - delta) / n)``, as :func:`mcnemar_mde` floors the discordance at ``delta``: without it,
    two conditions that never differ on the cases seen (SE 0) would claim to detect any difference. The
    solution is then::

        mde = max(k * SE, k^2 / (n + k^2))

    Returns NaN for a NaN standard error, ``n = 0``, or too few resamples for any p-value below `alpha`.

    Examples
    --------
    >>> round(normal_mde(0.03, alpha=0.05), 4)
    0.084
    >>> round(normal_mde(0.03, alpha=0.01, n_resamples=300), 4)    # k = 3.78 rather than 3.42
    0.1133
    >>> round(normal_mde(0.0, alpha=0.01, n=40), 4)   # nothing differed on 40 cases
    0.226
    """
    if isinstance(standard_error, bool) or not isinstance(standard_error, (int, float, np.integer, np.floating)):
        raise ConfigError(f"standard_error must be a number, got {standard_error!r}")
    se = float(standard_error)
    if se < 0 or math.isinf(se):
        raise ConfigError(f"standard_error must be a finite number >= 0, got {standard_error!r}")
    level, target = _check_level(alpha, power)
    assert target is not None
    cases = None if n is None else _check_cases(n)
    resamples = None if n_resamples is None else _check_cases(n_resamples, "n_resamples")
    if math.isnan(se) or cases == 0:
        return math.nan
    if resamples is None:
        k = float(scipy_stats.norm.isf(level / 2) + scipy_stats.norm.ppf(target))
    else:
        k = _bootstrap_multiplier(level, target, resamples)
    mde = k * se
    if cases is not None:
        mde = max(mde, k * k / (cases + k * k))
    return mde
