"""Tests of persona_eval.power: the exact power of the suite's McNemar test against a brute-force sum over
every table, the normal MDE against statsmodels, monotonicity and edge cases, and the key check: data
drawn at the reported minimum detectable effect is found significant by the suite's own tests about 80%
of the time."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.power import NormalIndPower

from persona_eval.comparisons import ComparisonSettings, compare_personas
from persona_eval.errors import ConfigError
from persona_eval.power import cases_needed, implied_discordance, mcnemar_mde, mcnemar_power, normal_mde
from persona_eval.report.markdown import render_markdown
from persona_eval.report.power_text import mde_phrase
from persona_eval.report.run import Run
from persona_eval.report.tables_section import _delta_span
from persona_eval.stats import MCNEMAR_EXACT_BELOW, mcnemar

FIVE = 0.05 / 5  # the first Holm step of a family of five personas compared with one control


def brute_force_power(n: int, discordance: float, difference: float, level: float) -> float:
    """Every 2x2 table of n pairs, weighted by its multinomial probability, tested by statsmodels."""
    p10, p01 = (discordance + difference) / 2, (discordance - difference) / 2
    total = 0.0
    for first_only in range(n + 1):
        for second_only in range(n + 1 - first_only):
            discordant = first_only + second_only
            if discordant == 0:
                continue
            table = [[n - discordant, first_only], [second_only, 0]]
            pvalue = sm_mcnemar(table, exact=discordant < MCNEMAR_EXACT_BELOW, correction=True).pvalue
            if pvalue < level:
                total += scipy_stats.multinomial.pmf([first_only, second_only, n - discordant], n,
                                                     [p10, p01, 1 - discordance])
    return total


# --- exact power of the suite's McNemar test ------------------------------------------------------------------


@pytest.mark.parametrize(("n", "discordance", "difference", "level"), [
    (10, 0.5, 0.3, 0.05),      # exact binomial throughout
    (30, 0.4, 0.2, 0.01),      # both tests: 25 discordant pairs are reachable
    (40, 0.9, 0.5, 0.05),      # mostly chi-square
    (35, 1.0, 1.0, 0.01),      # every pair disagrees, all one way
    (50, 0.3, 0.0, 0.05),      # no difference: the size of the test
    (60, 0.6, 0.3, 0.9),       # a level so lenient that the chi-square rejects a tie (1 / D > t)
])
def test_exact_power_matches_every_table_tested_by_statsmodels(n: int, discordance: float, difference: float,
                                                               level: float) -> None:
    assert mcnemar_power(n, difference, discordance=discordance, alpha=level) == \
        pytest.approx(brute_force_power(n, discordance, difference, level), abs=1e-12)


@pytest.mark.parametrize("level", [0.05, 0.01, 0.002, 0.9])
def test_the_rejection_region_is_that_of_stats_mcnemar(level: float) -> None:
    """Power at psi = 1 and delta = 2b/D - 1 for fixed D is 1 or 0: the region itself, pair count by pair
    count, compared with stats.mcnemar on that very table."""
    from persona_eval.power import _rejection_region

    discordant = np.arange(1, 120)
    low, tie = _rejection_region(discordant, level)
    for d, bound, middle in zip(discordant.tolist(), low.tolist(), tie.tolist(), strict=True):
        for b in range(d + 1):
            rejected = mcnemar([True] * b + [False] * (d - b), [False] * b + [True] * (d - b)).pvalue < level
            expected = b <= bound or b >= d - bound if bound >= 0 else False
            expected = expected or (middle and 2 * b == d)
            assert rejected == expected, (d, b)


def test_power_is_symmetric_and_zero_without_discordant_pairs() -> None:
    assert mcnemar_power(80, -0.1, discordance=0.3, alpha=0.05) == mcnemar_power(80, 0.1, discordance=0.3, alpha=0.05)
    assert mcnemar_power(80, 0.0, discordance=0.0, alpha=0.05) == 0.0
    assert mcnemar_power(0, 0.0, discordance=0.5, alpha=0.05) == 0.0
    # the size never exceeds the level
    for n in (10, 24, 25, 60, 300):
        assert mcnemar_power(n, 0.0, discordance=0.4, alpha=0.05) <= 0.05


def test_power_rises_with_the_difference_and_the_cases() -> None:
    by_difference = [mcnemar_power(100, d, discordance=0.3, alpha=FIVE) for d in np.linspace(0, 0.3, 16)]
    assert all(b >= a for a, b in itertools.pairwise(by_difference))
    by_cases = [mcnemar_power(n, 0.1, discordance=0.2, alpha=FIVE) for n in (25, 50, 100, 200, 400, 800)]
    assert all(b > a for a, b in itertools.pairwise(by_cases))


def test_large_samples_are_exact_and_agree_with_connors_approximation() -> None:
    """Connor (1987): n = (z_{a/2} sqrt(psi) + z_b sqrt(psi - delta^2))^2 / delta^2; the continuity
    correction asks a few more."""
    z_alpha, z_power = scipy_stats.norm.isf(0.025), scipy_stats.norm.ppf(0.8)
    for difference, discordance in ((0.05, 0.2), (0.02, 0.1), (0.1, 0.5)):
        connor = (z_alpha * math.sqrt(discordance) + z_power * math.sqrt(discordance - difference ** 2)) ** 2 \
            / difference ** 2
        needed = cases_needed(difference, discordance=discordance, alpha=0.05)
        assert needed is not None and connor <= needed <= 1.05 * connor + 10
    connor = (z_alpha * math.sqrt(0.05) + z_power * math.sqrt(0.05 - 0.002 ** 2)) ** 2 / 0.002 ** 2  # 98 000
    assert 0.79 < mcnemar_power(round(connor), 0.002, discordance=0.05, alpha=0.05) < 0.81


# --- the minimum detectable effect ----------------------------------------------------------------------------


def test_mcnemar_mde_has_the_power_asked_for() -> None:
    for n, discordance in ((40, 0.2), (200, 0.1), (1000, 0.3)):
        mde = mcnemar_mde(n, discordance, alpha=FIVE)
        assert mcnemar_power(n, mde, discordance=max(discordance, mde), alpha=FIVE) == pytest.approx(0.8, abs=1e-6)
        assert mcnemar_power(n, 0.97 * mde, discordance=max(discordance, 0.97 * mde), alpha=FIVE) < 0.8


def test_mcnemar_mde_shrinks_with_cases_and_grows_with_discordance_and_strictness() -> None:
    by_cases = [mcnemar_mde(n, 0.2, alpha=FIVE) for n in (20, 40, 80, 160, 320, 640)]
    assert all(b < a for a, b in itertools.pairwise(by_cases))
    by_discordance = [mcnemar_mde(200, psi, alpha=FIVE) for psi in (0.1, 0.2, 0.4, 0.8)]
    assert all(b > a for a, b in itertools.pairwise(by_discordance))
    assert mcnemar_mde(200, 0.2, alpha=0.01) > mcnemar_mde(200, 0.2, alpha=0.05)
    assert mcnemar_mde(200, 0.2, alpha=0.05, power=0.9) > mcnemar_mde(200, 0.2, alpha=0.05)


def test_no_observed_disagreement_still_needs_a_share_delta_of_the_pairs_to_change() -> None:
    mde = mcnemar_mde(40, 0.0, alpha=FIVE)
    # below the MDE, the observed discordance does not matter
    assert mde == pytest.approx(mcnemar_mde(40, 0.05, alpha=FIVE), abs=1e-8)
    assert mcnemar_power(40, mde, discordance=mde, alpha=FIVE) == pytest.approx(0.8, abs=1e-6)


def test_an_mde_that_no_difference_reaches_is_nan() -> None:
    assert math.isnan(mcnemar_mde(5, 0.5, alpha=0.05))  # 2 * 0.5^5 = 0.0625: never significant
    assert math.isnan(mcnemar_mde(8, 0.0, alpha=0.005))
    assert math.isnan(mcnemar_mde(0, 0.0, alpha=0.05))
    assert not math.isnan(mcnemar_mde(6, 0.0, alpha=0.05))


def test_normal_mde_agrees_with_statsmodels_normal_power() -> None:
    """statsmodels' one-sample normal power (ratio=0) with one observation of standard deviation SE."""
    for level, power in ((0.05, 0.8), (0.01, 0.8), (0.05, 0.9)):
        effect = NormalIndPower().solve_power(effect_size=None, nobs1=1, alpha=level, power=power, ratio=0)
        assert normal_mde(0.04, alpha=level, power=power) == pytest.approx(effect * 0.04, rel=1e-4)


