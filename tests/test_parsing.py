"""Tests of persona_eval.parsing: the triage answer parser, case by case and by property."""

from __future__ import annotations

import doctest
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from persona_eval import parsing
from persona_eval.errors import ConfigError, DataError
from persona_eval.parsing import TRIAGE_LABELS, AnswerSpan, find_triage_answer, parse_triage_label, split_reasoning
from persona_eval.personas import STUDY_PERSONAS
from persona_eval.tasks import triage
from persona_eval.templates import render_case

OPTIONS_ECHO = (
    "A. Stay home and manage with self-care\n"
    "B. Book a routine appointment with a primary care doctor\n"
    "C. Go to emergency care now\n\n"
)

# (reply, expected label or None). Grouped by what they exercise.
CASES = [
    # The format the prompt asks for, and its plain variants.
    ("Answer: C", "C"),
    ("Answer: C. Go to emergency care now", "C"),
    ("Answer: B because the rash has lasted two weeks without fever.", "B"),
    ("answer: c", "C"),
    ("answer: c because of the chest pain", "C"),
    ("ANSWER: A", "A"),
    ("Answer:\n\nC", "C"),
    ("Answer — C", "C"),
    ("Answer: 'C'", "C"),
    ("Answer: [C]", "C"),
    ("Answer: Option B", "B"),
    ("Answer: C - Go to emergency care now", "C"),
    ("Answer: C\n\nExplanation: chest pain with sweating needs an ECG now.", "C"),
    ("Final answer: B", "B"),
    ("The answer is (C)", "C"),
    ("The answer is: C", "C"),
    ("The answer is probably C.", "C"),
    ("The most appropriate answer is B.", "B"),
    ("Triage level: C", "C"),
    ("Triage decision: B", "B"),
    ("Triage: A", "A"),
    ("> Answer: C", "C"),
    # Markdown emphasis and headings.
    ("**C**", "C"),
    ("*Answer: B*", "B"),
    ("__A__", "A"),
    ("**Answer:** C", "C"),
    ("**Answer**: C", "C"),
    ("Final answer: **B**", "B"),
    ("## Final Answer\n\n**C** - Go to emergency care now", "C"),
    ("### Answer\nB", "B"),
    ("### C", "C"),
    ("`C`", "C"),
    # LaTeX boxes.
    ("\\boxed{C}", "C"),
    ("$\\boxed{\\text{C}}$", "C"),
    ("The final choice: $\\boxed{\\textbf{B}}$", "B"),
    # Choices stated without a marker.
    ("Option C", "C"),
    ("I would choose B", "B"),
    ("I'd go with option C because the pain radiates to the arm.", "C"),
    ("I would not choose A; I'd choose C.", "C"),
    ("My recommendation: B", "B"),
    ("The most appropriate option is C, given the low blood pressure.", "C"),
    ("Option C is the most appropriate.", "C"),
    # A lone letter opening the reply, or alone on its last line.
    ("C. Go to emergency care now because the symptoms suggest a stroke.", "C"),
    ("B", "B"),
    ("A", "A"),
    ("(C)", "C"),
    ("c)", "C"),
    ("a) Stay home; rest and fluids are enough.", "A"),
    ("B - Book a routine appointment", "B"),
    ("A. Stay home and manage with self-care.", "A"),
    ("C\nBecause crushing chest pain needs an ECG within minutes.", "C"),
    ("The patient should be seen in an emergency department.\nC", "C"),
    ("The patient should be seen in an emergency department.\n\n**C**\n", "C"),
    ("C, not B", "C"),
    # A model that lists the options first, then chooses.
    (OPTIONS_ECHO + "Answer: C", "C"),
    (OPTIONS_ECHO + "I would choose B.", "B"),
    (OPTIONS_ECHO + "C", "C"),
    (OPTIONS_ECHO + "The patient needs to be seen soon.", None),
    (render_case("A 30-year-old with a mild sore throat for two days.", STUDY_PERSONAS[0], template="answer-first")
     .messages[-1][1], None),
    # Reasoning traces: only the final part counts.
    ("<think>maybe A</think>Final answer: **B**", "B"),
    ("<think>A or B? Not C.</think>\nAnswer: C", "C"),
    ("</think>Answer: B", "B"),
    ("<think>The answer is C", None),
    ("<think>The answer is C</think>", None),
    ("<think>first pass</think>Answer: A<think>second thoughts", None),
    ("## Thinking\nThe pain is mild, so A.\n## Final Response\nAnswer: B", "B"),
    ("## Thinking\nhmm\n\n## Final Response\n\nC. Go to emergency care now", "C"),
    ("## Thinking\nThe answer is C.", None),
    ("**Final Response:** Answer: B", "B"),
    ("Thinking about it, the answer is C.", "C"),
    # Refusals and empty replies.
    ("I can't provide medical advice; please consult a doctor.", None),
    ("I recommend a routine appointment.", None),
    ("", None),
    ("   \n\t", None),
    # Hedges between options.
    ("A or B", None),
    ("either B or C", None),
    ("The answer is either B or C.", None),
    ("between A and B, probably", None),
    ("B/C", None),
    ("Answer: B/C", None),
    ("Answer: B-C", None),
    ("Answer: B or C", None),
    ("Answer: B (or C if it gets worse)", None),
    ("Answer: A, B or C", None),
    ("A, B, or C are all possible here.", None),
    ("Answer: C\nFinal answer: B or C", None),
    # Options named in the reasoning or rejected never win.
    ("Not A, because the pain is severe; the answer is C.", "C"),
    ("I considered B but the answer is C", "C"),
    ("It is not A.", None),
    ("The answer is not A.", None),
    ("Answer: not A", None),
    ("Option A is not appropriate here.", None),
    ("The symptoms point towards C.", None),
    ("Answer: C\n\nA or B would delay care.", "C"),
    ("Answer: B - A routine visit is enough.", "B"),
    # The last explicit marker wins.
    ("Answer: C\nFinal answer: B", "B"),
    ("Final answer: A\n\nOn reflection, the answer is C.", "C"),
    ("Answer: C. I would choose B if the pain were milder.", "C"),
    # The article "a" (and "I") are words, not labels.
    ("A patient with chest pain should be seen urgently.", None),
    ("Answer: C. A stroke must be ruled out.", "C"),
    ("The answer is a difficult one.", None),
    ("Answer: A 45-year-old needs an ECG.", None),
    ("Answer: I think it is serious.", None),
    ("A-fib with a rapid rate is dangerous.", None),
    ("C.difficile is possible; see a doctor.", None),
    # Letters outside the label set.
    ("Answer: D", None),
]


