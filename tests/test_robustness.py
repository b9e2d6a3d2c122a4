"""Tests of persona_eval.variants and persona_eval.robustness on planted records: flips against the placebo,
effects across wordings, letter preference over balanced letter orders, the null-prompt calibration."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from persona_eval import variants
from persona_eval.comparisons import ComparisonSettings
from persona_eval.personas import BASELINE, PLACEBO
from persona_eval.robustness import calibration, flips, letter_bias, robustness_summary, wording_effects

LABELS = ("A", "B", "C")
FAST = ComparisonSettings(n_resamples=400)


def record(persona: str, case: int, reference: str, generated: str | None, *, stratum: str | None = None,
           **extra: Any) -> dict[str, Any]:
    return {"model": "m", "task": "triage", "persona": persona, "persona_group": "medical",
            "case_id": f"c{case:03d}", "stratum": stratum or ("emergency" if case % 2 else "primary_care"),
            "reference": reference, "generated_label": generated, "logit_label": None, "label_probs": None,
            **extra}


def references(n: int) -> list[str]:
    return [LABELS[i % 3] for i in range(n)]


def escalate(label: str) -> str:
    return {"A": "B", "B": "C", "C": "B"}[label]


# --- variants ---------------------------------------------------------------------------------------------------

def test_letter_orders_form_a_latin_square() -> None:
    orders = variants.letter_orders(LABELS)
    assert orders[0] == LABELS
    for position in range(3):  # every level under every letter exactly once
        assert sorted(order[position] for order in orders) == list(LABELS)
    assert variants.permuted_label_text(LABELS, {"A": "home", "B": "doctor", "C": "emergency"}, orders[1]) == {
        "A": "doctor", "B": "emergency", "C": "home"}


def test_to_levels_maps_letters_back_and_keeps_the_letter() -> None:
    order = ("C", "A", "B")  # letter A shows level C
    row = {"generated_label": "A", "logit_label": "B", "latent_label": None,
           "label_probs": {"A": 0.7, "B": 0.2, "C": 0.1}, "latent_probs": None}
    variants.to_levels(row, LABELS, order)
    assert row["generated_label"] == "C" and row["generated_letter"] == "A" and row["logit_label"] == "A"
    assert row["label_probs"] == {"C": 0.7, "A": 0.2, "B": 0.1} and row["letter_order"] == "CAB"


def test_a_bad_letter_order_is_refused() -> None:
    with pytest.raises(ValueError, match="each of A, B, C once"):
        variants.level_of_letter(LABELS, ("A", "A", "B"))


@given(st.lists(st.floats(0.01, 1.0), min_size=3, max_size=3), st.lists(st.floats(0.01, 1.0), min_size=3, max_size=3))
def test_calibration_removes_any_case_independent_letter_weight(content: list[float], bias: list[float]) -> None:
    # A model whose probabilities are content x bias: dividing by the prior (the bias) gives the content back.
    total_bias = sum(bias)
    prior = {label: b / total_bias for label, b in zip(LABELS, bias, strict=True)}
    raw = [c * b for c, b in zip(content, bias, strict=True)]
    probs = {label: value / sum(raw) for label, value in zip(LABELS, raw, strict=True)}
    calibrated = variants.calibrate(probs, prior, LABELS)
    assert calibrated is not None
    for label, c in zip(LABELS, content, strict=True):
        assert calibrated[label] == pytest.approx(c / sum(content), rel=1e-9)


def test_calibration_without_a_prior_or_with_a_zero_is_none() -> None:
    probs = {"A": 0.5, "B": 0.5, "C": 0.0}
    assert variants.calibrate(probs, None, LABELS) is None
    assert variants.calibrate(probs, {"A": 0.5, "B": 0.5, "C": 0.0}, LABELS) is None
    assert variants.null_prior([{"label_probs": None}], LABELS) is None


# --- flips -------------------------------------------------------------------------------------------------------

def planted_flip_run(n: int = 60) -> list[dict[str, Any]]:
    """no_persona answers the reference; the placebo changes 2 cases; ed_nurse a third; ed_physician none."""
    refs = references(n)
    rows = []
    for i, ref in enumerate(refs):
        rows.append(record(BASELINE, i, ref, ref))
        rows.append(record(PLACEBO, i, ref, escalate(ref) if i in (5, 40) else ref))
        rows.append(record("ed_nurse", i, ref, escalate(ref) if i % 3 == 0 else ref))
        rows.append(record("ed_physician", i, ref, ref))
    return rows


def test_a_persona_flipping_a_third_is_separated_from_the_placebo() -> None:
    rows = {(r["persona"], r["stratum"]): r for r in flips(planted_flip_run())}
    nurse = rows[("ed_nurse", "all")]
    assert (nurse["n"], nurse["changed"], nurse["flip_rate"]) == (60, 20, pytest.approx(1 / 3))
    # References cycle A, B, C; every third case (i % 3 == 0) is an A, escalated to B: all more urgent.
    assert (nurse["more_urgent"], nurse["less_urgent"], nurse["other"]) == (20, 0, 0)
    assert nurse["placebo_changed"] == 2 and nurse["placebo_flip_rate"] == pytest.approx(2 / 60)
    assert nurse["more_than_placebo"] is True and nurse["pvalue_adjusted"] < 1e-3
    assert [c[0] for c in nurse["cases"]["more_urgent"]][:2] == ["c000", "c003"]
    assert nurse["cases"]["more_urgent"][0][2:] == ["A", "B"]
    physician = rows[("ed_physician", "all")]
    assert physician["changed"] == 0 and physician["more_than_placebo"] is False
    placebo = rows[(PLACEBO, "all")]
    assert placebo["changed"] == 2 and placebo["pvalue"] is None and placebo["more_than_placebo"] is None
    assert {s for _, s in rows} == {"all", "emergency", "primary_care"}
    assert "cases" not in rows[("ed_nurse", "emergency")]


def test_flips_match_a_direct_count_and_the_exact_binomial() -> None:
    from scipy.stats import binomtest

    rows = planted_flip_run(30)
    nurse = next(r for r in flips(rows) if r["persona"] == "ed_nurse" and r["stratum"] == "all")
    base = {r["case_id"]: r["generated_label"] for r in rows if r["persona"] == BASELINE}
    placebo = {r["case_id"] for r in rows if r["persona"] == PLACEBO and r["generated_label"] != base[r["case_id"]]}
    flipped = {r["case_id"] for r in rows if r["persona"] == "ed_nurse" and r["generated_label"] != base[r["case_id"]]}
    persona_only, placebo_only = len(flipped - placebo), len(placebo - flipped)
    assert (nurse["persona_only"], nurse["placebo_only"]) == (persona_only, placebo_only)
    expected = binomtest(persona_only, persona_only + placebo_only, 0.5, alternative="greater").pvalue
    assert nurse["pvalue"] == pytest.approx(expected)


def test_flips_to_no_answer_count_as_other_and_a_missing_placebo_is_said() -> None:
    rows = [record(BASELINE, i, "A", "A") for i in range(4)]
    rows += [record("ed_nurse", i, "A", None if i == 0 else "A") for i in range(4)]
    (nurse, *_) = [r for r in flips(rows) if r["stratum"] == "all"]
    assert (nurse["changed"], nurse["other"], nurse["more_urgent"]) == (1, 1, 0)
    assert nurse["placebo_changed"] is None and "no placebo" in nurse["note"]
    assert nurse["more_than_placebo"] is None


# --- wordings ----------------------------------------------------------------------------------------------------

def worded_run(n: int = 60) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """ed_physician_bold: wording 1 escalates every case, wording 2 de-escalates, wording 3 none; ed_nurse
    escalates under all three wordings."""
    refs = references(n)
    up = {"A": "B", "B": "C", "C": "C"}
    down = {"A": "A", "B": "A", "C": "B"}
    main, worded = [], []
    for i, ref in enumerate(refs):
        main.append(record(BASELINE, i, ref, ref))
        main.append(record("ed_physician_bold", i, ref, up[ref], system_prompt="bold 1"))
        main.append(record("ed_nurse", i, ref, up[ref], system_prompt="nurse 1"))
        for number, answer in ((2, down[ref]), (3, ref)):
            worded.append(record("ed_physician_bold", i, ref, answer, system_prompt=f"bold {number}",
                                 variant={"kind": variants.WORDING, "wording": number}))
        for number in (2, 3):
            worded.append(record("ed_nurse", i, ref, up[ref], system_prompt=f"nurse {number}",
                                 variant={"kind": variants.WORDING, "wording": number}))
    return main, worded


def test_a_wording_dependent_effect_is_flagged_and_a_robust_one_is_not() -> None:
    main, worded = worded_run()
    rows = {(r["persona"], r["stratum"], r["metric"]): r for r in wording_effects(main, worded, settings=FAST)}
    bold = rows[("ed_physician_bold", "all", "risk_propensity")]
    assert [w["wording"] for w in bold["wordings"]] == [1, 2, 3]
    assert [w["declaration"] for w in bold["wordings"]] == ["bold 1", "bold 2", "bold 3"]
    deltas = [w["delta"] for w in bold["wordings"]]
    assert deltas[0] == pytest.approx(1 / 3) and deltas[1] == pytest.approx(-1 / 3) and deltas[2] == 0
    assert bold["spread"] == pytest.approx(2 / 3) and bold["sign_differs"] is True
    nurse = rows[("ed_nurse", "all", "risk_propensity")]
    assert nurse["sign_differs"] is False and nurse["spread"] == pytest.approx(0)
    assert not any(r["sign_differs"] for (persona, _, _), r in rows.items() if persona == "ed_nurse")


def test_wording_effects_without_variants_are_empty() -> None:
    main, _ = worded_run(6)
    assert wording_effects(main, [], settings=FAST) == []


# --- letter orders and calibration ----------------------------------------------------------------------------------

def lettered_run(n: int = 30, *, prefers_a: str = "ed_physician_cautious"
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every persona answers the reference level, except that `prefers_a` writes the letter A whatever it
    stands for; label probabilities are content (0.8 on the level) x bias (12 on letter A for `prefers_a`)."""
    refs = references(n)
    main, others = [], []
    for persona in (BASELINE, "ed_nurse", prefers_a):
        bias = {"A": 12.0, "B": 1.0, "C": 1.0} if persona == prefers_a else {"A": 1.0, "B": 1.0, "C": 1.0}
        for order in variants.letter_orders(LABELS):
            level_of = variants.level_of_letter(LABELS, order)
            letter_of = {level: letter for letter, level in level_of.items()}
            prior = {letter: bias[letter] / sum(bias.values()) for letter in LABELS}
            for i, ref in enumerate(refs):
                weights = {letter: (0.8 if level_of[letter] == ref else 0.1) * bias[letter] for letter in LABELS}
                probs = {letter: w / sum(weights.values()) for letter, w in weights.items()}
                letter = max(LABELS, key=lambda x: probs[x])
                row = record(persona, i, ref, letter, label_probs=probs)
                if order != LABELS:
                    row["variant"] = {"kind": variants.LETTERS, "letter_order": "".join(order)}
                variants.to_levels(row, LABELS, order)
                level_prior = {level_of[x]: prior[x] for x in LABELS}
                calibrated = variants.calibrate(row["label_probs"], level_prior, LABELS)
                assert calibrated is not None
                row["calibrated_probs"] = calibrated
                row["calibrated_label"] = max(LABELS, key=lambda x: calibrated[x])
                row["calibrated_letter"] = letter_of[row["calibrated_label"]]
                (main if order == LABELS else others).append(row)
            stub = {"model": "m", "task": "triage", "persona": persona, "case_id": "null-prompt-1",
                    "stratum": "null_prompt", "reference": "A", "generated_label": "A",
                    "label_probs": {level_of[x]: prior[x] for x in LABELS},
                    "variant": {"kind": variants.NULL_PROMPT, "letter_order": "".join(order)}}
            others.append(stub)
    return main, others


