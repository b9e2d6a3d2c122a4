"""Shared test helpers: a scripted backend that implements the Backend protocol without a model."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from persona_eval.backends.base import Capabilities, Generation, GenerationConfig, LabelScoring, TokenScores
from persona_eval.errors import BackendError
from persona_eval.prompts import RenderedMessages, SystemPolicy

LabelLogprobs = dict[str, float | None]
# A generated token that is one label letter, perhaps with a leading space or trailing punctuation.
_LABEL_TOKEN = re.compile(r"^\s*([ABC])[.,:;)]*$")


def default_reply(prompt: str) -> str:
    return f"reply to {prompt}"


class ScriptedBackend:
    """A deterministic backend for unit tests.

    The reply to a request is ``reply(prompt)``, where the prompt is the transcript returned by
    :meth:`render_prompt`; tokens are the reply's whitespace-separated words at their offsets. A token
    that is a label letter gets ``answer_logprobs(prompt, letter)`` (by default the letter is the most
    likely label), any other token ``other_logprobs``. ``score_labels`` answers ``prompt_logprobs(prompt)``.
    Every call is recorded in ``calls`` as (kind, prompts); call number ``fail_on_call`` (1-based,
    counting generate and score_labels together) raises BackendError. ``delay`` seconds of sleep per
    call let concurrent batches overlap; ``max_concurrent`` is the most calls seen running at once.
    With ``boundary_in_generate`` the generation carries ``prompt_logprobs(prompt)`` as its
    prompt-boundary reading (as the transformers backend does), so nothing needs scoring afterwards.
    """

    def __init__(self, reply: Callable[[str], str] = default_reply, *, name: str = "scripted",
                 batch_size: int = 4, max_in_flight: int = 1, policy: SystemPolicy | None = None,
                 capabilities: Capabilities | None = None, fail_on_call: int | None = None,
                 delay: float = 0.0,
                 answer_logprobs: Callable[[str, str], LabelLogprobs] | None = None,
                 other_logprobs: LabelLogprobs | None = None,
                 prompt_logprobs: Callable[[str], LabelLogprobs] | None = None,
                 floor: float | None = None, boundary_in_generate: bool = False) -> None:
        self.name = name
        self._boundary_in_generate = boundary_in_generate
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self._reply = reply
        self._policy = policy or SystemPolicy()
        self._capabilities = capabilities or Capabilities()
        self._fail_on_call = fail_on_call
        self._delay = delay
        self._answer_logprobs = answer_logprobs or self._letter_most_likely
        self._other_logprobs = other_logprobs or {"A": -1.1, "B": -1.1, "C": -1.1}
        self._prompt_logprobs = prompt_logprobs or (lambda prompt: {"A": -2.0, "B": -0.5, "C": -1.5})
        self._floor = floor
        self._lock = threading.Lock()
        self._running = 0
        self.calls: list[tuple[str, list[str]]] = []
        self.succeeded: list[tuple[str, list[str]]] = []
        self.max_concurrent = 0

    @staticmethod
    def _letter_most_likely(prompt: str, letter: str) -> LabelLogprobs:
        return {label: (-0.2 if label == letter else -2.5) for label in ("A", "B", "C")}

    # -- the Backend protocol -----------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        return {"backend": "scripted", "model": self.name}

    def system_policy(self) -> SystemPolicy:
        return self._policy

    def capabilities(self) -> Capabilities:
        return self._capabilities

    def render_prompt(self, request: RenderedMessages) -> str:
        return "".join(f"<{role}>{content}</{role}>" for role, content in request.messages)

    def generate(self, requests: Sequence[RenderedMessages], config: GenerationConfig,
                 scoring: LabelScoring | None) -> list[Generation]:
        prompts = self._begin("generate", requests)
        try:
            results = [self._generation(prompt, scoring) for prompt in prompts]
        finally:
            self._end()
        with self._lock:
            self.succeeded.append(("generate", prompts))
        return results

    def score_labels(self, requests: Sequence[RenderedMessages], scoring: LabelScoring) -> list[LabelLogprobs]:
        prompts = self._begin("score_labels", requests)
        try:
            results = [dict(self._prompt_logprobs(prompt)) for prompt in prompts]
        finally:
            self._end()
        with self._lock:
            self.succeeded.append(("score_labels", prompts))
        return results

    def close(self) -> None:
        pass

    # -- helpers for tests --------------------------------------------------------------------------
    def prompts_asked(self, kind: str = "generate") -> list[str]:
        return [prompt for call_kind, prompts in self.calls if call_kind == kind for prompt in prompts]

    def prompts_answered(self, kind: str = "generate") -> list[str]:
        return [prompt for call_kind, prompts in self.succeeded if call_kind == kind for prompt in prompts]

    def calls_of(self, kind: str) -> list[list[str]]:
        return [prompts for call_kind, prompts in self.calls if call_kind == kind]

    def _begin(self, kind: str, requests: Sequence[RenderedMessages]) -> list[str]:
        prompts = [self.render_prompt(r) for r in requests]
        with self._lock:
            self.calls.append((kind, prompts))
            number = len(self.calls)
            self._running += 1
            self.max_concurrent = max(self.max_concurrent, self._running)
        if self._delay:
            time.sleep(self._delay)
        if number == self._fail_on_call:
            self._end()
            raise BackendError(f"scripted failure on call {number}", endpoint="scripted://test")
        return prompts

    def _end(self) -> None:
        with self._lock:
            self._running -= 1

    def _generation(self, prompt: str, scoring: LabelScoring | None) -> Generation:
        text = self._reply(prompt)
        tokens = None
        if scoring is not None:
            tokens = []
            for match in re.finditer(r"\s*\S+", text):
                word = match.group()
                letter = _LABEL_TOKEN.match(word)
                scores = (self._answer_logprobs(prompt, letter.group(1)) if letter
                          else dict(self._other_logprobs))
                tokens.append(TokenScores(offset=match.start(), token=word, label_logprobs=dict(scores),
                                          floor=self._floor))
        boundary = (dict(self._prompt_logprobs(prompt))
                    if scoring is not None and scoring.read_prompt and self._boundary_in_generate else None)
        return Generation(text=text, tokens=tokens, finish_reason="stop",
                          usage={"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split())},
                          prompt_label_logprobs=boundary)


@pytest.fixture
def make_backend() -> type[ScriptedBackend]:
    """The ScriptedBackend class: ``make_backend(reply, batch_size=2, ...)`` builds one."""
    return ScriptedBackend


@pytest.fixture(scope="session")
def tiny_effects_model_dir() -> Path:
    """The effects tiny model (persona_eval.testing.tiny_model, ``effects=True``) from the suite's cache:
    built on first use (minutes on two cores), then shared by every test of this session and later ones."""
    from persona_eval.testing.tiny_model import tiny_model_dir

    return tiny_model_dir(effects=True)