@pytest.mark.parametrize(("reply", "expected"), CASES)
def test_parse_triage_label(reply: str, expected: str | None) -> None:
    assert parse_triage_label(reply) == expected
    span = find_triage_answer(reply)
    if expected is None:
        assert span is None
    else:
        assert span is not None and span.label == expected
        assert span.end == span.start + 1
        assert reply[span.start:span.end].upper() == span.label


def test_case_table_is_large_and_unique() -> None:
    replies = [reply for reply, _ in CASES]
    assert len(replies) >= 60
    assert len(set(replies)) == len(replies)


@pytest.mark.parametrize(("reply", "letter_at"), [
    ("<think>maybe A</think>Final answer: **B**", 38),
    ("## Thinking\nThe pain is mild, so A.\n## Final Response\nAnswer: B", 62),
    ("Answer: C. A stroke must be ruled out.", 8),
    ("Answer: c", 8),
    ("__A__", 2),
    (OPTIONS_ECHO + "C", len(OPTIONS_ECHO)),
    ("Answer: C\nFinal answer: B", 24),
])
def test_span_points_at_the_final_answer_letter(reply: str, letter_at: int) -> None:
    span = find_triage_answer(reply)
    assert span is not None
    assert (span.start, span.end) == (letter_at, letter_at + 1)


def test_answer_span_is_frozen() -> None:
    span = AnswerSpan(label="C", start=8, end=9)
    with pytest.raises(AttributeError):
        span.label = "A"  # type: ignore[misc]


def test_default_labels_are_the_triage_task_labels() -> None:
    assert TRIAGE_LABELS == triage.LABELS


@pytest.mark.parametrize(("reply", "labels", "expected"), [
    ("Answer: D", ("A", "B", "C", "D"), "D"),
    ("Answer: C", ("A", "B"), None),
    ("Answer: I", tuple("ABCDEFGHI"), "I"),
    ("Answer: I think it is serious.", tuple("ABCDEFGHI"), None),
    ("I'm not sure; maybe E.", tuple("ABCDEFGHI"), None),
    ("The answer is 2", ("1", "2", "3"), "2"),
])
def test_labels_are_a_parameter(reply: str, labels: tuple[str, ...], expected: str | None) -> None:
    assert parse_triage_label(reply, labels=labels) == expected


