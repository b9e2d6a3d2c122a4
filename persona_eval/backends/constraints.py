"""Constrained decoding for judge rankings: only text that can still become ``{"ranking": [...]}``.

A transformers model asked for a ranking of k responses may only write the canonical JSON object
``{"ranking": [p1, p2, ..., pk]}`` (``json.dumps`` spacing) where p1..pk is a permutation of 1..k, and
then end. The processor walks a small automaton over characters; its state is where the text stands
in that object plus the set of numbers already used. At each step a token is allowed when appending
its decoded text keeps the whole reply a prefix of some valid object; the end-of-sequence token is
allowed only once the object is complete (and then nothing else is).

Tokens are handled by their decoded strings: each vocabulary entry is decoded once after an anchor
token (so SentencePiece-style leading spaces survive), and only entries made of characters that can
occur in a ranking are ever considered. The allowed token ids of a state are computed the first time
the state is reached and kept for the tokenizer, so later calls are table look-ups. k is at most 9,
so every number is one character.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "MAX_RANKING_SIZE",
    "RankingConstraint",
    "RankingLogitsProcessor",
    "canonical_ranking",
    "ranking_constraint",
]

MAX_RANKING_SIZE = 9
_HEAD = '{"ranking": ['
_SEPARATOR = ", "
_TAIL = "]}"
_DIGITS = "123456789"
_ALPHABET = frozenset(_HEAD + _SEPARATOR + _TAIL + _DIGITS)

# A state: (phase, offset into the phase's literal, numbers used so far).
# phases: "head" (inside _HEAD), "number" (a number comes next), "separator" (inside _SEPARATOR),
# "tail" (inside _TAIL), "done" (the object is complete).
State = tuple[str, int, frozenset[int]]
_START: State = ("head", 0, frozenset())


def canonical_ranking(ranking: Sequence[int]) -> str:
    """The text the constrained decoder produces for `ranking`.

    >>> canonical_ranking([2, 1, 3])
    '{"ranking": [2, 1, 3]}'
    """
    return _HEAD + _SEPARATOR.join(str(p) for p in ranking) + _TAIL


# The phases that spell out a fixed text, and the phase after each.
_LITERALS: dict[str, tuple[str, str]] = {"head": (_HEAD, "number"), "separator": (_SEPARATOR, "number"),
                                         "tail": (_TAIL, "done")}


def _advance(state: State, text: str, k: int) -> State | None:
    """The state after `text`, or None when `text` leaves the language."""
    phase, offset, used = state
    for char in text:
        if phase == "number":
            if not char.isdigit() or not 1 <= int(char) <= k or int(char) in used:
                return None
            used = used | {int(char)}
            phase, offset = ("tail", 0) if len(used) == k else ("separator", 0)
        elif phase in _LITERALS:
            literal, after = _LITERALS[phase]
            if char != literal[offset]:
                return None
            offset += 1
            if offset == len(literal):
                phase, offset = after, 0
        else:  # "done": nothing may follow the closing brace
            return None
    return (phase, offset, used)


def _token_texts(tokenizer: Any) -> list[tuple[int, str]]:
    """(token id, decoded text) of every vocabulary entry that could take part in a ranking."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    anchor_ids = tokenizer.encode("a", add_special_tokens=False)
    anchor = tokenizer.decode(anchor_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    size = len(tokenizer)
    decoded = tokenizer.batch_decode([[*anchor_ids, token] for token in range(size)], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
    texts = []
    for token, text in enumerate(decoded):
        if token in special or not text.startswith(anchor):
            continue
        piece = text[len(anchor):]
        if piece and set(piece) <= _ALPHABET:
            texts.append((token, piece))
    return texts


class RankingConstraint:
    """The per-state allowed tokens of one tokenizer and one ranking size k (built lazily, shared)."""

    def __init__(self, tokenizer: Any, k: int, *, eos_token_ids: Iterable[int],
                 candidates: list[tuple[int, str]] | None = None) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_RANKING_SIZE:
            raise ValueError(f"k must be an integer from 1 to {MAX_RANKING_SIZE}, got {k!r}")
        self.k = k
        self.eos_token_ids = sorted({int(t) for t in eos_token_ids if t is not None})
        if not self.eos_token_ids:
            raise ValueError("eos_token_ids must name at least one end-of-sequence token")
        self._candidates = candidates if candidates is not None else _token_texts(tokenizer)
        self._texts = dict(self._candidates)
        self._allowed: dict[State, list[int]] = {}
        self._lock = threading.Lock()

    def allowed(self, state: State) -> list[int]:
        """The token ids allowed in `state`: tokens that keep the text a valid prefix, or the
        end-of-sequence tokens once the object is complete."""
        found = self._allowed.get(state)
        if found is None:
            if state[0] == "done":
                found = list(self.eos_token_ids)
            else:
                found = [token for token, text in self._candidates if _advance(state, text, self.k) is not None]
            with self._lock:
                self._allowed[state] = found
        return found

    def state_after(self, token_ids: Sequence[int]) -> State | None:
        """The state after generating `token_ids`; None if they leave the language (or contain a token
        that is never allowed)."""
        state: State | None = _START
        for token in token_ids:
            text = self._texts.get(int(token))
            if text is None or state is None:
                return None
            state = _advance(state, text, self.k)
        return state

    def processor(self, prompt_length: int) -> RankingLogitsProcessor:
        return RankingLogitsProcessor(self, prompt_length)


class RankingLogitsProcessor:
    """A transformers LogitsProcessor: ``processor(input_ids, scores) -> scores`` with every token that
    would leave the ranking language set to -inf. ``prompt_length`` is the (left-padded) prompt width,
    so ``input_ids[:, prompt_length:]`` are the generated tokens."""

    def __init__(self, constraint: RankingConstraint, prompt_length: int) -> None:
        self.constraint = constraint
        self.prompt_length = prompt_length

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        eos = set(self.constraint.eos_token_ids)
        masked = torch.full_like(scores, float("-inf"))
        for row, ids in enumerate(input_ids[:, self.prompt_length:].tolist()):
            if any(token in eos for token in ids):
                # A finished row: generate() pads it whatever is chosen; keep the scores finite.
                masked[row] = scores[row]
                continue
            state = self.constraint.state_after(ids)
            allowed = self.constraint.allowed(state) if state is not None else []
            if not allowed:  # cannot happen for a valid prefix; end the row rather than emit garbage
                allowed = self.constraint.eos_token_ids
            index = torch.tensor([t for t in allowed if t < scores.shape[-1]], dtype=torch.long,
                                 device=scores.device)
            masked[row, index] = scores[row, index]
        return masked


_SHARED: weakref.WeakKeyDictionary[Any, dict[tuple[int, tuple[int, ...]], RankingConstraint]] = (
    weakref.WeakKeyDictionary())
_SHARED_LOCK = threading.Lock()


def ranking_constraint(tokenizer: Any, k: int, *, eos_token_ids: Iterable[int]) -> RankingConstraint:
    """The RankingConstraint of (tokenizer, k, eos ids), built once per tokenizer object: its tables
    are derived data, so every generate call on the same tokenizer reuses them."""
    eos = tuple(sorted({int(t) for t in eos_token_ids if t is not None}))
    with _SHARED_LOCK:
        try:
            tables = _SHARED.setdefault(tokenizer, {})
        except TypeError:  # a tokenizer that cannot be weakly referenced: no sharing
            return RankingConstraint(tokenizer, k, eos_token_ids=eos)
        constraint = tables.get((k, eos))
        if constraint is None:
            candidates = next(iter(tables.values()))._candidates if tables else None
            constraint = RankingConstraint(tokenizer, k, eos_token_ids=eos, candidates=candidates)
            tables[(k, eos)] = constraint
    return constraint
