"""Prompt length bounds: which rendered prompts fit the model, found before any request is sent; and
the share of records that ended one way (``finish_share``: cut at the token budget, too long to send).

A prompt longer than the model's context is no answer of the model's: a local model fails or reads a
truncated case, a server refuses it, and scored as "unparsable" it would count against the persona. So
every prompt is measured first, and one that does not fit is either an error (the default) or a
per-case result of its own, never a silent model call.

The limit: a prompt fits when its tokens plus ``max_new_tokens`` fit the model's context window (when
it is known: ``backend.context_length()``, else the ``max_model_len`` a server reports in
``backend.identity()``) and its tokens are at most ``max_prompt_tokens`` (when given). With neither
known, every prompt fits.

The measure: first a character pre-check on the messages (no tokenizer, no rendering): a prompt of more
than CHARS_PER_TOKEN_BOUND characters per allowed token is too long as it is, so a pasted document never
reaches the tokenizer or the model. Then the backend's ``count_prompt_tokens`` (the transformers backend:
the chat template with the generation prompt, tokenized exactly as sent), in one batch, for the prompts
that passed. A backend that counts no tokens (an OpenAI-compatible server) is judged by the character
pre-check alone, and so is a prompt the backend could not count (a count of None: a server without
``/tokenize``).

**A default budget is fitted to the context.** An answer budget the user gave (``--pe-max-new-tokens``,
a models file's ``max_new_tokens``) is kept free in the context as it is: a prompt that leaves less is
too long. The default budget of a served or local model (persona_eval.backends.REASONING_MAX_NEW_TOKENS,
room for a reasoning model to think) is instead fitted per case: the prompt must leave the task's own
budget free (the ``floor``, e.g. 32 tokens for triage), and the case is given what its context leaves
after the prompt, at most the default (``fitted_budget``). Where the prompt's tokens are not known the
default is sent as it is, and a server that knows its context (vLLM) fits it itself.

How the evaluation calls it, in ``evaluate_triage`` before ``runner.generate``::

    lengths = check_prompt_lengths(requests, backend=runner.backend,
                                   max_new_tokens=settings.generation.max_new_tokens,
                                   max_prompt_tokens=settings.max_prompt_tokens,
                                   sources=[case.source for case in cases])
    too_long = [length for length in lengths if not length.fits]
    if too_long and not record_too_long:
        raise too_long_error(too_long)   # one DataError naming the first case's file:line
    # otherwise: send only the requests that fit; for the others, write a per-case record holding
    # length.to_json() (prompt_chars, prompt_tokens, max_prompt_tokens, fits, reason)

The check costs one tokenizer batch per call and no model call; call it once per persona (the system
message is part of the prompt) or once with every persona's requests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from persona_eval.errors import BackendError, ConfigError, DataError
from persona_eval.prompts import RenderedMessages

__all__ = [
    "CHARS_PER_TOKEN_BOUND",
    "TRUNCATED",
    "MeasuredBackend",
    "PromptLength",
    "PromptLimit",
    "check_prompt_lengths",
    "finish_share",
    "fitted_budget",
    "prompt_limit",
    "too_long_error",
]

# More characters per token than any tokenizer gives on text: English averages about 4 per token, and
# the longest tokens of common vocabularies are words of 10-16 letters. A prompt of more characters than
# 16 x the tokens allowed cannot fit, so it is refused without being tokenized. (Long runs of one
# character, which some vocabularies hold as one token, are the only text that could beat it.)
CHARS_PER_TOKEN_BOUND = 16
_OTHERS_NAMED = 3
# The finish_reason of an answer that reached its token budget (max_new_tokens) before it ended.
TRUNCATED = "length"


def finish_share(records: Sequence[Mapping[str, Any]], finish_reason: str) -> float:
    """The share of `records` that ended with `finish_reason`: TRUNCATED, an answer cut at the token budget
    (it may have lost its label, its reasoning or its advice), or "too_long", a case the model never saw.
    NaN for no records."""
    if not records:
        return float("nan")
    return sum(r.get("finish_reason") == finish_reason for r in records) / len(records)


class MeasuredBackend(Protocol):
    """What the length check needs of a backend: every persona_eval.backends.base.Backend is one. The
    optional ``context_length()`` and ``count_prompt_tokens(requests)`` (see Backend) are looked up with
    getattr."""

    name: str

    def identity(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class PromptLimit:
    """The most prompt tokens a request may hold, and what sets that number."""

    context_length: int | None   # the model's context window (prompt and answer), None when unknown
    max_new_tokens: int          # kept free in the context for the answer
    max_prompt_tokens: int | None = None  # the user's own limit, None when not given

    @property
    def tokens(self) -> int | None:
        """The most prompt tokens allowed; None when nothing limits them."""
        limits = []
        if self.context_length is not None:
            limits.append(self.context_length - self.max_new_tokens)
        if self.max_prompt_tokens is not None:
            limits.append(self.max_prompt_tokens)
        return min(limits) if limits else None

    @property
    def characters(self) -> int | None:
        """The most characters a prompt may hold before it is too long without counting its tokens."""
        tokens = self.tokens
        return None if tokens is None else max(tokens, 0) * CHARS_PER_TOKEN_BOUND

    @property
    def set_by_context(self) -> bool:
        """Whether the model's context (not ``max_prompt_tokens``) sets the limit."""
        if self.context_length is None:
            return False
        return self.max_prompt_tokens is None or self.context_length - self.max_new_tokens <= self.max_prompt_tokens

    def describe(self) -> str:
        """The limit in words, e.g. "at most 8,160 prompt tokens fit (the model's context is 8,192 tokens,
        32 of them kept for the answer)"."""
        tokens = self.tokens
        if tokens is None:
            return "no limit is known"
        if self.set_by_context:
            context = (f"the model's context is {self.context_length:,} tokens, {self.max_new_tokens:,} of them "
                       "kept for the answer")
            if tokens <= 0:
                return f"no prompt fits ({context})"
            return f"at most {tokens:,} prompt tokens fit ({context})"
        return f"at most {tokens:,} prompt tokens are allowed (--pe-max-prompt-tokens)"

    def to_json(self) -> dict[str, Any]:
        return {"context_length": self.context_length, "max_new_tokens": self.max_new_tokens,
                "max_prompt_tokens": self.max_prompt_tokens, "tokens": self.tokens}