def test_a_planted_letter_preference_is_recovered_and_separated_from_triage() -> None:
    main, others = lettered_run()
    rows = {r["persona"]: r for r in letter_bias(main, others)}
    cautious = rows["ed_physician_cautious"]
    assert cautious["orders"] == ["ABC", "BCA", "CAB"] and cautious["n"] == 90
    assert cautious["letter_shares"] == {"A": 1.0, "B": 0.0, "C": 0.0} and cautious["flagged"] is True
    assert cautious["shift"]["A"] == pytest.approx(1 - 1 / 3)
    # The calibration takes the preference away: each letter a third again.
    assert cautious["calibrated_letter_shares"] == {label: pytest.approx(1 / 3) for label in LABELS}
    # In the usual order, writing A (self-care) for everything looks like a large under-triage effect;
    # balanced over the orders, the persona sends a third of cases to each level.
    under = cautious["balanced"]["all"]["under_triage_rate"]
    assert under["identity_delta"] == pytest.approx(2 / 3)
    assert under["delta"] == pytest.approx(1 / 3)
    for persona in (BASELINE, "ed_nurse"):
        assert rows[persona]["letter_shares"] == {label: pytest.approx(1 / 3) for label in LABELS}
        assert rows[persona]["flagged"] is False and rows[persona]["pvalue"] == pytest.approx(1.0)