def test_normal_mde_with_the_bootstrap_resolution() -> None:
    plain = normal_mde(1.0, alpha=FIVE)
    assert normal_mde(1.0, alpha=FIVE, n_resamples=1_000_000) == pytest.approx(plain, rel=1e-3)
    assert plain < normal_mde(1.0, alpha=FIVE, n_resamples=2000) < 1.02 * plain
    assert normal_mde(1.0, alpha=FIVE, n_resamples=300) > 1.08 * plain  # significant only with no resample past 0
    assert math.isnan(normal_mde(1.0, alpha=FIVE, n_resamples=100))  # 2 / 101 is not below 0.01


def test_normal_mde_floors_a_share_at_a_shift_all_one_way() -> None:
    k = scipy_stats.norm.isf(FIVE / 2) + scipy_stats.norm.ppf(0.8)
    assert normal_mde(0.0, alpha=FIVE) == 0.0
    assert normal_mde(0.0, alpha=FIVE, n=40) == pytest.approx(k * k / (40 + k * k))
    assert normal_mde(0.2, alpha=FIVE, n=40) == pytest.approx(0.2 * k)  # a wide spread is its own floor
    assert math.isnan(normal_mde(float("nan"), alpha=FIVE))
    assert math.isnan(normal_mde(0.1, alpha=FIVE, n=0))