@dataclass(frozen=True)
class PromptLength:
    """One request's measure against the limit, in request order (``index``)."""

    index: int
    source: str         # the case's "file:line" ("" when the case has none)
    characters: int     # characters of the messages' text (the chat template adds a few)
    tokens: int | None  # prompt tokens as sent; None when not counted (no counter, or over the pre-check)
    limit: PromptLimit
    fits: bool

    @property
    def where(self) -> str:
        return self.source or f"request {self.index + 1}"

    def reason(self) -> str | None:
        """Why the prompt does not fit, in words; None when it fits."""
        if self.fits:
            return None
        if self.tokens is not None:
            return f"the prompt is {self.tokens:,} tokens; {self.limit.describe()}"
        return (f"the prompt is {self.characters:,} characters, more than {CHARS_PER_TOKEN_BOUND} per token "
                f"allowed (not tokenized); {self.limit.describe()}")

    def to_json(self) -> dict[str, Any]:
        """Plain JSON for a per-case record."""
        return {"prompt_chars": self.characters, "prompt_tokens": self.tokens,
                "max_prompt_tokens": self.limit.tokens, "fits": self.fits, "reason": self.reason()}


def _positive(value: Any, name: str, *, lowest: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise ConfigError(f"{name} must be an integer of at least {lowest}, got {value!r}")


def _context_length(backend: MeasuredBackend) -> int | None:
    """The backend's own context_length() when it has one; else what a server reports in its identity."""
    own = getattr(backend, "context_length", None)
    length = own() if own is not None else backend.identity().get("max_model_len")
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        return None
    return length


def prompt_limit(backend: MeasuredBackend, *, max_new_tokens: int, max_prompt_tokens: int | None = None) -> PromptLimit:
    """The prompt limit for `backend` (see the module docstring); it loads no weights."""
    _positive(max_new_tokens, "max_new_tokens", lowest=0)
    if max_prompt_tokens is not None:
        _positive(max_prompt_tokens, "max_prompt_tokens", lowest=1)
    return PromptLimit(context_length=_context_length(backend), max_new_tokens=max_new_tokens,
                       max_prompt_tokens=max_prompt_tokens)


def _characters(request: RenderedMessages) -> int:
    return sum(len(content) for _, content in request.messages)


def check_prompt_lengths(requests: Sequence[RenderedMessages], *, backend: MeasuredBackend, max_new_tokens: int,
                         max_prompt_tokens: int | None = None, sources: Sequence[str]) -> list[PromptLength]:
    """Each request measured against the limit, in order: its characters, its tokens when counted, and
    whether it fits (see the module docstring). ``sources[i]`` names request i's case ("file:line").

    Only the prompts that pass the character pre-check reach ``backend.count_prompt_tokens``, in one call;
    nothing is counted when no limit is known. Raises ConfigError for a bad ``max_new_tokens`` or
    ``max_prompt_tokens``, BackendError when the backend's count does not match the requests.
    """
    if len(sources) != len(requests):
        raise ValueError(f"sources: one per request expected, got {len(sources)} for {len(requests)} requests")
    limit = prompt_limit(backend, max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens)
    characters = [_characters(request) for request in requests]
    allowed_tokens, allowed_characters = limit.tokens, limit.characters
    if allowed_tokens is None or allowed_characters is None:
        return [PromptLength(i, sources[i], characters[i], None, limit, True) for i in range(len(requests))]

    candidates = [i for i, count in enumerate(characters) if count <= allowed_characters]
    tokens: dict[int, int] = {}
    count_tokens = getattr(backend, "count_prompt_tokens", None)
    if count_tokens is not None and candidates:
        counted = list(count_tokens([requests[i] for i in candidates]))
        if len(counted) != len(candidates):
            raise BackendError(f"model {backend.name!r}: count_prompt_tokens gave {len(counted)} counts for "
                               f"{len(candidates)} prompts")
        tokens = {i: int(n) for i, n in zip(candidates, counted, strict=True) if n is not None}
    lengths = []
    for i, count in enumerate(characters):
        token_count = tokens.get(i)
        if count > allowed_characters:
            fits = False
        elif token_count is None:
            fits = True  # no counter: the character pre-check is all that is known
        else:
            fits = token_count <= allowed_tokens
        lengths.append(PromptLength(i, sources[i], count, token_count, limit, fits))
    return lengths


def fitted_budget(length: PromptLength, *, budget: int, floor: int) -> int:
    """The answer budget of a case whose `budget` is a default (see the module docstring): what the model's
    context leaves after the prompt (`length`, measured with ``max_new_tokens=floor``), at most `budget` and
    at least `floor`; `budget` itself when the context or the prompt's tokens are not known.

    >>> limit = PromptLimit(context_length=512, max_new_tokens=32)
    >>> [fitted_budget(PromptLength(0, "", 900, tokens, limit, True), budget=1024, floor=32)
    ...  for tokens in (200, 470, None)]
    [312, 42, 1024]
    """
    context = length.limit.context_length
    if context is None or length.tokens is None:
        return budget
    return max(floor, min(budget, context - length.tokens))


def _split_source(source: str) -> tuple[str | None, int | None]:
    path, _, line = source.rpartition(":")
    if path and line.isdigit():
        return path, int(line)
    return (source or None), None


def too_long_error(items: Sequence[PromptLength], *, can_record: bool = True) -> DataError:
    """One DataError for the prompts of `items` that do not fit: the first one's file:line, its length and
    the limit, how many others are too long, and the ways out (``--pe-too-long record`` among them only
    when `can_record`: a task that cannot leave a case out of one persona's run cannot record it)."""
    too_long = [item for item in items if not item.fits]
    if not too_long:
        raise ValueError("too_long_error: every prompt fits")
    first, others = too_long[0], too_long[1:]
    message = first.reason() or ""
    if not first.source:
        message = f"{first.where}: {message}"
    if others:
        named = ", ".join(other.where for other in others[:_OTHERS_NAMED])
        more = ", ..." if len(others) > _OTHERS_NAMED else ""
        message += (f". {len(others):,} other case{'s are' if len(others) > 1 else ' is'} too long as well "
                    f"({named}{more})")
    ways = (["shorten the case", "lower --pe-max-new-tokens", "use a model with a longer context"]
            if first.limit.set_by_context else ["shorten the case", "raise --pe-max-prompt-tokens"])
    if can_record:
        ways.append("run with --pe-too-long record to count such cases as a per-case result instead")
    ways_out = (", ".join(ways[:-1]) + (", or " if len(ways) > 2 else " or ") + ways[-1]).capitalize() + "."
    path, line = _split_source(first.source)
    return DataError(f"{message}. {ways_out}", path=path, line=line)