def test_the_calibration_restores_accuracy_and_reports_the_prior() -> None:
    main, others = lettered_run()
    rows = {r["persona"]: r for r in calibration(main, others)}
    cautious = rows["ed_physician_cautious"]
    assert cautious["prior"] == {"A": pytest.approx(12 / 14), "B": pytest.approx(1 / 14), "C": pytest.approx(1 / 14)}
    block = cautious["strata"]["all"]
    assert block["accuracy"] == pytest.approx(1 / 3) and block["calibrated_accuracy"] == 1.0
    assert block["calibrated_expected_calibration_error"] < block["expected_calibration_error"]
    assert rows[BASELINE]["strata"]["all"]["accuracy"] == rows[BASELINE]["strata"]["all"]["calibrated_accuracy"] == 1


def test_the_summary_block_holds_every_analysis_and_is_json() -> None:
    import json

    main, others = lettered_run(9)
    block = robustness_summary(main, others, settings=FAST, options={"wordings": False, "letter_bias": True})
    assert set(block) == {"options", "flips", "wordings", "letters", "calibration"}
    assert block["wordings"] == [] and block["letters"] and block["calibration"]
    text = json.dumps(block, allow_nan=False)
    assert "NaN" not in text


def test_letter_shares_are_permutation_invariant_over_cases() -> None:
    main, others = lettered_run(12)
    expected = {r["persona"]: r["letter_shares"] for r in letter_bias(main, others)}
    for shuffled in itertools.islice(itertools.permutations(range(3)), 3):
        order = list(shuffled)
        again = {r["persona"]: r["letter_shares"] for r in letter_bias([main[i] for i in order] + main[3:], others)}
        assert again == expected
    assert not math.isnan(sum(v for v in expected[BASELINE].values() if v is not None))