def test_cases_needed_is_the_fewest_with_the_power() -> None:
    needed = cases_needed(0.1, discordance=0.2, alpha=FIVE)
    assert needed is not None
    assert mcnemar_power(needed, 0.1, discordance=0.2, alpha=FIVE) >= 0.8
    assert mcnemar_power(needed - 1, 0.1, discordance=0.2, alpha=FIVE) < 0.8
    assert cases_needed(0.1, discordance=0.4, alpha=FIVE) > needed  # more noise, more cases
    assert cases_needed(0.2, discordance=0.2, alpha=FIVE) < needed  # a larger difference, fewer
    assert cases_needed(0.001, discordance=1.0, alpha=FIVE, max_cases=5000) is None


def test_implied_discordance_inverts_the_standard_error_of_paired_binary_outcomes() -> None:
    rng = np.random.default_rng(3)
    outcome = rng.choice([1, -1, 0], size=4000, p=[0.15, 0.05, 0.8])  # psi 0.2, delta 0.1
    se = outcome.std() / math.sqrt(outcome.size)
    assert implied_discordance(se, outcome.size, difference=outcome.mean()) == \
        pytest.approx(np.count_nonzero(outcome) / outcome.size)
    assert implied_discordance(0.0, 50, difference=0.1) == 0.1
    assert math.isnan(implied_discordance(float("nan"), 50, difference=0.1))


