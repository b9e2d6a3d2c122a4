"""Answers out of generated text: the reasoning trace and the final response, the model's final lettered
choice and where that letter sits."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from persona_eval.errors import ConfigError, DataError

__all__ = ["TRIAGE_LABELS", "AnswerSpan", "find_triage_answer", "parse_triage_label", "split_reasoning"]

# The triage options, in the order the prompt lists them (kept equal to persona_eval.tasks.triage.LABELS
# by a test; not imported, so that task modules stay free to import the parser).
TRIAGE_LABELS: tuple[str, ...] = ("A", "B", "C")


@dataclass(frozen=True)
class AnswerSpan:
    """The final answer of a generation: its label and the character span of the answer letter.

    ``start`` and ``end`` index the original text, so ``text[start:end]`` is the one letter the model
    wrote (perhaps lower-case) and the caller can find the generated token that holds it.
    """

    label: str
    start: int
    end: int


# --- Where the final response starts -----------------------------------------------------------------
# Reasoning models think first and answer after; letters inside the thinking are drafts, not answers.
_THINK_OPEN = re.compile(r"<(?:think|thinking|reasoning)>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</(?:think|thinking|reasoning)>", re.IGNORECASE)
# "## Thinking ... ## Final Response ..." (HuatuoGPT-o1 style). The final-response heading may carry the
# answer on its own line; the thinking heading must be a line of its own so prose starting "Thinking
# about it, ..." is not mistaken for one.
_FINAL_RESPONSE = re.compile(
    r"^[ \t]*(?:#{1,6}[ \t]*)?[*_]*final[ \t]+response[*_]*[ \t]*:?[*_]*", re.IGNORECASE | re.MULTILINE)
_THINKING_HEADING = re.compile(
    r"^[ \t]*(?:#{1,6}[ \t]*)?[*_]*thinking[*_]*[ \t]*:?[*_]*[ \t]*$", re.IGNORECASE | re.MULTILINE)

# Emphasis and code marks never change which option was chosen ("**C**", "*Answer: B*", "__A__",
# "`C`"); they are dropped before matching, and a position map leads back to the original text.
_DECORATION = frozenset("*_`")

# One-letter English words. A label spelled like one is read as a label only when what follows could
# not continue an English phrase: "Answer: A." and "Answer: A because ..." are answers, "The answer is
# a stroke" and "A patient with chest pain ..." are not.
_ONE_LETTER_WORDS = frozenset({"A", "I"})
_PHRASE_CONTINUES = re.compile(r"[ \t]+(?!(?:because|since|as|given|due)\b)[a-z0-9]")


def _split_point(text: str) -> tuple[int, int | None]:
    """(where the reasoning ends, where the final response begins) in ``text``: (0, 0) when it holds no
    reasoning marker, (len(text), None) when the model never finished thinking."""
    end = start = 0
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        end, start = closes[-1].start(), closes[-1].end()
    rest = text[start:]
    if _THINK_OPEN.search(rest):
        return len(text), None
    headings = list(_FINAL_RESPONSE.finditer(rest))
    if headings:
        return start + headings[-1].start(), start + headings[-1].end()
    if _THINKING_HEADING.search(rest):
        return len(text), None
    return end, start


def _final_part(text: str) -> int | None:
    """Where the final response begins in ``text``, or None when the model never finished thinking."""
    return _split_point(text)[1]


def split_reasoning(text: str) -> tuple[str | None, str]:
    """The reasoning trace and the final response of a generated reply: ``(trace, final_response)``.

    The same reading as :func:`find_triage_answer`: a trace is what stands in ``<think>...</think>``
    (also ``<thinking>``, ``<reasoning>``, or only the closing tag, when the chat template opened it) or
    before a "Final Response" heading ("## Thinking ... ## Final Response ...", HuatuoGPT-o1 style). The
    trace comes without its tags and headings and both parts without surrounding whitespace; the trace
    is None when nothing stands before the final response. A reply whose reasoning never finished (cut
    at the token budget) has an empty final response. A reply with no reasoning marker is returned as it
    is: ``(None, text)``.

    >>> split_reasoning("<think>Sudden weakness: a stroke until shown otherwise.</think>\\n\\nAnswer: C")
    ('Sudden weakness: a stroke until shown otherwise.', 'Answer: C')
    >>> split_reasoning("## Thinking\\nMild and improving.\\n\\n## Final Response\\nA. Stay home.")
    ('Mild and improving.', 'A. Stay home.')
    >>> split_reasoning("<think>Chest pain, sweating, and")
    ('Chest pain, sweating, and', '')
    >>> split_reasoning("Answer: B")
    (None, 'Answer: B')
    """
    if not isinstance(text, str):
        raise DataError(f"text: expected the generated text as a str, got {type(text).__name__}")
    end, start = _split_point(text)
    if start == 0:
        return None, text
    trace = _THINKING_HEADING.sub("", _THINK_CLOSE.sub("", _THINK_OPEN.sub("", text[:end]))).strip()
    final = "" if start is None else text[start:].strip()
    return trace or None, final


def _undecorated(text: str, start: int) -> tuple[str, list[int]]:
    """``text[start:]`` without decoration marks, and the original index of each character kept."""
    origin = [index for index in range(start, len(text)) if text[index] not in _DECORATION]
    return "".join(text[index] for index in origin), origin


# --- The rules ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Rule:
    """One way of stating an answer. Among its patterns' matches the one whose letter comes last counts.

    ``unless_options_listed``: the rule does not apply to a response that lists the options itself.
    """

    name: str
    patterns: tuple[re.Pattern[str], ...]
    unless_options_listed: bool = False


@dataclass(frozen=True)
class _Grammar:
    """The compiled rules for one label set, in the order they are tried."""

    rules: tuple[_Rule, ...]
    hedge_after: re.Pattern[str]
    option_line: re.Pattern[str]


# Pieces shared by the rules; {L} becomes the label character class.
# The letter itself: not inside a word ("Chest", "B12", "I'm").
_LETTER = r"(?<!\w)(?P<label>{L})(?!\w|['’]\w)"
# An opening bracket or quote before the letter: "(C)", "'C'", "\boxed{C}".
_OPEN = r"(?:[(\[{\"'“‘][ \t]*)?"
# Words that may stand between a marker and its letter. "either" and "between" announce a hedge.
_FILLER = (r"(?:(?P<hedge>either|between)\b[ \t]*"
           r"|(?:probably|most[ \t]+likely|likely|definitely|clearly|therefore|option|choice|letter"
           r"|level|category)\b[ \t]*:?[ \t]*)*")
_SEPARATOR = (r"(?:[ \t]*[:=\-–—]|\s+(?:is|would[ \t]+be|will[ \t]+be|should[ \t]+be)\b[ \t]*:?|[ \t]*\n)"
              r"\s*")

# 1. An explicit final-answer marker, as the prompt asks for: "Answer: C", "Final answer: B", "The
#    answer is (C)", "Triage level: C", a heading "## Final Answer" over the letter, "\boxed{C}".
_ANSWER_MARKER = (r"(?<!\w)(?:(?:final\s+)?answer|triage(?:\s+(?:level|category|decision))?"
                  r"|final\s+(?:choice|decision))" + _SEPARATOR)
_BOXED = r"\\boxed\s*\{\s*(?:\\text(?:bf|rm)?\s*\{\s*)?"
_EXPLICIT = f"(?:{_ANSWER_MARKER}|{_BOXED}){_FILLER}{_OPEN}{_LETTER}"

# 2. A first-person choice or a named best option: "I would choose B", "I'd go with option C", "My
#    recommendation: B", "The most appropriate option is C", "Option C is the best choice". Negated
#    forms ("I would not choose A", "Option A is not ...") do not match.
_CHOICE_VERB = (r"(?<!\w)(?:I|we)(?:['’]d|['’]ll|\s+would|\s+will|\s+should)?\s+"
                r"(?:choose|select|pick|go\s+with|opt\s+for|recommend)\s+")
_CHOICE_NOUN = (r"(?<!\w)(?:(?:best|correct|right|safest|most\s+appropriate|appropriate|recommended)"
                r"\s+(?:option|choice|level\s+of\s+care)|(?:my\s+)?(?:choice|recommendation|selection))"
                r"(?:[ \t]*[:\-–—]|\s+(?:is|would\s+be)\b)\s*")
_CHOICE = f"(?:{_CHOICE_VERB}|{_CHOICE_NOUN}){_FILLER}{_OPEN}{_LETTER}"
_NAMED_BEST = (rf"(?<!\w)option\s+{_OPEN}{_LETTER}[)\]]?\s+is\s+(?:the\s+)?"
               r"(?:best|correct|right|safest|most\s+appropriate|appropriate|recommended)\b")

# 3. A letter alone on the last line: "C", "**C**", "(C).", "Option C", "### C".
_LONE_LINE = (rf"(?:\A|\n)[ \t]*(?:#{{1,6}}[ \t]*)?(?:>[ \t]*)?(?:option[ \t]+)?{_OPEN}{_LETTER}"
              r"[)\]}\"'’”]?[ \t]*[.!]?\s*\Z")

# 4. A letter opening the response, set off from what follows: "C. Go to emergency care now ...",
#    "B - Book a routine appointment", "c)", "C, not B", "Option C:". "A patient ..." has no
#    delimiter, and "A-fib" / "C.difficile" have none followed by a space.
_LEADING = (rf"\A\s*(?:#{{1,6}}[ \t]*)?(?:option[ \t]+)?{_OPEN}{_LETTER}"
            r"(?:[)\]]|(?=[ \t]*(?:$|[.:,;](?:\s|$)|[\-–—]\s)))")

# A response that lists two or more options line by line ("A. Stay home ...", "B. Book ...") is
# echoing the prompt: its first letter is the start of the list, not a choice.
_OPTION_LINE = (rf"^[ \t]*(?:[-+>][ \t]*)?(?:option[ \t]+)?[(\[]?{_LETTER}"
                r"(?:[.):\]]|[ \t]+[\-–—])[ \t]+\S")

# A second option joined to the chosen one is a hedge: "A or B", "B/C", "B-C", "A, B", "B (or C)".
# "C, not B" and "C rather than B" are not.
_HEDGE_AFTER = (rf"[)\]}}\"'’”]*[ \t]*\(?[ \t]*(?:(?:or|and|to|vs\.?|versus|/|&|,|[\-–—])[ \t]*)+"
                rf"(?:option[ \t]+)?[(\[]?{_LETTER}")


@lru_cache(maxsize=16)
def _grammar(labels: tuple[str, ...]) -> _Grammar:
    letter_class = "[" + "".join(re.escape(label) for label in labels) + "]"

    def compile_(template: str) -> re.Pattern[str]:
        return re.compile(template.replace("{L}", letter_class), re.IGNORECASE | re.MULTILINE)

    rules = (
        _Rule("explicit_marker", (compile_(_EXPLICIT),)),
        _Rule("choice_statement", (compile_(_CHOICE), compile_(_NAMED_BEST))),
        _Rule("lone_final_line", (compile_(_LONE_LINE),)),
        _Rule("leading_letter", (compile_(_LEADING),), unless_options_listed=True),
    )
    return _Grammar(rules=rules, hedge_after=compile_(_HEDGE_AFTER), option_line=compile_(_OPTION_LINE))


def _checked_labels(labels: Sequence[str]) -> tuple[str, ...]:
    checked = tuple(labels)
    if not checked:
        raise ConfigError("labels: expected at least one option label, got none")
    for label in checked:
        if not (isinstance(label, str) and len(label) == 1 and label.isalnum() and label == label.upper()):
            raise ConfigError(f"labels: each label must be one upper-case letter or digit, got {label!r}")
    if len(set(checked)) != len(checked):
        raise ConfigError(f"labels: each label must appear once, got {checked!r}")
    return checked


def _used_as_word(response: str, match: re.Match[str]) -> bool:
    return (match.group("label").upper() in _ONE_LETTER_WORDS
            and _PHRASE_CONTINUES.match(response, match.end("label")) is not None)


def _last_match(rule: _Rule, response: str) -> re.Match[str] | None:
    found = [match for pattern in rule.patterns for match in pattern.finditer(response)
             if not _used_as_word(response, match)]
    return max(found, key=lambda match: match.start("label"), default=None)


def _is_hedged(grammar: _Grammar, response: str, match: re.Match[str]) -> bool:
    if match.groupdict().get("hedge"):
        return True
    other = grammar.hedge_after.match(response, match.end("label"))
    return (other is not None and not _used_as_word(response, other)
            and other.group("label").upper() != match.group("label").upper())


def _lists_options(grammar: _Grammar, response: str) -> bool:
    return len({match.group("label").upper() for match in grammar.option_line.finditer(response)}) >= 2


def _find_answer(text: str, labels: Sequence[str]) -> AnswerSpan | None:
    if not isinstance(text, str):
        raise DataError(f"text: expected the generated text as a str, got {type(text).__name__}")
    grammar = _grammar(_checked_labels(labels))
    start = _final_part(text)
    if start is None:
        return None
    response, origin = _undecorated(text, start)
    for rule in grammar.rules:
        match = _last_match(rule, response)
        if match is None or (rule.unless_options_listed and _lists_options(grammar, response)):
            continue
        # The first rule that finds an answer decides; a hedged answer there means no clear choice,
        # and a weaker rule must not overrule it.
        if _is_hedged(grammar, response, match):
            return None
        letter_at = origin[match.start("label")]
        return AnswerSpan(label=match.group("label").upper(), start=letter_at, end=letter_at + 1)
    return None


def find_triage_answer(text: str, *, labels: Sequence[str] = TRIAGE_LABELS) -> AnswerSpan | None:
    """The final answer in a generated reply to a multiple-choice prompt, with the answer letter's span.

    Only the final response counts: text inside ``<think>...</think>`` or before a "Final Response"
    heading is reasoning, and a reply whose reasoning never closes has no answer. Markdown emphasis is
    ignored. The rules, tried in order; the first that finds a letter decides:

    1. an explicit marker ("Answer:", "Final answer", "The answer is", "Triage level", ``\\boxed{}``):
       the last one wins;
    2. a stated choice ("I would choose B", "The most appropriate option is C"): the last one wins;
    3. a letter alone on the last line ("C", "**C**", "Option C");
    4. a letter opening the reply and set off by punctuation ("C. Go to emergency care now ..."),
       unless the reply lists the options itself.

    A letter joined to another option ("A or B", "either B or C", "B/C") is a hedge and gives None, as
    does a reply that names options only in passing. The English word "a" is never an answer. None is
    preferred to a guess.

    Parameters
    ----------
    text : the generated text.
    labels : keyword-only; the option letters, upper-case (default ``("A", "B", "C")``).

    Returns
    -------
    AnswerSpan | None : the label (upper-case) and ``start``/``end`` in ``text`` of the letter as
    written, or None when there is no clear final answer.

    >>> reply = "<think>Maybe A.</think>Final answer: **B**, a routine visit suffices."
    >>> span = find_triage_answer(reply)
    >>> span.label, reply[span.start:span.end]
    ('B', 'B')
    >>> find_triage_answer("Either B or C could be right.") is None
    True
    """
    return _find_answer(text, labels)


def parse_triage_label(text: str, *, labels: Sequence[str] = TRIAGE_LABELS) -> str | None:
    """The final answer's label ("A", "B" or "C") in a generated triage reply, or None.

    The same rules as :func:`find_triage_answer`, which also gives where the letter is.

    >>> parse_triage_label("Answer: C. A stroke must be ruled out.")
    'C'
    >>> parse_triage_label("A patient with chest pain should be seen urgently.") is None
    True
    """
    span = _find_answer(text, labels)
    return None if span is None else span.label