# --- the report section and the terminal ---------------------------------------------------------------------------

def _summary_with(block: dict[str, Any]) -> dict[str, Any]:
    return {"run_id": "r", "verdict": {"status": "passed"}, "results": [], "robustness": block}


def test_the_report_section_escapes_model_and_dataset_text_and_lists_changed_cases() -> None:
    from persona_eval.report.robustness_section import robustness_section
    from persona_eval.report.run import Run

    rows = planted_flip_run(60)
    evil = "<script>alert(1)</script>"
    for row in rows:
        row["case_id"] = f"{row['case_id']}{evil}"
    main, worded = worded_run(12)
    block = robustness_summary(rows, [], settings=FAST)
    block["wordings"] = wording_effects(main, worded, settings=FAST)
    for row in block["wordings"]:
        for wording in row["wordings"]:
            wording["declaration"] = evil
    html = str(robustness_section(Run(_summary_with(block), [])))
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert html.index("more changed answers than the placebo") < html.index("<table")
    assert "Changed cases of" in html and "More urgent than under no persona (20)" in html
    assert "change sign between a persona" in html
    assert "Not run: --pe-letter-bias" in html or "Not run:" in html


def test_the_report_section_is_empty_without_a_block_and_says_an_error() -> None:
    from persona_eval.report.robustness_section import robustness_section
    from persona_eval.report.run import Run

    assert str(robustness_section(Run({"results": []}, []))) == ""
    said = str(robustness_section(Run(_summary_with({"error": "cannot pair <cases>"}), [])))
    assert "could not be computed: cannot pair &lt;cases&gt;" in said


def test_the_terminal_gives_the_verdicts_first_then_the_evidence() -> None:
    from persona_eval.report.robustness_text import robustness_lines

    main, others = lettered_run(30)
    flips_rows = planted_flip_run(60)
    block = robustness_summary(flips_rows, others, settings=FAST)
    block["letters"] = letter_bias(main, others)
    block["calibration"] = calibration(main, others)
    lines = robustness_lines(_summary_with(block))
    text = "\n".join(lines)
    assert "Flips against no_persona / triage / m (all cases): ed_nurse change(s) more answers than the placebo" in text
    assert text.index("placebo changed 2 of 60 answers") < text.index("ed_nurse changed 20 of 60 answers")
    assert "ed_physician_cautious writes A for 100% of its answers over 3 letter orders (expected 33%" in text
    assert "33% after the null-prompt calibration" in text
    assert "its under-triage effect is +0.33 balanced over the orders (+0.67 in the usual order)" in text
    assert "ed_physician_cautious: accuracy 33% -> 100% calibrated" in text
    assert robustness_lines({"results": []}) == []