@pytest.mark.parametrize("labels", [(), ("A", "A"), ("a", "b"), ("AB", "C"), ("A", "?")])
def test_bad_labels_are_a_config_error(labels: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError, match="labels"):
        parse_triage_label("Answer: A", labels=labels)


def test_text_that_is_not_a_string_is_a_data_error() -> None:
    with pytest.raises(DataError, match="text"):
        parse_triage_label(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", [" " * 50_000, "\n" * 50_000, "Answer: " * 6_000, "A, " * 15_000,
                                  "the answer is probably " * 2_000 + "C"])
def test_long_degenerate_text_parses_in_linear_time(text: str) -> None:
    # A regex that backtracks over runs of whitespace takes minutes here, not milliseconds.
    began = time.perf_counter()
    find_triage_answer(text)
    assert time.perf_counter() - began < 5.0


# --- The reasoning trace and the final response ------------------------------------------------------
@pytest.mark.parametrize(("reply", "expected"), [
    # Tag style, as a server with a reasoning parser returns it (persona_eval.backends.openai_payload).
    ("<think>Chest pain and sweating.</think>\n\nAnswer: C", ("Chest pain and sweating.", "Answer: C")),
    ("<thinking>\nMild.\n</thinking>A", ("Mild.", "A")),
    ("<REASONING>x</REASONING> B", ("x", "B")),
    # Only the closing tag: the chat template opened the trace in the prompt.
    ("Weakness on one side.</think>\nC", ("Weakness on one side.", "C")),
    ("</think>C", (None, "C")),
    # Heading style (HuatuoGPT-o1), with and without the thinking heading.
    ("## Thinking\nMild and improving.\n\n## Final Response\nA. Stay home.", ("Mild and improving.", "A. Stay home.")),
    ("**Thinking:**\nFever for 2 days.\n**Final Response:** B", ("Fever for 2 days.", "B")),
    ("The findings weigh towards care.\n\n## Final Response\nC.", ("The findings weigh towards care.", "C.")),
    ("## Final Response\nC", (None, "C")),
    # Unfinished: cut at the token budget inside the trace.
    ("<think>Chest pain, sweating, and", ("Chest pain, sweating, and", "")),
    ("## Thinking\nThe patient has", ("The patient has", "")),
    ("<think>Done.</think>Answer: <think>again", ("Done.Answer: again", "")),
    ("<think></think>", (None, "")),
    # No trace: the text as it is.
    ("Answer: B", (None, "Answer: B")),
    ("  Thinking about it, C.  ", (None, "  Thinking about it, C.  ")),
    ("", (None, "")),
])
def test_split_reasoning(reply: str, expected: tuple[str | None, str]) -> None:
    assert split_reasoning(reply) == expected


def test_split_reasoning_of_text_that_is_not_a_string_is_a_data_error() -> None:
    with pytest.raises(DataError, match="text"):
        split_reasoning(None)  # type: ignore[arg-type]


def test_docstring_examples() -> None:
    result = doctest.testmod(parsing)
    assert result.attempted > 0 and result.failed == 0


# --- Properties --------------------------------------------------------------------------------------
def _check_span(text: str, span: AnswerSpan | None, labels: tuple[str, ...] = TRIAGE_LABELS) -> None:
    if span is not None:
        assert span.label in labels
        assert 0 <= span.start < span.end <= len(text)
        assert text[span.start:span.end].upper() == span.label


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400))
def test_arbitrary_text_never_raises_and_spans_lie_inside(text: str) -> None:
    span = find_triage_answer(text)
    _check_span(text, span)
    assert parse_triage_label(text) == (None if span is None else span.label)


# Reasoning words that contain no answer marker, but do name options in passing, hedge and negate.
REASONING_WORDS = st.sampled_from([
    "the", "patient", "has", "chest", "pain", "fever", "mild", "severe", "not", "or", "either",
    "between", "maybe", "because", "I", "considered", "would", "a", "stroke", "rule", "out", "option",
    "A", "B", "C", "A.", "B,", "(C)", "**B**", "A/B", "\n", "-", ";", "?", "B or C", "not A",
])
ANSWER_TAILS = st.sampled_from([
    "", ".", " because the pain is severe.", ". A stroke must be ruled out.", " - Go to emergency care now",
    "\n\nThe symptoms are mild.",
])


