"""Tests of persona_eval.evaluation: the label distribution at the answer, per-case records, metrics."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from persona_eval import metrics
from persona_eval.backends.base import Capabilities, Generation, GenerationConfig, LabelScoring, TokenScores
from persona_eval.cache import NullCache, ResultCache
from persona_eval.errors import DataError
from persona_eval.evaluation import (
    CONSISTENCY_TAUTOLOGICAL,
    NO_LATENT,
    NOT_AVAILABLE,
    TriageSettings,
    evaluate_triage,
    label_distribution,
    label_positions,
    triage_metrics,
)
from persona_eval.parsing import AnswerSpan, find_triage_answer
from persona_eval.personas import STUDY_PERSONAS, Persona
from persona_eval.prompts import SystemPolicy
from persona_eval.runner import Progress, Runner
from persona_eval.tasks import triage
from persona_eval.tasks.triage import TriageCase
from persona_eval.templates import render_case, template_named

LABELS = ["A", "B", "C"]
BASELINE, ASSISTANT, ED_PHYSICIAN, ED_NURSE, BOLD, CAUTIOUS = STUDY_PERSONAS


def _softmax(logprobs: Mapping[str, float]) -> dict[str, float]:
    total = sum(math.exp(v) for v in logprobs.values())
    return {label: math.exp(value) / total for label, value in logprobs.items()}


# --- label_distribution ------------------------------------------------------------------------------

ANSWER_LOGPROBS = {"A": -3.0, "B": -0.25, "C": -1.75}


def _generation() -> Generation:
    # "Answer: B. Routine visit" with the answer letter at index 8, inside the token " B" (offset 7).
    text = "Answer: B. Routine visit"
    tokens = [
        TokenScores(0, "Answer", {"A": -0.1, "B": -5.0, "C": -5.0}),
        TokenScores(6, ":", {"A": -4.0, "B": -4.0, "C": -0.1}),
        TokenScores(7, " B", dict(ANSWER_LOGPROBS)),
        TokenScores(9, ".", {"A": -0.2, "B": -6.0, "C": -6.0}),
        TokenScores(10, " Routine", {"A": -1.0, "B": -1.0, "C": -1.0}),
    ]
    return Generation(text=text, tokens=tokens, finish_reason="stop")


def test_label_distribution_is_the_softmax_at_the_token_holding_the_answer_letter() -> None:
    generation = _generation()
    span = find_triage_answer(generation.text)
    assert span == AnswerSpan("B", 8, 9)
    probs, flagged = label_distribution(generation, span, LABELS)
    assert probs is not None
    assert probs == pytest.approx(_softmax(ANSWER_LOGPROBS), abs=1e-12)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-12)
    assert list(probs) == LABELS
    assert flagged is False


@pytest.mark.parametrize(("start", "token_index"), [(0, 0), (5, 0), (6, 1), (7, 2), (8, 2), (9, 3), (23, 4)])
def test_label_distribution_reads_the_token_whose_range_holds_the_span_start(start: int, token_index: int) -> None:
    generation = _generation()
    assert generation.tokens is not None
    probs, _ = label_distribution(generation, AnswerSpan("B", start, start + 1), LABELS)
    expected = generation.tokens[token_index].label_logprobs
    assert probs == pytest.approx(_softmax({k: float(v) for k, v in expected.items() if v is not None}))


def test_label_distribution_fills_an_absent_label_with_the_floor_and_flags_it() -> None:
    generation = Generation("C", tokens=[TokenScores(0, "C", {"A": None, "B": -2.0, "C": -0.1}, floor=-7.5)])
    probs, flagged = label_distribution(generation, AnswerSpan("C", 0, 1), LABELS)
    assert flagged is True
    assert probs == pytest.approx(_softmax({"A": -7.5, "B": -2.0, "C": -0.1}))


def test_label_distribution_without_floor_for_an_absent_label_gives_none() -> None:
    generation = Generation("C", tokens=[TokenScores(0, "C", {"A": None, "B": -2.0, "C": -0.1})])
    assert label_distribution(generation, AnswerSpan("C", 0, 1), LABELS) == (None, False)


def test_label_distribution_with_every_label_at_the_floor_sentinel_is_none() -> None:
    generation = Generation("C", tokens=[TokenScores(0, "C", {"A": None, "B": None, "C": None},
                                                     floor=-math.inf)])
    probs, flagged = label_distribution(generation, AnswerSpan("C", 0, 1), LABELS)
    assert probs is None
    assert flagged is True


@pytest.mark.parametrize(("generation", "span"), [
    pytest.param(Generation("Answer: B", tokens=None), AnswerSpan("B", 8, 9), id="no-tokens"),
    pytest.param(Generation("Answer: B", tokens=[]), AnswerSpan("B", 8, 9), id="empty-tokens"),
    pytest.param(_generation(), None, id="no-span"),
    pytest.param(Generation("xx B", tokens=[TokenScores(3, "B", {"A": -1.0, "B": -1.0, "C": -1.0})]),
                 AnswerSpan("B", 1, 2), id="span-before-first-token"),
])
def test_label_distribution_is_none_without_tokens_or_span(generation: Generation, span: AnswerSpan | None
                                                           ) -> None:
    assert label_distribution(generation, span, LABELS) == (None, False)


# --- evaluate_triage ---------------------------------------------------------------------------------

CASES = [
    TriageCase("e1", "emergency", "C", "ECG now", "[e1] Crushing chest pain and sweating."),
    TriageCase("e2", "emergency", "C", "stroke", "[e2] Slurred speech since 40 minutes."),
    TriageCase("p1", "primary_care", "A", "cold", "[p1] A runny nose since yesterday."),
    TriageCase("p2", "primary_care", "B", "rash", "[p2] A rash for two weeks."),
    TriageCase("p3", "primary_care", "A", "bruise", "[p3] A bruise on the shin."),
]
REPLIES = {
    "[e1]": "Answer: C. Chest pain with sweating needs an ECG now.",
    "[e2]": "Answer: B. It can wait for a routine visit.",
    "[p1]": "Answer: A. Rest and fluids.",
    "[p2]": "It could be either B or C.",       # a hedge: no answer
    "[p3]": "I cannot say without more details.",  # no answer at all
}
# e2 writes B, though at the prompt boundary (before it wrote anything) it preferred C: the latent label
# differs. Its distribution at the answer letter (calibration's) is E2_ANSWER_LOGPROBS.
E2_ANSWER_LOGPROBS = {"A": -3.0, "B": -1.2, "C": -0.4}
PROMPT_LOGPROBS = {"[e1]": {"A": -4.0, "B": -2.0, "C": -0.2}, "[e2]": {"A": -3.0, "B": -1.5, "C": -0.3},
                   "[p1]": {"A": -0.1, "B": -2.5, "C": -4.0},
                   "[p2]": {"A": -2.0, "B": -0.3, "C": -1.0}, "[p3]": {"A": -0.2, "B": -2.0, "C": -4.0}}


def _marker(prompt: str) -> str:
    return next(marker for marker in REPLIES if marker in prompt)


def _reply(prompt: str) -> str:
    return REPLIES[_marker(prompt)]


def _answer_logprobs(prompt: str, letter: str) -> dict[str, float | None]:
    if _marker(prompt) == "[e2]":
        return dict(E2_ANSWER_LOGPROBS)
    return {label: (-0.1 if label == letter else -2.6) for label in LABELS}


def _prompt_logprobs(prompt: str) -> dict[str, float | None]:
    return dict(PROMPT_LOGPROBS[_marker(prompt)])


@pytest.fixture
def triage_backend(make_backend: Any) -> Callable[..., Any]:
    def make(**options: Any) -> Any:
        return make_backend(_reply, answer_logprobs=_answer_logprobs, prompt_logprobs=_prompt_logprobs,
                            batch_size=2, **options)
    return make


def test_evaluate_triage_records(triage_backend: Callable[..., Any]) -> None:
    backend = triage_backend()
    records = evaluate_triage(CASES, ED_NURSE, Runner(backend, NullCache()), run_id="run-1", model="tiny")
    assert [r["case_id"] for r in records] == ["e1", "e2", "p1", "p2", "p3"]
    for record, case in zip(records, CASES, strict=True):
        request = render_case(case.text, ED_NURSE, SystemPolicy())
        assert record["run_id"] == "run-1"
        assert record["task"] == "triage"
        assert record["model"] == "tiny"
        assert record["persona"] == "ed_nurse"
        assert record["persona_group"] == "medical"
        assert record["stratum"] == case.stratum
        assert record["reference"] == case.reference
        assert record["system_prompt"].startswith("You are an Emergency Department nurse.\n\nYour task is")
        assert record["prompt"] == backend.render_prompt(request)
        assert record["generated_text"] == _reply(record["prompt"])
        assert record["reasoning"] is None and record["final_response"] == record["generated_text"]
        assert record["finish_reason"] == "stop"
        assert record["cached"] is False
        assert record["probs_flagged"] is False
        assert record["template_version"] == "triage-study@1"
        assert record["template"]["id"] == "triage-study" and record["template"]["hash"].startswith("sha256:")
        assert record["label_probs"] is not None
        assert list(record["label_probs"]) == LABELS
        assert sum(record["label_probs"].values()) == pytest.approx(1.0)
        assert record["latent_probs"] == pytest.approx(_softmax(PROMPT_LOGPROBS[_marker(record["prompt"])]))
        assert record["logit_label"] == record["latent_label"] == max(LABELS, key=record["latent_probs"].__getitem__)
    json.dumps(records, allow_nan=False)  # plain JSON data

    by_id = {r["case_id"]: r for r in records}
    assert [by_id[i]["generated_label"] for i in ("e1", "e2", "p1", "p2", "p3")] == ["C", "B", "A", None, None]
    assert [by_id[i]["logit_label"] for i in ("e1", "e2", "p1", "p2", "p3")] == ["C", "C", "A", "B", "A"]
    assert [by_id[i]["probs_source"] for i in ("e1", "e2", "p1", "p2", "p3")] == [
        "answer", "answer", "answer", "prompt", "prompt"]
    assert by_id["e2"]["label_probs"] == pytest.approx(_softmax(E2_ANSWER_LOGPROBS))
    assert by_id["p2"]["label_probs"] == pytest.approx(_softmax(PROMPT_LOGPROBS["[p2]"]))
    assert by_id["p3"]["label_probs"] == pytest.approx(_softmax(PROMPT_LOGPROBS["[p3]"]))


def test_every_case_is_scored_once_at_the_prompt_boundary(triage_backend: Callable[..., Any]) -> None:
    backend = triage_backend()
    records = evaluate_triage(CASES, BOLD, Runner(backend, NullCache()), run_id="r", model="m")
    assert sorted(backend.prompts_asked("score_labels")) == sorted(r["prompt"] for r in records)
    assert sorted(backend.prompts_asked("generate")) == sorted(r["prompt"] for r in records)


def test_a_boundary_read_in_the_generation_pass_is_not_scored_again(triage_backend: Callable[..., Any]) -> None:
    backend = triage_backend(boundary_in_generate=True)
    records = evaluate_triage(CASES, BOLD, Runner(backend, NullCache()), run_id="r", model="m")
    assert backend.calls_of("score_labels") == []
    assert [r["logit_label"] for r in records] == ["C", "C", "A", "B", "A"]
    assert [r["probs_source"] for r in records] == ["answer", "answer", "answer", "prompt", "prompt"]


def test_an_answer_first_template_does_not_report_a_tautological_consistency(
        triage_backend: Callable[..., Any]) -> None:
    template = template_named("answer-first", task="triage")
    settings = TriageSettings(template=template, scoring=LabelScoring(labels=tuple(LABELS),
                                                                      answer_prefix=template.answer_prefix))
    assert settings.consistency_tautological
    records = evaluate_triage(CASES, BOLD, Runner(triage_backend(), NullCache()), run_id="r", model="m",
                              settings=settings)
    assert all(r["logit_label"] is None for r in records)
    assert [r["latent_label"] for r in records] == ["C", "C", "A", "B", "A"]  # kept, for analysis
    assert records[0]["template_version"] == "triage-answer-first@1"
    result = triage_metrics(records, consistency_note=CONSISTENCY_TAUTOLOGICAL)["all"]
    assert result["metrics"]["consistency_rate"] is None
    assert result["notes"]["consistency_rate"] == CONSISTENCY_TAUTOLOGICAL
    assert result["metrics"]["brier_score"] is not None
    assert label_positions(settings)["consistency_rate"].startswith("not reported")
    assert label_positions(TriageSettings())["consistency_rate"] == "prompt boundary + '## Final Response\\n'"


@pytest.mark.parametrize(("persona", "policy", "expected"), [
    (BASELINE, SystemPolicy(), None),
    (BASELINE, SystemPolicy(baseline_empty_system=True), ""),
    (BASELINE, SystemPolicy(system_role_supported=False), None),
    (ED_PHYSICIAN, SystemPolicy(), "You are an Emergency Department physician."),
    (ED_PHYSICIAN, SystemPolicy(baseline_empty_system=True), "You are an Emergency Department physician."),
    (ED_PHYSICIAN, SystemPolicy(system_role_supported=False), None),
])
def test_system_prompt_follows_the_backend_policy(triage_backend: Callable[..., Any], persona: Persona,
                                                  policy: SystemPolicy, expected: str | None) -> None:
    # The answer-first template: the persona sentence is the whole system turn.
    template = template_named("answer-first", task="triage")
    settings = TriageSettings(template=template, scoring=LabelScoring(labels=tuple(LABELS),
                                                                      answer_prefix=template.answer_prefix))
    backend = triage_backend(policy=policy)
    records = evaluate_triage(CASES[:2], persona, Runner(backend, NullCache()), run_id="r", model="m",
                              settings=settings)
    assert all(r["system_prompt"] == expected for r in records)
    assert all(r["persona"] == persona.id and r["persona_group"] == persona.group for r in records)
    if persona.declaration is not None and not policy.system_role_supported:
        assert all(f"<user>{persona.declaration}\n\n" in r["prompt"] for r in records)
    if persona.declaration is None:
        assert all("You are" not in r["prompt"] for r in records)


def test_rerun_is_served_from_the_cache(triage_backend: Callable[..., Any], tmp_path: Path) -> None:
    with ResultCache(tmp_path / "cache.sqlite3") as cache:
        first = evaluate_triage(CASES, ED_PHYSICIAN, Runner(triage_backend(), cache), run_id="run-1", model="m")
        backend = triage_backend()
        second = evaluate_triage(CASES, ED_PHYSICIAN, Runner(backend, cache), run_id="run-2", model="m")
    assert backend.calls == []
    assert all(r["cached"] is True for r in second)
    assert all(r["run_id"] == "run-2" for r in second)
    strip = ("cached", "run_id")
    assert ([{k: v for k, v in r.items() if k not in strip} for r in second]
            == [{k: v for k, v in r.items() if k not in strip} for r in first])


def test_a_backend_without_logprobs_gives_no_distribution_and_no_prompt_scoring(
        triage_backend: Callable[..., Any]) -> None:
    backend = triage_backend(capabilities=Capabilities(logprobs=False, prompt_scoring=False))
    records = evaluate_triage(CASES, ED_NURSE, Runner(backend, NullCache()), run_id="r", model="m")
    assert backend.calls_of("score_labels") == []
    assert [r["generated_label"] for r in records] == ["C", "B", "A", None, None]
    assert all(r["label_probs"] is None and r["logit_label"] is None and r["probs_source"] is None
               for r in records)


def test_a_backend_without_prompt_scoring_leaves_unparsed_cases_without_distribution(
        triage_backend: Callable[..., Any]) -> None:
    backend = triage_backend(capabilities=Capabilities(logprobs=True, prompt_scoring=False))
    records = evaluate_triage(CASES, ED_NURSE, Runner(backend, NullCache()), run_id="r", model="m")
    assert backend.calls_of("score_labels") == []
    assert [r["probs_source"] for r in records] == ["answer", "answer", "answer", None, None]
    assert [r["logit_label"] for r in records] == [None] * 5  # no prompt boundary, no latent label
    assert triage_metrics(records)["all"]["notes"]["consistency_rate"] == NO_LATENT


def test_a_reasoning_reply_is_recorded_with_its_trace_and_read_in_its_final_response(make_backend: Any) -> None:
    # The draft letters in the trace are not the answer; the letter of the final response is, at its token.
    replies = {"[e1]": "## Thinking\nMaybe A? No: chest pain.\n\n## Final Response\nC",
               "[p1]": "<think>B or A.</think>\n\nAnswer: A",
               "[e2]": "<think>Slurred speech, so"}  # cut inside the trace
    backend = make_backend(lambda prompt: replies[_marker(prompt)], answer_logprobs=_answer_logprobs,
                           prompt_logprobs=_prompt_logprobs)
    records = evaluate_triage(CASES[:3], ED_NURSE, Runner(backend, NullCache()), run_id="r", model="m")
    by_id = {r["case_id"]: r for r in records}
    assert [(by_id[i]["reasoning"], by_id[i]["final_response"], by_id[i]["generated_label"])
            for i in ("e1", "p1", "e2")] == [("Maybe A? No: chest pain.", "C", "C"), ("B or A.", "Answer: A", "A"),
                                             ("Slurred speech, so", "", None)]
    assert by_id["e1"]["generated_text"] == replies["[e1]"]
    assert by_id["e1"]["probs_source"] == by_id["p1"]["probs_source"] == "answer"
    assert max(LABELS, key=by_id["p1"]["label_probs"].__getitem__) == "A"
    assert by_id["e2"]["probs_source"] == "prompt"


def test_a_label_absent_from_the_top_k_is_flagged_in_the_record(make_backend: Any) -> None:
    backend = make_backend(_reply, batch_size=8, floor=-9.0,
                           answer_logprobs=lambda prompt, letter: {"A": None, "B": -1.0, "C": -0.2})
    records = evaluate_triage(CASES[:1], ED_NURSE, Runner(backend, NullCache()), run_id="r", model="m")
    assert records[0]["probs_flagged"] is True
    assert records[0]["label_probs"] == pytest.approx(_softmax({"A": -9.0, "B": -1.0, "C": -0.2}))


def test_progress_reaches_the_number_of_cases(triage_backend: Callable[..., Any]) -> None:
    lines: list[str] = []
    progress = Progress("m/ed_nurse", len(CASES), write=lines.append)
    evaluate_triage(CASES, ED_NURSE, Runner(triage_backend(), NullCache()), run_id="r", model="m",
                    progress=progress)
    assert progress.done == len(CASES)
    assert lines[-1].startswith(f"persona-eval m/ed_nurse: {len(CASES)}/{len(CASES)} cases")


# --- triage_metrics ----------------------------------------------------------------------------------


def _record(stratum: str, reference: str, generated: str | None, logit: str | None,
            probs: Sequence[float] | None) -> dict[str, Any]:
    return {"stratum": stratum, "reference": reference, "generated_label": generated, "logit_label": logit,
            "label_probs": None if probs is None else dict(zip(LABELS, probs, strict=True))}


RECORDS = [
    _record("emergency", "C", "C", "C", (0.1, 0.2, 0.7)),
    _record("emergency", "C", "B", "C", (0.1, 0.45, 0.45)),
    _record("emergency", "B", "C", "C", (0.05, 0.15, 0.8)),
    _record("emergency", "C", None, "B", (0.2, 0.5, 0.3)),
    _record("emergency", "C", "A", None, None),
    _record("primary_care", "A", "A", "A", (0.9, 0.05, 0.05)),
    _record("primary_care", "A", "B", "B", (0.3, 0.6, 0.1)),
    _record("primary_care", "B", "B", "A", (0.5, 0.4, 0.1)),
    _record("primary_care", "B", "A", "A", (0.6, 0.3, 0.1)),
    _record("primary_care", "A", None, None, None),
]


def _expected(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    y_true = [r["reference"] for r in rows]
    y_pred = [r["generated_label"] for r in rows]
    with_probs = [r for r in rows if r["label_probs"] is not None]
    probs = [[r["label_probs"][label] for label in LABELS] for r in with_probs]
    return {
        "accuracy": metrics.accuracy(y_true, y_pred),
        "parse_rate": metrics.parse_rate(y_pred),
        "risk_propensity": metrics.risk_propensity(y_pred),
        "over_triage_rate": metrics.over_triage_rate(y_true, y_pred),
        "under_triage_rate": metrics.under_triage_rate(y_true, y_pred),
        "risk_sensitivity": metrics.risk_sensitivity(y_true, y_pred),
        "consistency_rate": metrics.consistency_rate(y_pred, [r["logit_label"] for r in rows]),
        "expected_calibration_error": metrics.expected_calibration_error(
            [r["reference"] for r in with_probs], probs),
        "brier_score": metrics.brier_score([r["reference"] for r in with_probs], probs),
        "too_long_rate": sum(r.get("finish_reason") == "too_long" for r in rows) / len(rows),
        "truncated_rate": sum(r.get("finish_reason") == "length" for r in rows) / len(rows),
    }


def test_triage_metrics_per_stratum_equal_the_metric_functions() -> None:
    result = triage_metrics(RECORDS)
    assert list(result) == ["all", "emergency", "primary_care"]
    for stratum in result:
        rows = [r for r in RECORDS if stratum == "all" or r["stratum"] == stratum]
        assert result[stratum]["n"] == len(rows)
        assert list(result[stratum]["metrics"]) == list(triage.METRIC_NAMES)
        expected = _expected(rows)
        for name in triage.METRIC_NAMES:
            assert not math.isnan(expected[name]), name
            assert result[stratum]["metrics"][name] == pytest.approx(expected[name], abs=1e-12), (stratum, name)
        assert result[stratum]["notes"] == {}
    # A few values worked by hand, so the comparison above is not circular by accident.
    assert result["emergency"]["metrics"]["accuracy"] == pytest.approx(1 / 5)
    assert result["emergency"]["metrics"]["parse_rate"] == pytest.approx(4 / 5)
    assert result["primary_care"]["metrics"]["consistency_rate"] == pytest.approx(100 * 3 / 4)


def test_triage_metrics_skip_an_empty_stratum() -> None:
    only_emergency = [r for r in RECORDS if r["stratum"] == "emergency"]
    result = triage_metrics(only_emergency)
    assert list(result) == ["all", "emergency"]
    assert result["all"] == result["emergency"]
    assert triage_metrics([]) == {}


def test_undefined_metrics_are_none_with_a_note() -> None:
    # Every answer right: no errors, so risk sensitivity (over / (over + under)) is undefined.
    perfect = [_record("primary_care", "A", "A", "A", (0.8, 0.1, 0.1)),
               _record("primary_care", "B", "B", "B", (0.1, 0.8, 0.1))]
    result = triage_metrics(perfect)["primary_care"]
    assert result["metrics"]["risk_sensitivity"] is None
    assert result["notes"] == {"risk_sensitivity": "not defined on these cases"}
    assert result["metrics"]["accuracy"] == 1.0

    # Nothing parsable: rates over parsable answers are undefined, accuracy and parse rate are 0.
    unparsed = [_record("emergency", "C", None, "C", (0.1, 0.1, 0.8))]
    result = triage_metrics(unparsed)["emergency"]
    assert result["metrics"]["accuracy"] == 0.0
    assert result["metrics"]["parse_rate"] == 0.0
    for name in ("risk_propensity", "over_triage_rate", "under_triage_rate", "risk_sensitivity",
                 "consistency_rate"):
        assert result["metrics"][name] is None
        assert result["notes"][name] == "not defined on these cases"
    assert result["metrics"]["brier_score"] is not None


def test_without_logprobs_the_probability_metrics_are_not_available() -> None:
    result = triage_metrics(RECORDS, logprobs_available=False)
    for stratum in ("all", "emergency", "primary_care"):
        values, notes = result[stratum]["metrics"], result[stratum]["notes"]
        for name in ("consistency_rate", "expected_calibration_error", "brier_score"):
            assert values[name] is None
            assert notes[name] == NOT_AVAILABLE
        assert values["accuracy"] == pytest.approx(triage_metrics(RECORDS)[stratum]["metrics"]["accuracy"])
        assert set(notes) == {"consistency_rate", "expected_calibration_error", "brier_score"}
    json.dumps(result, allow_nan=False)


def test_triage_metrics_of_evaluate_triage_records(triage_backend: Callable[..., Any]) -> None:
    records = evaluate_triage(CASES, ED_NURSE, Runner(triage_backend(), NullCache()), run_id="r", model="m")
    result = triage_metrics(records)
    assert result["all"]["n"] == 5
    assert result["emergency"]["metrics"]["accuracy"] == pytest.approx(1 / 2)
    assert result["emergency"]["metrics"]["consistency_rate"] == pytest.approx(50.0)
    assert result["primary_care"]["metrics"]["parse_rate"] == pytest.approx(1 / 3)


# --- a default budget fitted to the context ------------------------------------------------------------

def _fitting_backend(make_backend: Any, context: int) -> Any:
    """A scripted backend with a context window and one token per word of the rendered prompt, which
    records the budget of every generate call."""
    class Fitting(make_backend):  # type: ignore[misc, valid-type]
        budgets: list[tuple[int, int]]

        def context_length(self) -> int:
            return context

        def count_prompt_tokens(self, requests: Sequence[Any]) -> list[int]:
            return [len(self.render_prompt(r).split()) for r in requests]

        def generate(self, requests: Sequence[Any], config: Any, scoring: Any) -> list[Generation]:
            self.budgets.append((config.max_new_tokens, len(requests)))
            return list(super().generate(requests, config, scoring))

    backend = Fitting(_reply, answer_logprobs=_answer_logprobs, prompt_logprobs=_prompt_logprobs, batch_size=8)
    backend.budgets = []
    return backend


def test_a_default_budget_is_fitted_per_case_to_what_the_context_leaves(make_backend: Any) -> None:
    counts = [len(_fitting_backend(make_backend, 0).render_prompt(render_case(case.text, ED_NURSE, SystemPolicy()))
                  .split()) for case in CASES]
    context = max(counts) + 20
    backend = _fitting_backend(make_backend, context)
    settings = TriageSettings(budget_floor=8, generation=GenerationConfig(max_new_tokens=1024))
    records = evaluate_triage(CASES, ED_NURSE, Runner(backend, NullCache()), run_id="r", model="tiny",
                              settings=settings)
    assert [r["max_new_tokens"] for r in records] == [context - count for count in counts]
    assert sorted(budget for budget, _ in backend.budgets) == sorted(set(context - count for count in counts))
    assert sum(n for _, n in backend.budgets) == len(CASES)
    # The same budget given by the user is kept for every case: no prompt leaves 1024 tokens free.
    with pytest.raises(DataError, match="lower --pe-max-new-tokens"):
        evaluate_triage(CASES, ED_NURSE, Runner(_fitting_backend(make_backend, context), NullCache()), run_id="r",
                        model="tiny", settings=replace(settings, budget_floor=None))


def test_a_prompt_that_leaves_less_than_the_floor_is_too_long(make_backend: Any) -> None:
    counts = [len(_fitting_backend(make_backend, 0).render_prompt(render_case(case.text, ED_NURSE, SystemPolicy()))
                  .split()) for case in CASES]
    backend = _fitting_backend(make_backend, min(counts) + 8)
    settings = TriageSettings(budget_floor=8, too_long="record",
                              generation=GenerationConfig(max_new_tokens=1024))
    records = evaluate_triage(CASES, ED_NURSE, Runner(backend, NullCache()), run_id="r", model="tiny",
                              settings=settings)
    fitted = [r for r in records if r["finish_reason"] != "too_long"]
    assert [r["max_new_tokens"] for r in fitted] == [8] * len(fitted) and len(fitted) >= 1
    assert all(r["max_new_tokens"] is None for r in records if r["finish_reason"] == "too_long")
