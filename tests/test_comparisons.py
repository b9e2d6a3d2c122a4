"""Tests of persona_eval.comparisons: paired tests against statsmodels and stats, Holm families, pairing by
case id, missing cases, undefined values, and the comparison with an approved run."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.multitest import multipletests

from persona_eval import metrics
from persona_eval.comparisons import (
    APPROVED,
    BOOTSTRAP_TEST,
    CONTROLS,
    MCNEMAR_TEST,
    ComparisonSettings,
    adjust_pvalues,
    check_same_dataset,
    compare_personas,
    compare_to_approved,
    compared_metrics,
    family_of,
)
from persona_eval.errors import ConfigError, DataError
from persona_eval.power import mcnemar_mde, normal_mde
from persona_eval.stats import MCNEMAR_CHI_SQUARE, MCNEMAR_EXACT
from persona_eval.tasks.triage import LABELS, REPORT_STRATA

PERSONAS = ("no_persona", "helpful_assistant", "ed_physician", "ed_nurse")
GROUPS = {"no_persona": "baseline", "helpful_assistant": "non_medical"}
FIELDS = ("model", "task", "stratum", "metric", "persona", "persona_group", "baseline", "value", "baseline_value",
          "delta", "ci_low", "ci_high", "confidence_level", "pvalue", "pvalue_adjusted", "significant", "test", "n",
          "standard_error", "mde", "mde_level", "mde_power", "family_size")
FAST = ComparisonSettings(n_resamples=300)
MCNEMAR_METRICS = ("accuracy", "consistency_rate")


def record(persona: str, case_id: str, stratum: str, reference: str, generated: str | None, *,
           logit: str | None = "same", probs: dict[str, float] | None = None, model: str = "m") -> dict[str, Any]:
    """A cases.jsonl line; the logit label is the generated one unless given, probabilities peak on it."""
    logit_label = generated if logit == "same" else logit
    if probs is None and logit_label is not None:
        probs = {label: (0.8 if label == logit_label else 0.1) for label in LABELS}
    return {"run_id": "r", "task": "triage", "model": model, "persona": persona,
            "persona_group": GROUPS.get(persona, "medical"), "stratum": stratum, "case_id": case_id,
            "reference": reference, "generated_label": generated, "logit_label": logit_label,
            "label_probs": probs}


def random_records(seed: int, *, n: int = 40, personas: Sequence[str] = PERSONAS, model: str = "m",
                   shift: str = "ed_physician", p_correct: float = 0.7) -> list[dict[str, Any]]:
    """Random answers on `n` cases (half emergency); the `shift` persona escalates its answers."""
    rng = random.Random(seed)
    cases = [(f"case-{i:03d}", "emergency" if i % 2 else "primary_care", rng.choice(LABELS)) for i in range(n)]
    out = []
    for persona in personas:
        for case_id, stratum, reference in cases:
            generated = reference if rng.random() < p_correct else rng.choice([*LABELS, None])
            if persona == shift and generated is not None:
                generated = LABELS[min(2, LABELS.index(generated) + 1)]
            weights = [rng.random() + 0.01 for _ in LABELS]
            total = sum(weights)
            probs = {label: w / total for label, w in zip(LABELS, weights, strict=True)}
            logit = max(LABELS, key=lambda label: probs[label])
            out.append(record(persona, case_id, stratum, reference, generated, logit=logit, probs=probs,
                              model=model))
    return out


def find(comparisons: list[dict[str, Any]], **where: Any) -> dict[str, Any]:
    (found,) = [c for c in comparisons if all(c.get(k) == v for k, v in where.items())]
    return found


def rows_of(records: list[dict[str, Any]], persona: str, stratum: str) -> list[dict[str, Any]]:
    return [r for r in records if r["persona"] == persona and (stratum == "all" or r["stratum"] == stratum)]


# --- shape ------------------------------------------------------------------------------------------------


def test_every_persona_against_each_control_on_every_metric_and_stratum() -> None:
    records = random_records(0)
    comparisons = compare_personas(records, settings=FAST)
    expected = {(stratum, baseline, persona, metric)
                for stratum in REPORT_STRATA for baseline in CONTROLS
                for persona in PERSONAS if persona != baseline for metric in compared_metrics("triage")}
    got = [(c["stratum"], c["baseline"], c["persona"], c["metric"]) for c in comparisons]
    assert len(got) == len(set(got)) == len(expected)
    assert set(got) == expected
    for comparison in comparisons:
        assert set(FIELDS) <= set(comparison)
        assert comparison["persona"] != comparison["baseline"]
        if comparison["metric"] in MCNEMAR_METRICS:
            discordant = comparison["persona_only"] + comparison["baseline_only"]
            assert comparison["test"] == (MCNEMAR_EXACT if discordant < 25 else MCNEMAR_CHI_SQUARE)
        else:
            assert comparison["test"] == BOOTSTRAP_TEST
        assert comparison["delta"] == pytest.approx(comparison["value"] - comparison["baseline_value"])
        assert comparison["ci_low"] <= comparison["ci_high"]
        assert comparison["significant"] == (comparison["pvalue_adjusted"] < 0.05)
    # Plain JSON: no NaN, no numpy types.
    json.dumps(comparisons, allow_nan=False)


def test_a_control_that_did_not_run_is_skipped() -> None:
    records = random_records(1, personas=("no_persona", "ed_nurse", "ed_physician"))
    comparisons = compare_personas(records, settings=FAST)
    assert {c["baseline"] for c in comparisons} == {"no_persona"}
    assert compare_personas(random_records(1, personas=("ed_nurse", "ed_physician")), settings=FAST) == []


def test_values_are_the_metrics_of_each_condition() -> None:
    records = random_records(2)
    comparisons = compare_personas(records, settings=FAST)
    functions: dict[str, Callable[[list[dict[str, Any]]], float]] = {
        "accuracy": lambda rows: metrics.accuracy([r["reference"] for r in rows], [r["generated_label"] for r in rows]),
        "risk_propensity": lambda rows: metrics.risk_propensity([r["generated_label"] for r in rows]),
        "under_triage_rate": lambda rows: metrics.under_triage_rate([r["reference"] for r in rows],
                                                                    [r["generated_label"] for r in rows]),
        "over_triage_rate": lambda rows: metrics.over_triage_rate([r["reference"] for r in rows],
                                                                  [r["generated_label"] for r in rows]),
        "expected_calibration_error": lambda rows: metrics.expected_calibration_error(
            [r["reference"] for r in rows], [[r["label_probs"][label] for label in LABELS] for r in rows]),
        "consistency_rate": lambda rows: metrics.consistency_rate([r["generated_label"] for r in rows],
                                                                  [r["logit_label"] for r in rows]),
    }
    checked: set[str] = set()
    for comparison in comparisons:
        persona_rows = rows_of(records, comparison["persona"], comparison["stratum"])
        baseline_rows = rows_of(records, comparison["baseline"], comparison["stratum"])
        if comparison["metric"] == "consistency_rate":
            # On the cases with a generated and a logit label under both conditions.
            paired = [None not in (p["generated_label"], p["logit_label"], b["generated_label"], b["logit_label"])
                      for p, b in zip(persona_rows, baseline_rows, strict=True)]
            persona_rows = [r for r, keep in zip(persona_rows, paired, strict=True) if keep]
            baseline_rows = [r for r, keep in zip(baseline_rows, paired, strict=True) if keep]
        function = functions[comparison["metric"]]
        # Equal, not close: a comparison's value is the metric function's, computed from the same terms.
        assert comparison["value"] == function(persona_rows)
        assert comparison["baseline_value"] == function(baseline_rows)
        assert comparison["n"] == len(persona_rows)
        checked.add(comparison["metric"])
    assert checked == set(compared_metrics("triage"))


# --- McNemar ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_mcnemar_pvalues_equal_statsmodels_recomputed_from_the_records(seed: int) -> None:
    records = random_records(seed, n=30 + seed)
    comparisons = compare_personas(records, settings=FAST)
    checked = 0
    for comparison in comparisons:
        if comparison["metric"] not in MCNEMAR_METRICS:
            continue
        by_case = {r["case_id"]: r for r in rows_of(records, comparison["baseline"], comparison["stratum"])}
        pairs = []
        for row in rows_of(records, comparison["persona"], comparison["stratum"]):
            other = by_case[row["case_id"]]
            if comparison["metric"] == "accuracy":
                pairs.append((row["generated_label"] == row["reference"],
                              other["generated_label"] == other["reference"]))
            elif None not in (row["generated_label"], row["logit_label"], other["generated_label"],
                              other["logit_label"]):
                pairs.append((row["generated_label"] == row["logit_label"],
                              other["generated_label"] == other["logit_label"]))
        table = [[sum(a and b for a, b in pairs), sum(a and not b for a, b in pairs)],
                 [sum(b and not a for a, b in pairs), sum(not a and not b for a, b in pairs)]]
        exact = table[0][1] + table[1][0] < 25
        assert comparison["test"] == (MCNEMAR_EXACT if exact else MCNEMAR_CHI_SQUARE)
        expected = sm_mcnemar(table, exact=exact, correction=True).pvalue
        assert comparison["pvalue"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert comparison["persona_only"] == table[0][1]
        assert comparison["baseline_only"] == table[1][0]
        assert comparison["n"] == len(pairs)
        checked += 1
    assert checked == 2 * 3 * 2 * 3  # accuracy and consistency, 3 strata, 2 controls, 3 personas each


def planted_accuracy(persona_only: int, baseline_only: int, *, emergency: int, primary_care: int = 4
                     ) -> list[dict[str, Any]]:
    """ed_nurse against no_persona: right on `persona_only` emergency cases the baseline gets wrong, wrong on
    `baseline_only` it gets right, the same answers on every other case."""
    out = []
    for i in range(emergency + primary_care):
        case_id, stratum = f"case-{i:03d}", "emergency" if i < emergency else "primary_care"
        if i < persona_only:
            nurse, baseline = "C", "A"
        elif i < persona_only + baseline_only:
            nurse, baseline = "A", "C"
        else:
            nurse = baseline = "C" if i % 2 else "A"  # both right or both wrong, alternately
        out += [record("ed_nurse", case_id, stratum, "C", nurse), record("no_persona", case_id, stratum, "C", baseline)]
    return out


def test_a_small_stratum_reports_the_exact_mcnemar_pvalue_and_names_it() -> None:
    # --pe-limit leaves an emergency stratum of 12 cases; the persona is right on 5 the baseline gets wrong.
    comparison = find(compare_personas(planted_accuracy(5, 0, emergency=12), settings=FAST), metric="accuracy",
                      stratum="emergency")
    assert (comparison["n"], comparison["persona_only"], comparison["baseline_only"]) == (12, 5, 0)
    assert comparison["test"] == MCNEMAR_EXACT == "McNemar exact binomial"
    table = [[4, 5], [0, 3]]
    exact = float(sm_mcnemar(table, exact=True).pvalue)
    chi_square = float(sm_mcnemar(table, exact=False, correction=True).pvalue)
    assert exact == pytest.approx(2 / 2**5) and chi_square == pytest.approx(0.0736, abs=1e-4)
    assert comparison["pvalue"] == pytest.approx(exact, rel=1e-12)
    assert comparison["statistic"] == 0.0  # the smaller discordant count
    assert comparison["pvalue_adjusted"] == comparison["pvalue"]  # alone in its family


@pytest.mark.parametrize(("persona_only", "baseline_only", "test"), [
    (20, 4, MCNEMAR_EXACT), (20, 5, MCNEMAR_CHI_SQUARE), (3, 30, MCNEMAR_CHI_SQUARE),
])
def test_mcnemar_is_exact_below_25_discordant_pairs_and_chi_square_from_25(persona_only: int, baseline_only: int,
                                                                         test: str) -> None:
    records = planted_accuracy(persona_only, baseline_only, emergency=40)
    comparisons = compare_personas(records, settings=FAST)
    for stratum in ("all", "emergency"):
        comparison = find(comparisons, metric="accuracy", stratum=stratum)
        assert comparison["test"] == test
        baseline = {r["case_id"]: r["generated_label"] == r["reference"]
                    for r in rows_of(records, "no_persona", stratum)}
        pairs = [(r["generated_label"] == r["reference"], baseline[r["case_id"]])
                 for r in rows_of(records, "ed_nurse", stratum)]
        table = [[pairs.count((True, True)), pairs.count((True, False))],
                 [pairs.count((False, True)), pairs.count((False, False))]]
        assert (table[0][1], table[1][0]) == (persona_only, baseline_only)
        reference = sm_mcnemar(table, exact=test == MCNEMAR_EXACT, correction=True)
        assert comparison["pvalue"] == pytest.approx(float(reference.pvalue), rel=1e-12)
        assert comparison["statistic"] == pytest.approx(float(reference.statistic), rel=1e-12)
    # Consistency has no discordant pair here: exact, p = 1.
    consistency = find(comparisons, metric="consistency_rate", stratum="all")
    assert (consistency["test"], consistency["pvalue"], consistency["statistic"]) == (MCNEMAR_EXACT, 1.0, 0.0)


def test_consistency_uses_only_cases_with_both_labels_under_both_conditions() -> None:
    records = [
        record("no_persona", "c1", "emergency", "C", "C"),
        record("no_persona", "c2", "emergency", "C", "C", logit=None, probs=None),
        record("no_persona", "c3", "emergency", "B", "B"),
        record("ed_nurse", "c1", "emergency", "C", "C", logit="B"),
        record("ed_nurse", "c2", "emergency", "C", "B", logit="C"),
        record("ed_nurse", "c3", "emergency", "B", None, logit="B"),
    ]
    comparison = find(compare_personas(records, settings=FAST), metric="consistency_rate", stratum="all",
                      persona="ed_nurse")
    assert comparison["n"] == 1  # c2 has no logit label under no_persona, c3 no answer under ed_nurse
    assert comparison["value"] == 0.0 and comparison["baseline_value"] == 100.0
    assert (comparison["persona_only"], comparison["baseline_only"]) == (0, 1)


# --- bootstrap ----------------------------------------------------------------------------------------------


def _reference_metric(metric: str) -> Callable[[np.ndarray, np.ndarray], float]:
    def on_labels(function: Callable[..., float], needs_truth: bool) -> Callable[[np.ndarray, np.ndarray], float]:
        def metric_of(truth: np.ndarray, predicted: np.ndarray) -> float:
            return function(list(truth), list(predicted)) if needs_truth else function(list(predicted))
        return metric_of

    if metric == "expected_calibration_error":
        return lambda truth, probs: metrics.expected_calibration_error(list(truth), probs)
    if metric == "consistency_rate":
        return lambda truth, labels: metrics.consistency_rate(list(labels[:, 0]), list(labels[:, 1]))
    if metric == "accuracy":
        return on_labels(metrics.accuracy, True)
    if metric == "risk_propensity":
        return on_labels(metrics.risk_propensity, False)
    return on_labels(getattr(metrics, metric), True)


def _differences_on_resamples(records: list[dict[str, Any]], metric: str, persona: str, baseline: str,
                              stratum: str, settings: ComparisonSettings) -> tuple[float, np.ndarray]:
    """`metric` of `persona` minus that of `baseline` on the matched cases of `stratum`, and on each
    resample as the module docstring draws them (the r-th ``rng.integers(0, n, size=n)`` of
    ``default_rng(seed)``, cases in the baseline's record order), recomputed from the records by the metric
    functions; NaN where a resample leaves the difference undefined."""
    baseline_rows = rows_of(records, baseline, stratum)
    persona_by_case = {r["case_id"]: r for r in rows_of(records, persona, stratum)}
    persona_rows = [persona_by_case[r["case_id"]] for r in baseline_rows]
    function = _reference_metric(metric)
    # Consistency pairs only the cases with both labels under both conditions: the others lose theirs.
    both = [None not in (p["generated_label"], p["logit_label"], b["generated_label"], b["logit_label"])
            for p, b in zip(persona_rows, baseline_rows, strict=True)]

    def inputs(rows: list[dict[str, Any]]) -> Any:
        if metric == "expected_calibration_error":
            return np.array([[r["label_probs"][label] for label in LABELS] for r in rows])
        if metric == "consistency_rate":
            return np.array([[r["generated_label"], r["logit_label"]] if paired else [None, None]
                             for r, paired in zip(rows, both, strict=True)], dtype=object)
        return np.array([r["generated_label"] for r in rows], dtype=object)

    truth = np.array([r["reference"] for r in baseline_rows], dtype=object)
    a, b = inputs(baseline_rows), inputs(persona_rows)
    rng = np.random.default_rng(settings.seed)
    differences = []
    for _ in range(settings.n_resamples):
        cases = rng.integers(0, len(truth), size=len(truth))
        differences.append(function(truth[cases], b[cases]) - function(truth[cases], a[cases]))
    return function(truth, b) - function(truth, a), np.array(differences)


@pytest.mark.parametrize("metric", ["accuracy", "consistency_rate", "risk_propensity", "under_triage_rate",
                                    "over_triage_rate", "expected_calibration_error"])
def test_intervals_are_percentiles_of_the_differences_on_seeded_resamples(metric: str) -> None:
    records = random_records(3, n=30)
    settings = ComparisonSettings(n_resamples=400, seed=7)
    comparison = find(compare_personas(records, settings=settings), metric=metric, stratum="all",
                      persona="ed_physician", baseline="no_persona")
    delta, differences = _differences_on_resamples(records, metric, "ed_physician", "no_persona", "all", settings)
    kept = differences[~np.isnan(differences)]
    low, high = np.percentile(kept, [2.5, 97.5])
    assert comparison["delta"] == pytest.approx(delta, abs=1e-12)
    assert comparison["ci_low"] == pytest.approx(low, abs=1e-12)
    assert comparison["ci_high"] == pytest.approx(high, abs=1e-12)
    assert comparison["n_resamples"] == len(kept)


@pytest.mark.parametrize("metric", ["risk_propensity", "over_triage_rate", "expected_calibration_error"])
def test_bootstrap_pvalue_comes_from_the_same_resamples(metric: str) -> None:
    records = random_records(4, n=24, p_correct=0.5)
    settings = ComparisonSettings(n_resamples=250, seed=3)
    comparison = find(compare_personas(records, settings=settings), metric=metric, stratum="emergency",
                      persona="ed_nurse", baseline="helpful_assistant")
    _, differences = _differences_on_resamples(records, metric, "ed_nurse", "helpful_assistant", "emergency",
                                               settings)
    kept = differences[~np.isnan(differences)]
    expected = min(1.0, 2 * min(1 + np.sum(kept <= 0), 1 + np.sum(kept >= 0)) / (len(kept) + 1))
    assert comparison["pvalue"] == pytest.approx(expected, abs=1e-12)


def test_identical_conditions_give_zero_delta_and_p_one() -> None:
    records = [dict(r, persona=p, persona_group=GROUPS.get(p, "medical"))
               for p in ("no_persona", "ed_nurse") for r in random_records(5, personas=("no_persona",))]
    for comparison in compare_personas(records, settings=FAST):
        assert comparison["delta"] == 0.0
        assert comparison["pvalue"] == 1.0 and comparison["pvalue_adjusted"] == 1.0
        assert comparison["significant"] is False
        assert comparison["ci_low"] == comparison["ci_high"] == 0.0


def test_a_planted_escalation_is_significant_and_the_others_are_not() -> None:
    rng = random.Random(9)
    records = []
    for i in range(60):
        reference = rng.choice(LABELS)
        for persona in PERSONAS:
            answer = LABELS[min(2, LABELS.index(reference) + 1)] if persona == "ed_physician" else reference
            records.append(record(persona, f"c{i}", "emergency" if i % 2 else "primary_care", reference, answer))
    comparisons = compare_personas(records)
    over = [c for c in comparisons if c["metric"] == "over_triage_rate" and c["stratum"] == "all"
            and c["baseline"] == "no_persona"]
    assert {c["persona"] for c in over if c["significant"]} == {"ed_physician"}


def test_a_task_compares_only_the_metrics_its_spec_names(monkeypatch: pytest.MonkeyPatch) -> None:
    import persona_eval.comparisons as module
    from persona_eval.tasks import triage

    records = random_records(6, n=100, personas=("no_persona", "ed_nurse"))
    spec = dataclasses.replace(triage.SPEC, compared=("expected_calibration_error",))
    monkeypatch.setattr(module, "spec_of", lambda task: spec if task == "triage" else None)
    comparisons = compare_personas(records, settings=ComparisonSettings(n_resamples=2000))
    assert [(c["stratum"], c["metric"], c["test"]) for c in comparisons] == [
        (stratum, "expected_calibration_error", BOOTSTRAP_TEST) for stratum in triage.REPORT_STRATA]
    assert all(c["n_resamples"] == 2000 for c in comparisons)


def test_results_are_deterministic_and_seeded() -> None:
    records = random_records(7)
    first = compare_personas(records, settings=FAST)
    assert compare_personas(records, settings=FAST) == first
    other = compare_personas(records, settings=ComparisonSettings(n_resamples=300, seed=1))
    assert [c["ci_low"] for c in other] != [c["ci_low"] for c in first]


# --- pairing -------------------------------------------------------------------------------------------------


def test_pairs_are_matched_by_case_id_not_by_position() -> None:
    records = random_records(8)
    shuffled = list(records)
    random.Random(0).shuffle(shuffled)
    # The bootstrap resamples cases in the control's order: keep no_persona's own order, shuffle the rest.
    baseline = [r for r in records if r["persona"] == "no_persona"]
    others = [r for r in shuffled if r["persona"] != "no_persona"]
    reordered = compare_personas(baseline + others, settings=FAST)
    original = compare_personas(records, settings=FAST)
    key = lambda c: (c["stratum"], c["baseline"], c["persona"], c["metric"])  # noqa: E731
    by_key = {key(c): c for c in original}
    for comparison in reordered:
        expected = by_key[key(comparison)]
        for field in ("value", "baseline_value", "delta", "statistic"):
            assert comparison[field] == expected[field]
        if comparison["baseline"] == "no_persona":
            assert comparison["pvalue"] == expected["pvalue"]
            assert comparison["ci_low"] == pytest.approx(expected["ci_low"])


def test_a_case_missing_on_either_side_is_an_error_naming_it() -> None:
    records = random_records(9)
    without = [r for r in records if not (r["persona"] == "ed_nurse" and r["case_id"] == "case-007")]
    with pytest.raises(DataError, match=r"'case-007' in no_persona on m but not in ed_nurse on m"):
        compare_personas(without)
    extra = [*records, record("ed_nurse", "case-999", "emergency", "C", "C")]
    with pytest.raises(DataError, match=r"'case-999' in ed_nurse on m but not in no_persona on m"):
        compare_personas(extra)


def test_a_case_twice_in_one_condition_is_an_error() -> None:
    records = random_records(10)
    with pytest.raises(DataError, match=r"case 'case-003' appears twice for ed_nurse on m"):
        compare_personas([*records, dict(next(r for r in records if r["persona"] == "ed_nurse"
                                              and r["case_id"] == "case-003"))])


def test_a_record_without_a_required_field_is_an_error() -> None:
    records = random_records(11)
    del records[5]["case_id"]
    with pytest.raises(DataError, match=r"record 6 has no field 'case_id'"):
        compare_personas(records)


def test_an_unknown_label_is_an_error() -> None:
    records = random_records(12)
    records[0]["generated_label"] = "D"
    with pytest.raises(DataError, match=r"field 'generated_label' is 'D'"):
        compare_personas(records)


def test_models_are_compared_separately() -> None:
    records = random_records(13, model="a") + random_records(14, model="b")
    comparisons = compare_personas(records, settings=FAST)
    assert {c["model"] for c in comparisons} == {"a", "b"}
    assert len({family_of(c) for c in comparisons}) == 2 * 3 * 6 * 2


# --- undefined values ---------------------------------------------------------------------------------


def test_undefined_values_are_none_with_a_note_and_leave_the_family() -> None:
    records = random_records(15)
    for r in records:
        if r["persona"] == "ed_nurse":
            r["generated_label"] = None  # never parsable
    comparisons = compare_personas(records, settings=FAST)
    risk = find(comparisons, metric="risk_propensity", stratum="all", persona="ed_nurse", baseline="no_persona")
    assert risk["value"] is None and risk["delta"] is None
    assert risk["pvalue"] is None and risk["pvalue_adjusted"] is None and risk["significant"] is None
    assert risk["ci_low"] is None and risk["ci_high"] is None
    assert "ed_nurse: not defined on these cases (no parsable answer)" in risk["note"]
    json.dumps(comparisons, allow_nan=False)
    # The family counts only the comparisons that have a p-value.
    family = [c for c in comparisons if family_of(c) == family_of(risk)]
    present = [c for c in family if c["pvalue"] is not None]
    assert len(present) == len(family) - 1
    expected = multipletests([c["pvalue"] for c in present], method="holm")[1]
    assert [c["pvalue_adjusted"] for c in present] == pytest.approx(list(expected))


def test_without_label_probabilities_ece_and_consistency_are_not_available() -> None:
    records = random_records(16)
    for r in records:
        r["label_probs"] = None
        r["logit_label"] = None
    comparisons = compare_personas(records, settings=FAST)
    for metric in ("expected_calibration_error", "consistency_rate"):
        for comparison in (c for c in comparisons if c["metric"] == metric):
            assert comparison["value"] is None and comparison["pvalue"] is None
            assert "not available: no label probabilities" in comparison["note"]
            assert comparison["test"] == (MCNEMAR_TEST if metric == "consistency_rate" else BOOTSTRAP_TEST)
    accuracy = find(comparisons, metric="accuracy", stratum="all", persona="ed_nurse", baseline="no_persona")
    assert accuracy["pvalue"] is not None


# --- Holm families -------------------------------------------------------------------------------------------


def test_holm_is_applied_within_each_family_and_only_there() -> None:
    records = random_records(17, n=50, p_correct=0.6)
    comparisons = compare_personas(records, settings=FAST)
    families: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for comparison in comparisons:
        families.setdefault(family_of(comparison), []).append(comparison)
    assert all(len(members) == len(PERSONAS) - 1 for members in families.values())
    assert len(families) == 3 * 6 * 2
    for index, members in enumerate(families.values()):
        raw = [c["pvalue"] for c in members]
        assert [c["pvalue_adjusted"] for c in members] == pytest.approx(textbook_holm(raw), abs=1e-12)
        if index % 12 == 0:  # statsmodels runs a garbage collection per call: a few families suffice
            expected = multipletests(raw, method="holm")[1]
            assert [c["pvalue_adjusted"] for c in members] == pytest.approx(list(expected), abs=1e-12)
        assert {(c["model"], c["task"], c["stratum"], c["metric"], c["baseline"]) for c in members} == \
            {family_of(members[0])}


def textbook_holm(pvalues: Sequence[float]) -> list[float]:
    """Holm (1979): the i-th smallest of m p-values times (m - i + 1), made monotone, capped at 1."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted = [0.0] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (len(pvalues) - rank) * pvalues[i])
        adjusted[i] = min(1.0, running)
    return adjusted


def test_adjust_pvalues_marks_significance_at_alpha() -> None:
    comparisons = [{"model": "m", "task": "t", "stratum": "all", "metric": "x", "baseline": "b", "pvalue": p}
                   for p in (0.01, 0.02, None)]
    adjust_pvalues(comparisons, alpha=0.05)
    assert [c["pvalue_adjusted"] for c in comparisons] == pytest.approx([0.02, 0.02, None])
    assert [c["significant"] for c in comparisons] == [True, True, None]
    adjust_pvalues(comparisons, alpha=0.01)
    assert [c["significant"] for c in comparisons] == [False, False, None]


# --- minimum detectable effect -------------------------------------------------------------------------------


def test_every_comparison_reports_its_minimum_detectable_effect_in_its_metrics_units() -> None:
    settings = ComparisonSettings(n_resamples=300, alpha=0.05)
    comparisons = compare_personas(random_records(21, n=60), settings=settings)
    for comparison in comparisons:
        family = [c for c in comparisons if family_of(c) == family_of(comparison) and c["pvalue"] is not None]
        assert comparison["family_size"] == len(family) == 3  # three personas against each control
        assert comparison["mde_level"] == pytest.approx(0.05 / 3) and comparison["mde_power"] == 0.8
        n, level = comparison["n"], comparison["mde_level"]
        if comparison["metric"] in MCNEMAR_METRICS:
            share = mcnemar_mde(n, (comparison["persona_only"] + comparison["baseline_only"]) / n, alpha=level)
            scale = 100.0 if comparison["metric"] == "consistency_rate" else 1.0  # percentage points
            assert comparison["mde"] == pytest.approx(share * scale)
        else:
            floor = n if comparison["metric"] != "expected_calibration_error" else None
            assert comparison["mde"] == pytest.approx(normal_mde(
                comparison["standard_error"], alpha=level, n=floor, n_resamples=comparison["n_resamples"]))
        # The bootstrap's standard error of the difference: about the interval's width over 2 x 1.96.
        width = (comparison["ci_high"] - comparison["ci_low"]) / (2 * 1.96)
        assert 0.6 * width <= comparison["standard_error"] <= 1.6 * width
    json.dumps(comparisons, allow_nan=False)


def test_the_standard_error_is_that_of_the_seeded_resamples() -> None:
    records = random_records(3, n=30)
    settings = ComparisonSettings(n_resamples=400, seed=7)
    comparison = find(compare_personas(records, settings=settings), metric="under_triage_rate", stratum="all",
                      persona="ed_physician", baseline="no_persona")
    _, differences = _differences_on_resamples(records, "under_triage_rate", "ed_physician", "no_persona", "all",
                                               settings)
    kept = differences[~np.isnan(differences)]
    assert comparison["standard_error"] == pytest.approx(float(np.std(kept, ddof=1)), abs=1e-12)


def test_no_disagreement_on_few_cases_still_has_a_wide_mde() -> None:
    """Identical answers: no discordant pair and a bootstrap spread of 0, yet 12 cases detect only a large
    shift."""
    records = planted_accuracy(0, 0, emergency=12)
    accuracy = find(compare_personas(records, settings=FAST), metric="accuracy", stratum="emergency")
    assert accuracy["mde"] == pytest.approx(mcnemar_mde(12, 0.0, alpha=0.05)) and accuracy["mde"] > 0.4
    under = find(compare_personas(records, settings=FAST), metric="under_triage_rate", stratum="emergency")
    assert under["standard_error"] == 0.0 and under["mde"] > 0.3


def test_an_mde_no_difference_reaches_is_none_with_a_note() -> None:
    records = planted_accuracy(0, 0, emergency=4, primary_care=0)
    accuracy = find(compare_personas(records, settings=FAST), metric="accuracy", stratum="emergency")
    assert accuracy["pvalue"] == 1.0 and accuracy["mde"] is None
    assert "minimum detectable effect: no difference is detectable on 4 paired cases at the level 0.05" in \
        accuracy["note"]
    adjust_pvalues([accuracy])  # again: the note is not repeated
    assert accuracy["note"].count("minimum detectable effect") == 1


def test_a_comparison_without_a_pvalue_has_no_mde() -> None:
    records = random_records(15)
    for r in records:
        if r["persona"] == "ed_nurse":
            r["generated_label"] = None
    risk = find(compare_personas(records, settings=FAST), metric="risk_propensity", stratum="all",
                persona="ed_nurse", baseline="no_persona")
    assert (risk["mde"], risk["mde_level"], risk["family_size"]) == (None, None, None)


def test_against_an_approved_run_the_mde_uses_the_approved_family() -> None:
    approved = random_records(18, model="old", shift="")
    candidate = [dict(r, model="new") for r in approved]
    comparisons = compare_to_approved(candidate, approved, settings=FAST)["comparisons"]
    accuracy = find(comparisons, metric="accuracy", stratum="all", persona="ed_nurse")
    assert accuracy["family_size"] == len(PERSONAS) and accuracy["mde_level"] == pytest.approx(0.05 / len(PERSONAS))
    assert accuracy["mde"] == pytest.approx(mcnemar_mde(40, 0.0, alpha=0.05 / len(PERSONAS)))


# --- settings -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_resamples": 0}, "n_resamples must be a positive integer"),
    ({"confidence_level": 1.0}, "confidence_level must be a number strictly between 0 and 1"),
    ({"alpha": 0}, "alpha must be a number strictly between 0 and 1"),
    ({"seed": -1}, "seed must be a non-negative integer"),
])
def test_settings_are_validated(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ComparisonSettings(**kwargs)


# --- against an approved run --------------------------------------------------------------------------------


def test_candidate_against_approved_matches_personas_across_model_names() -> None:
    approved = random_records(18, model="old", shift="")
    candidate = [dict(r, model="new") for r in approved]
    for r in candidate:
        if r["persona"] == "ed_physician" and r["generated_label"] is not None:
            r["generated_label"] = LABELS[min(2, LABELS.index(r["generated_label"]) + 1)]
    result = compare_to_approved(candidate, approved, settings=FAST)
    comparisons = result["comparisons"]
    assert result["skipped"] == []
    assert {(c["model"], c["baseline"], c["baseline_model"]) for c in comparisons} == {("new", APPROVED, "old")}
    assert len(comparisons) == len(PERSONAS) * 3 * 6
    for comparison in comparisons:
        if comparison["persona"] != "ed_physician":
            assert comparison["delta"] == 0.0 and comparison["pvalue"] == 1.0
    over = find(comparisons, metric="over_triage_rate", stratum="all", persona="ed_physician")
    assert over["delta"] > 0 and over["value"] > over["baseline_value"]
    # Holm within (model, task, stratum, metric, "approved"): the personas of one metric.
    assert len({family_of(c) for c in comparisons}) == 3 * 6


def test_candidate_against_approved_reports_personas_on_one_side_only() -> None:
    approved = random_records(19, personas=("no_persona", "ed_nurse"))
    candidate = random_records(19, personas=("no_persona", "ed_physician"))
    result = compare_to_approved(candidate, approved, settings=FAST)
    assert {c["persona"] for c in result["comparisons"]} == {"no_persona"}
    assert "triage / ed_nurse: in the approved baseline but not run now" in result["skipped"]
    assert "triage / ed_physician: not in the approved baseline" in result["skipped"]


def test_a_changed_dataset_is_an_error_naming_the_ids() -> None:
    approved = random_records(20)
    candidate = [r for r in approved if r["case_id"] != "case-004"]
    with pytest.raises(DataError, match=r"1 case id\(s\) only in the approved baseline: 'case-004'"):
        compare_to_approved(candidate, approved)
    renamed = [dict(r, case_id="case-new") if r["case_id"] == "case-005" else r for r in approved]
    with pytest.raises(DataError) as info:
        compare_to_approved(renamed, approved)
    assert "only in the approved baseline: 'case-005'" in str(info.value)
    assert "only in this run: 'case-new'" in str(info.value)
    relabelled = [dict(r, reference="A" if r["reference"] != "A" else "B") if r["case_id"] == "case-006" else r
                  for r in approved]
    with pytest.raises(DataError, match=r"different reference label: 'case-006'"):
        compare_to_approved(relabelled, approved)
    with pytest.raises(DataError, match="a changed dataset"):
        check_same_dataset(candidate, approved)


def test_an_incomplete_condition_in_the_candidate_is_an_error() -> None:
    approved = random_records(21)
    candidate = [r for r in approved if not (r["persona"] == "ed_nurse" and r["case_id"] == "case-002")]
    with pytest.raises(DataError, match=r"'case-002' in the approved baseline's ed_nurse on m but not in this "
                                        r"run's ed_nurse on m"):
        compare_to_approved(candidate, approved)


def test_several_models_pair_by_name_or_fail_clearly() -> None:
    approved = random_records(22, model="a") + random_records(22, model="b")
    result = compare_to_approved(approved, approved, settings=FAST)
    assert {(c["model"], c["baseline_model"]) for c in result["comparisons"]} == {("a", "a"), ("b", "b")}
    with pytest.raises(DataError, match="cannot tell which model to compare with which"):
        compare_to_approved(random_records(22, model="c") + random_records(22, model="d"), approved)