@settings(max_examples=200, deadline=None)
@given(reasoning=st.lists(REASONING_WORDS, max_size=40), label=st.sampled_from(TRIAGE_LABELS),
       bold=st.booleans(), tail=ANSWER_TAILS)
def test_answer_after_unmarked_reasoning_wins(reasoning: list[str], label: str, bold: bool,
                                              tail: str) -> None:
    answer = f"**Answer: {label}**" if bold else f"Answer: {label}"
    before = " ".join(reasoning) + "\n"
    text = before + answer + tail
    span = find_triage_answer(text)
    assert span is not None and span.label == label
    assert span.start == len(before) + answer.rindex(label)


# Fragments of realistic replies, mixed in any order.
FRAGMENTS = st.sampled_from([
    "Answer: C", "answer: b", "Final answer: **A**", "The answer is (B)", "Triage level: C", "\\boxed{A}",
    "I would choose B", "Option C", "A or B", "either B or C", "not A", "A patient", "C.", "B", "\n",
    " ", "## Final Response\n", "## Thinking\n", "<think>", "</think>", "**", "_", "A. Stay home",
    "B - Book a routine appointment", "C. Go to emergency care now", "because", ",", "B/C", "I",
])


@settings(max_examples=200, deadline=None)
@given(st.lists(FRAGMENTS, max_size=20))
def test_mixed_fragments_give_a_consistent_span(fragments: list[str]) -> None:
    text = "".join(fragments)
    _check_span(text, find_triage_answer(text))


@settings(max_examples=150, deadline=None)
@given(thoughts=st.text(max_size=200), fragments=st.lists(FRAGMENTS, max_size=12))
def test_closed_thinking_before_a_reply_changes_nothing(thoughts: str, fragments: list[str]) -> None:
    reply = "".join(fragment for fragment in fragments if "think" not in fragment.lower())
    prefix = f"<think>{thoughts.replace('<', ' ')}</think>"
    plain, with_thinking = find_triage_answer(reply), find_triage_answer(prefix + reply)
    if plain is None:
        assert with_thinking is None
    else:
        assert with_thinking == AnswerSpan(plain.label, plain.start + len(prefix), plain.end + len(prefix))


# Text with no reasoning marker in it: no "<", "#", "think" or "final response" can be formed.
PLAIN_TEXT = st.text(alphabet="abcABC .,:;-\n", max_size=120)


def _with_trace(trace: str, answer: str, style: str) -> str:
    if style == "tags":
        return f"<think>{trace}</think>\n\n{answer}"
    if style == "closing tag":
        return f"{trace}</think>{answer}"
    return f"## Thinking\n{trace}\n\n## Final Response\n{answer}"


@settings(max_examples=200, deadline=None)
@given(trace=PLAIN_TEXT, answer=PLAIN_TEXT, style=st.sampled_from(["tags", "closing tag", "headings"]))
def test_split_reasoning_gives_back_the_trace_and_the_answer(trace: str, answer: str, style: str) -> None:
    text = _with_trace(trace, answer, style)
    assert split_reasoning(text) == (trace.strip() or None, answer.strip())
    # The answer read from the whole reply is the one read from its final response alone.
    assert parse_triage_label(text) == parse_triage_label(answer)
    # Cut anywhere inside the trace, the reply has no final response and no answer.
    cut = text[:len(text) - len(answer) - len("</think>") - 2] if style == "tags" else None
    if cut is not None:
        assert split_reasoning(cut)[1] == "" and find_triage_answer(cut) is None


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_split_reasoning_never_raises_and_the_final_response_ends_the_text(text: str) -> None:
    trace, final = split_reasoning(text)
    assert trace is None or (trace == trace.strip() and trace)
    assert final == text or text.rstrip().endswith(final)


@settings(max_examples=200, deadline=None)
@given(st.lists(FRAGMENTS, max_size=20))
def test_no_final_response_means_no_answer(fragments: list[str]) -> None:
    text = "".join(fragments)
    trace, final = split_reasoning(text)
    if not final.strip():
        assert find_triage_answer(text) is None
    if trace is None and "think" not in text.lower() and "final response" not in text.lower():
        assert final == text