@pytest.mark.parametrize(("call", "message"), [
    (lambda: mcnemar_power(40, 0.3, discordance=0.2, alpha=0.05), "difference 0.3 is larger than discordance 0.2"),
    (lambda: mcnemar_power(-1, 0.1, discordance=0.2, alpha=0.05), "n must be a non-negative whole number"),
    (lambda: mcnemar_power(40.5, 0.1, discordance=0.2, alpha=0.05), "n must be a non-negative whole number"),
    (lambda: mcnemar_power(40, 0.1, discordance=1.2, alpha=0.05), r"discordance must be a number in \[0, 1\]"),
    (lambda: mcnemar_mde(40, 0.2, alpha=0.0), r"alpha must be a number in \(0, 1\), got 0.0"),
    (lambda: mcnemar_mde(40, 0.2, alpha=0.05, power=1), r"power must be a number in \(0, 1\), got 1"),
    (lambda: mcnemar_mde(40, "0.2", alpha=0.05), "discordance must be a number, got '0.2'"),
    (lambda: normal_mde(-0.1, alpha=0.05), "standard_error must be a finite number >= 0, got -0.1"),
    (lambda: normal_mde(None, alpha=0.05), "standard_error must be a number, got None"),
    (lambda: cases_needed(0.0, discordance=0.2, alpha=0.05), "difference must not be 0"),
    (lambda: cases_needed(0.1, discordance=0.2, alpha=0.05, max_cases=-3), "max_cases must be"),
])
def test_bad_input_is_an_error_naming_the_parameter(call: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        call()


# --- the key check: at the reported MDE, the suite's own tests are significant 80% of the time ---------------


@pytest.mark.parametrize(("n", "discordance"), [(40, 0.2), (40, 0.5), (200, 0.1), (200, 0.3)])
def test_mcnemar_at_the_mde_is_significant_about_80_percent_of_the_time(n: int, discordance: float) -> None:
    """Paired binary outcomes drawn at the MDE, tested by stats.mcnemar at 0.05 / 5, 1000 times."""
    difference = mcnemar_mde(n, discordance, alpha=FIVE)
    psi = max(discordance, difference)
    rng = np.random.default_rng(n + round(100 * discordance))
    tables = rng.multinomial(n, [(psi + difference) / 2, (psi - difference) / 2, 1 - psi], size=1000)
    significant = 0
    for first_only, second_only, same in tables.tolist():
        persona = [True] * first_only + [False] * second_only + [True] * same
        baseline = [False] * first_only + [True] * second_only + [True] * same
        significant += mcnemar(persona, baseline).pvalue < FIVE
    assert 0.74 <= significant / 1000 <= 0.86


def paired_records(rng: np.random.Generator, n: int, *, discordance: float, difference: float,
                   outcome: str) -> list[dict[str, Any]]:
    """n emergency cases (reference C) under no_persona and five personas; p1 differs from the control on a
    share `discordance` of the cases, by `difference` (p1 minus control), in `outcome`: "correct" (accuracy)
    or "under" (under-triage, answer B); the other four answer as the control does."""
    p10, p01 = (discordance + difference) / 2, (discordance - difference) / 2
    kind = rng.choice(4, size=n, p=[p10, p01, 0.3, 0.7 - discordance])  # p1 only, control only, both, neither
    holds = {"no_persona": (kind == 1) | (kind == 2), "p1": (kind == 0) | (kind == 2)}
    yes, no = ("C", "B") if outcome == "correct" else ("B", "C")
    out = []
    for persona in ("no_persona", "p1", "p2", "p3", "p4", "p5"):
        for case, flag in enumerate(holds.get(persona, holds["no_persona"]).tolist()):
            answer = yes if flag else no
            out.append({"run_id": "r", "task": "triage", "model": "m", "persona": persona, "persona_group": "medical",
                        "stratum": "emergency", "case_id": f"c{case:03d}", "reference": "C",
                        "generated_label": answer, "logit_label": answer,
                        "label_probs": {label: 0.8 if label == answer else 0.1 for label in "ABC"}})
    return out


def share_significant(n: int, discordance: float, difference: float, metric: str, seeds: int,
                      settings: ComparisonSettings) -> tuple[float, list[dict[str, Any]]]:
    found = []
    for seed in range(seeds):
        records = paired_records(np.random.default_rng(seed), n, discordance=discordance, difference=difference,
                                 outcome="correct" if metric == "accuracy" else "under")
        (comparison,) = [c for c in compare_personas(records, settings=settings) if c["persona"] == "p1"
                         and c["metric"] == metric and c["stratum"] == "emergency"]
        found.append(comparison)
    return sum(bool(c["significant"]) for c in found) / seeds, found


def test_accuracy_through_compare_personas_at_the_mde() -> None:
    """The same through compare_personas, Holm over the five personas: its reported MDE is the one the
    simulation above is calibrated at, and significance is p < 0.05 / 5."""
    n, discordance = 40, 0.3
    difference = mcnemar_mde(n, discordance, alpha=FIVE)
    share, found = share_significant(n, discordance, -difference, "accuracy", 300, ComparisonSettings(n_resamples=50))
    assert 0.74 <= share <= 0.86
    for comparison in found:
        assert (comparison["mde_level"], comparison["family_size"], comparison["mde_power"]) == (FIVE, 5, 0.8)
        observed = (comparison["persona_only"] + comparison["baseline_only"]) / n
        assert comparison["mde"] == pytest.approx(mcnemar_mde(n, observed, alpha=FIVE))
        assert comparison["significant"] == (comparison["pvalue"] < FIVE)


def test_under_triage_rate_through_the_bootstrap_at_the_mde() -> None:
    """Under-triage, paired bootstrap with 300 resamples, Holm over five personas: drawn at the MDE the suite
    reports for this design (SE of a paired share: sqrt((psi - delta^2) / n)), significant about 80% of the
    time, and the reported MDE close to it."""
    n, discordance, resamples = 200, 0.2, 300
    multiplier = normal_mde(1.0, alpha=FIVE, n_resamples=resamples)
    difference = multiplier * math.sqrt(discordance / (n + multiplier ** 2))  # d = k sqrt((psi - d^2) / n)
    share, found = share_significant(n, discordance, difference, "under_triage_rate", 300,
                                     ComparisonSettings(n_resamples=resamples))
    assert 0.74 <= share <= 0.86
    assert np.mean([c["mde"] for c in found]) == pytest.approx(difference, rel=0.05)
    assert {(c["mde_level"], c["family_size"]) for c in found} == {(FIVE, 5)}


# --- the words beside a comparison that is not significant ------------------------------------------------------


def test_mde_phrase() -> None:
    quiet = {"metric": "accuracy", "significant": False, "mde": 0.304}
    assert mde_phrase(quiet) == "not significant; could detect >= 0.31"
    assert mde_phrase(dict(quiet, mde=0.31)) == "not significant; could detect >= 0.31"
    assert mde_phrase(dict(quiet, mde=None)) == "not significant; too few cases to detect any difference"
    assert mde_phrase(dict(quiet, metric="expected_calibration_error", mde=0.0411), short=True) == \
        "could detect >= 0.042"
    assert mde_phrase(dict(quiet, significant=True)) is None
    assert mde_phrase(dict(quiet, significant=None)) is None  # no p-value
    assert mde_phrase({"metric": "accuracy", "significant": False}) is None  # made before comparisons had an mde


def comparison_row(**overrides: Any) -> dict[str, Any]:
    base = {"task": "triage", "model": "m", "stratum": "emergency", "persona": "ed_nurse", "metric": "accuracy",
            "baseline": "no_persona", "value": 0.74, "baseline_value": 0.75, "delta": -0.01, "ci_low": -0.1,
            "ci_high": 0.08, "confidence_level": 0.95, "pvalue": 0.8, "pvalue_adjusted": 1.0, "significant": False,
            "test": "McNemar exact binomial", "n": 40, "mde": 0.304, "mde_level": 0.01, "mde_power": 0.8,
            "family_size": 5, "note": None}
    return {**base, **overrides}


def test_the_report_tables_show_what_a_comparison_could_detect() -> None:
    run = Run({"results": [], "comparisons": [comparison_row(), comparison_row(persona="ed_physician", delta=-0.4,
                                                                               significant=True)]}, [])
    quiet = _delta_span(run, "m", "triage", "emergency", "accuracy", "ed_nurse", "no_persona")
    assert '<span class="ci mde">not significant; could detect &gt;= 0.31</span></span>' in quiet
    assert "could detect &gt;= 0.31 (80% power" in quiet  # and in the hover text
    loud = _delta_span(run, "m", "triage", "emergency", "accuracy", "ed_physician", "no_persona")
    assert "could detect" not in loud


def test_summary_md_shows_what_a_comparison_could_detect() -> None:
    rows = [{"task": "triage", "model": "m", "persona": persona, "stratum": "emergency", "n": 40,
             "metrics": {"accuracy": accuracy}, "notes": {}} for persona, accuracy in (("no_persona", 0.75),
                                                                                       ("ed_nurse", 0.74))]
    text = render_markdown({"run_id": "r", "verdict": {"status": "passed", "passed": True}, "results": rows,
                            "comparisons": [comparison_row()], "metadata": {"models": {"m": {}}}})
    assert "| ed_nurse | 0.74 (-0.01; could detect >= 0.31) |" in text
    assert "the smallest change the comparison could detect (80% power)" in text


def test_module_doctests_pass() -> None:
    import doctest

    from persona_eval import power
    from persona_eval.report import power_text

    for module in (power, power_text):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0
