"""Tests of persona_eval.lengths and the backends' context_length / count_prompt_tokens."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from persona_eval.backends.base import GenerationConfig
from persona_eval.errors import BackendError, ConfigError, DataError
from persona_eval.lengths import (
    CHARS_PER_TOKEN_BOUND,
    PromptLength,
    PromptLimit,
    check_prompt_lengths,
    fitted_budget,
    prompt_limit,
    too_long_error,
)
from persona_eval.personas import STUDY_PERSONAS
from persona_eval.prompts import RenderedMessages, SystemPolicy
from persona_eval.templates import render_case

NURSE = next(p for p in STUDY_PERSONAS if p.id == "ed_nurse")


def request(text: str, system: str | None = "You are a nurse.") -> RenderedMessages:
    messages = (("system", system), ("user", text)) if system is not None else (("user", text),)
    return RenderedMessages(messages, system)


class CountingBackend:
    """A backend with a tokenizer stub: one token per word, every call recorded."""

    name = "counting"
    batch_size = 4
    max_in_flight = 1

    def __init__(self, context: int | None = 100, *, counts: bool = True) -> None:
        self._context = context
        self.counted: list[list[RenderedMessages]] = []
        if not counts:
            self.count_prompt_tokens = None  # type: ignore[assignment]

    def identity(self) -> dict[str, Any]:
        raise AssertionError("a backend with context_length() is not asked for its identity")

    def context_length(self) -> int | None:
        return self._context

    def count_prompt_tokens(self, requests: Sequence[RenderedMessages]) -> list[int]:
        self.counted.append(list(requests))
        return [sum(len(content.split()) for _, content in r.messages) for r in requests]


class ServedBackend:
    """A backend like an OpenAI-compatible server: no tokenizer, a max_model_len in its identity."""

    name = "served"
    batch_size = 1
    max_in_flight = 8

    def __init__(self, identity: dict[str, Any]) -> None:
        self._identity = identity

    def identity(self) -> dict[str, Any]:
        return self._identity


def words(n: int) -> str:
    return " ".join(["word"] * n)


def sources(n: int, path: str = "cases.jsonl") -> list[str]:
    return [f"{path}:{line}" for line in range(1, n + 1)]


# -- the limit ------------------------------------------------------------------------------------------

def test_the_limit_is_the_context_less_the_answer_and_the_users_limit() -> None:
    assert PromptLimit(8192, 32).tokens == 8160
    assert PromptLimit(8192, 32, 2000).tokens == 2000
    assert PromptLimit(8192, 32, 9000).tokens == 8160
    assert PromptLimit(None, 32, 2000).tokens == 2000
    assert PromptLimit(None, 32).tokens is None
    assert PromptLimit(8192, 32).characters == 8160 * CHARS_PER_TOKEN_BOUND == 130_560
    assert PromptLimit(8192, 32).describe() == ("at most 8,160 prompt tokens fit (the model's context is "
                                                "8,192 tokens, 32 of them kept for the answer)")
    assert PromptLimit(8192, 32, 2000).describe() == ("at most 2,000 prompt tokens are allowed "
                                                      "(--pe-max-prompt-tokens)")
    assert PromptLimit(512, 600).describe() == ("no prompt fits (the model's context is 512 tokens, 600 of "
                                                "them kept for the answer)")


def test_tokens_plus_answer_up_to_the_context_fit() -> None:
    backend = CountingBackend(context=100)
    lengths = check_prompt_lengths([request(words(88)), request(words(89))], backend=backend,
                                   max_new_tokens=10, sources=sources(2))
    # The system message "You are a nurse." is 4 words: 92 + 10 = 102 > 100, 93 too.
    assert [(item.tokens, item.fits) for item in lengths] == [(92, False), (93, False)]
    lengths = check_prompt_lengths([request(words(86)), request(words(87))], backend=backend,
                                   max_new_tokens=10, sources=sources(2))
    assert [(item.tokens, item.fits) for item in lengths] == [(90, True), (91, False)]
    assert [item.index for item in lengths] == [0, 1]
    assert lengths[1].reason() == ("the prompt is 91 tokens; at most 90 prompt tokens fit (the model's context "
                                   "is 100 tokens, 10 of them kept for the answer)")
    assert lengths[0].reason() is None


def test_max_prompt_tokens_is_honoured() -> None:
    backend = CountingBackend(context=1000)
    requests = [request(words(16)), request(words(17)), request(words(500))]
    lengths = check_prompt_lengths(requests, backend=backend, max_new_tokens=32, max_prompt_tokens=20,
                                   sources=sources(3))
    assert [item.fits for item in lengths] == [True, False, False]
    assert lengths[1].limit.tokens == 20 and not lengths[1].limit.set_by_context


def test_every_request_is_counted_in_one_call() -> None:
    backend = CountingBackend(context=1000)
    requests = [request(words(n)) for n in range(1, 30)]
    check_prompt_lengths(requests, backend=backend, max_new_tokens=8, sources=sources(len(requests)))
    assert backend.counted == [requests]


def test_a_5_mb_prompt_never_reaches_the_tokenizer() -> None:
    backend = CountingBackend(context=8192)
    huge = request("x" * (5 * 2**20))
    lengths = check_prompt_lengths([request("short case"), huge, request("another")], backend=backend,
                                   max_new_tokens=32, sources=sources(3))
    assert backend.counted == [[request("short case"), request("another")]]
    assert all(huge is not counted for batch in backend.counted for counted in batch)
    assert [item.fits for item in lengths] == [True, False, True]
    assert lengths[1].tokens is None
    assert lengths[1].characters == 5 * 2**20 + len("You are a nurse.")
    assert lengths[1].reason() == ("the prompt is 5,242,896 characters, more than 16 per token allowed (not "
                                   "tokenized); at most 8,160 prompt tokens fit (the model's context is 8,192 "
                                   "tokens, 32 of them kept for the answer)")


def test_nothing_is_counted_when_every_prompt_fails_the_pre_check() -> None:
    backend = CountingBackend(context=64)
    lengths = check_prompt_lengths([request("x" * 5000)], backend=backend, max_new_tokens=32, sources=["a:1"])
    assert backend.counted == [] and not lengths[0].fits


def test_a_served_model_is_judged_by_characters_against_its_max_model_len() -> None:
    backend = ServedBackend({"backend": "openai", "model": "m", "max_model_len": 2048})
    limit_chars = (2048 - 32) * CHARS_PER_TOKEN_BOUND
    system = len("You are a nurse.")
    requests = [request("y" * (limit_chars - system)), request("y" * (limit_chars - system + 1))]
    lengths = check_prompt_lengths(requests, backend=backend, max_new_tokens=32, sources=sources(2))
    assert [(item.tokens, item.fits) for item in lengths] == [(None, True), (None, False)]
    assert lengths[0].limit == PromptLimit(2048, 32, None)


def test_without_any_limit_every_prompt_fits_and_nothing_is_counted() -> None:
    backend = CountingBackend(context=None)
    lengths = check_prompt_lengths([request("x" * 10**6)], backend=backend, max_new_tokens=32, sources=["a:1"])
    assert lengths[0].fits and lengths[0].tokens is None and backend.counted == []
    served = ServedBackend({"backend": "openai", "model": "m", "max_model_len": None})
    assert prompt_limit(served, max_new_tokens=32).tokens is None
    assert prompt_limit(served, max_new_tokens=32, max_prompt_tokens=100).tokens == 100


def test_a_backend_without_a_counter_uses_the_character_check_with_its_context() -> None:
    backend = CountingBackend(context=100, counts=False)
    lengths = check_prompt_lengths([request("x" * 500), request("x" * 5000)], backend=backend,
                                   max_new_tokens=10, sources=sources(2))
    assert [(item.tokens, item.fits) for item in lengths] == [(None, True), (None, False)]


def test_a_prompt_the_backend_could_not_count_is_judged_by_its_characters() -> None:
    class PartlyCounting(CountingBackend):
        def count_prompt_tokens(self, requests: Sequence[RenderedMessages]) -> list[int | None]:  # type: ignore[override]
            return [None, *super().count_prompt_tokens(requests[1:])]

    lengths = check_prompt_lengths([request(words(95)), request(words(95))], backend=PartlyCounting(context=100),
                                   max_new_tokens=10, sources=sources(2))
    assert [(item.tokens, item.fits) for item in lengths] == [(None, True), (99, False)]


# -- a default budget fitted to the context -------------------------------------------------------------

def test_a_default_budget_gets_what_the_context_leaves_between_the_floor_and_the_default() -> None:
    backend = CountingBackend(context=100)
    requests = [request(words(n)) for n in (20, 70, 86, 90)]  # 24, 74, 90, 94 tokens with the system words
    lengths = check_prompt_lengths(requests, backend=backend, max_new_tokens=8, sources=sources(4))
    assert [item.fits for item in lengths] == [True, True, True, False]
    assert [fitted_budget(item, budget=50, floor=8) for item in lengths[:3]] == [50, 26, 10]


def test_a_default_budget_is_sent_as_it_is_where_the_prompt_or_the_context_is_unknown() -> None:
    served = ServedBackend({"backend": "openai", "model": "m", "max_model_len": 512})
    (length,) = check_prompt_lengths([request("short")], backend=served, max_new_tokens=32, sources=["a:1"])
    assert length.tokens is None and fitted_budget(length, budget=1024, floor=32) == 1024
    (unlimited,) = check_prompt_lengths([request("short")], backend=CountingBackend(context=None), max_new_tokens=32,
                                        sources=["a:1"])
    assert fitted_budget(unlimited, budget=1024, floor=32) == 1024


def test_bad_arguments() -> None:
    backend = CountingBackend()
    with pytest.raises(ConfigError, match="max_prompt_tokens must be an integer of at least 1, got 0"):
        check_prompt_lengths([], backend=backend, max_new_tokens=8, max_prompt_tokens=0, sources=[])
    with pytest.raises(ConfigError, match="max_new_tokens must be an integer of at least 0, got -1"):
        prompt_limit(backend, max_new_tokens=-1)
    with pytest.raises(ValueError, match="sources: one per request expected, got 0 for 1 requests"):
        check_prompt_lengths([request("a")], backend=backend, max_new_tokens=8, sources=[])

    class Miscounting(CountingBackend):
        def count_prompt_tokens(self, requests: Sequence[RenderedMessages]) -> list[int]:
            return [1]

    with pytest.raises(BackendError, match="count_prompt_tokens gave 1 counts for 2 prompts"):
        check_prompt_lengths([request("a"), request("b")], backend=Miscounting(), max_new_tokens=8,
                             sources=sources(2))


def test_a_prompt_length_is_plain_json() -> None:
    (length,) = check_prompt_lengths([request(words(200))], backend=CountingBackend(context=100),
                                     max_new_tokens=10, sources=["cases.jsonl:7"])
    assert json.loads(json.dumps(length.to_json())) == {
        "prompt_chars": len("You are a nurse.") + len(words(200)), "prompt_tokens": 204,
        "max_prompt_tokens": 90, "fits": False, "reason": length.reason()}


# -- the error ------------------------------------------------------------------------------------------

def test_the_error_names_the_first_case_the_limit_and_the_others() -> None:
    backend = CountingBackend(context=8192)
    requests = [request(words(10)), request(words(8797)), request(words(9000)), request(words(10)),
                request(words(9000)), request(words(9000)), request(words(9000))]
    lengths = check_prompt_lengths(requests, backend=backend, max_new_tokens=32,
                                   sources=sources(len(requests), "data/cases.jsonl"))
    error = too_long_error(lengths)
    assert isinstance(error, DataError)
    assert (error.path, error.line, error.field) == ("data/cases.jsonl", 2, None)
    assert str(error) == (
        "data/cases.jsonl:2: the prompt is 8,801 tokens; at most 8,160 prompt tokens fit (the model's context "
        "is 8,192 tokens, 32 of them kept for the answer). 4 other cases are too long as well "
        "(data/cases.jsonl:3, data/cases.jsonl:5, data/cases.jsonl:6, ...). Shorten the case, lower "
        "--pe-max-new-tokens, use a model with a longer context, or run with --pe-too-long record to count "
        "such cases as a per-case result instead.")
    assert str(too_long_error(lengths, can_record=False)).endswith(
        "Shorten the case, lower --pe-max-new-tokens, or use a model with a longer context.")


def test_the_error_for_the_users_limit_says_to_raise_it() -> None:
    lengths = check_prompt_lengths([request(words(10)), request(words(300))], backend=CountingBackend(1000),
                                   max_new_tokens=32, max_prompt_tokens=256, sources=["q.jsonl:1", "q.jsonl:9"])
    assert str(too_long_error(lengths)) == (
        "q.jsonl:9: the prompt is 304 tokens; at most 256 prompt tokens are allowed (--pe-max-prompt-tokens). "
        "Shorten the case, raise --pe-max-prompt-tokens, or run with --pe-too-long record to count such cases "
        "as a per-case result instead.")


def test_the_error_for_a_case_without_a_source_and_for_nothing_too_long() -> None:
    lengths = check_prompt_lengths([request(words(400)), request(words(400))], backend=CountingBackend(400),
                                   max_new_tokens=10, sources=["", ""])
    message = str(too_long_error(lengths))
    assert message.startswith("request 1: the prompt is 404 tokens; ")
    assert "1 other case is too long as well (request 2)" in message
    with pytest.raises(ValueError, match="every prompt fits"):
        too_long_error([PromptLength(0, "a:1", 5, 2, PromptLimit(100, 10), True)])


# -- the transformers backend on the tiny model ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from persona_eval.testing.tiny_model import tiny_model_dir

    return tiny_model_dir()


def triage_requests(policy: SystemPolicy) -> list[RenderedMessages]:
    texts = ["A man of 58 has had crushing chest pain for 20 minutes.", "A mild sore throat.",
             "Slurred speech that began an hour ago; " * 5]
    return [render_case(text, persona, policy)
            for text in texts for persona in STUDY_PERSONAS]


def chat_template_length(tokenizer: Any, request: RenderedMessages) -> int:
    # transformers 5 returns a BatchEncoding unless return_dict=False.
    ids = tokenizer.apply_chat_template(request.as_dicts(), add_generation_prompt=True, return_dict=False)
    return len(ids)


def test_hf_counts_equal_the_chat_template_and_what_generate_sends(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    from persona_eval.backends.hf import HFBackend

    backend = HFBackend("tiny", str(tiny_dir), batch_size=8)
    assert backend.context_length() == 512
    requests = triage_requests(backend.system_policy())
    counts = backend.count_prompt_tokens(requests)
    assert not backend.loaded  # counting loads no weights
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    assert counts == [chat_template_length(tokenizer, r) for r in requests]
    assert len(set(counts)) > 1
    assert backend.count_prompt_tokens([]) == []
    sent = backend.generate(requests[:4], GenerationConfig(max_new_tokens=2), None)
    assert [g.usage["prompt_tokens"] for g in sent] == counts[:4]


def test_hf_prompts_over_the_context_are_too_long(tiny_dir: Path) -> None:
    from persona_eval.backends.hf import HFBackend

    backend = HFBackend("tiny", str(tiny_dir))
    policy = backend.system_policy()
    short = render_case("A mild sore throat.", NURSE, policy)
    (short_count,) = backend.count_prompt_tokens([short])
    long_text = "a mild sore throat and " * 200
    long = render_case(long_text, NURSE, policy)
    lengths = check_prompt_lengths([short, long], backend=backend, max_new_tokens=32,
                                   sources=["cases.jsonl:1", "cases.jsonl:2"])
    assert lengths[0].fits and lengths[0].tokens == short_count
    assert not lengths[1].fits and lengths[1].tokens is not None and lengths[1].tokens > 512 - 32
    assert str(too_long_error(lengths)).startswith(
        f"cases.jsonl:2: the prompt is {lengths[1].tokens:,} tokens; at most 480 prompt tokens fit (the "
        "model's context is 512 tokens, 32 of them kept for the answer). ")
    # Exactly at the boundary: tokens + max_new_tokens == context fits, one more token does not.
    at_limit = check_prompt_lengths([short], backend=backend, max_new_tokens=512 - short_count, sources=["a:1"])
    over = check_prompt_lengths([short], backend=backend, max_new_tokens=513 - short_count, sources=["a:1"])
    assert at_limit[0].fits and not over[0].fits
    assert not check_prompt_lengths([short], backend=backend, max_new_tokens=32,
                                    max_prompt_tokens=short_count - 1, sources=["a:1"])[0].fits


def test_hf_context_falls_back_to_the_tokenizer_and_ignores_its_unset_value(tiny_dir: Path,
                                                                           tmp_path: Path) -> None:
    from persona_eval.backends.hf import HFBackend

    model = tmp_path / "no-config"
    shutil.copytree(tiny_dir, model)
    (model / "config.json").unlink()
    assert HFBackend("tiny", str(model)).context_length() == 512  # the tokenizer's model_max_length
    settings = json.loads((model / "tokenizer_config.json").read_text())
    settings["model_max_length"] = int(1e30)  # transformers' "not set"
    (model / "tokenizer_config.json").write_text(json.dumps(settings))
    assert HFBackend("tiny", str(model)).context_length() is None


# -- the embedded model ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_embedded_model_counts_its_prompts_and_knows_its_context() -> None:
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from persona_eval.backends import create_backend, parse_model_spec
    from persona_eval.backends.embedded import prepare_embedded_model
    from persona_eval.cache import default_cache_dir

    backend: Any = create_backend(parse_model_spec("smollm2"), cache_dir=default_cache_dir())
    assert backend.context_length() == 8192
    requests = triage_requests(backend.system_policy())
    counts = backend.count_prompt_tokens(requests)
    assert not backend.loaded
    tokenizer = AutoTokenizer.from_pretrained(str(prepare_embedded_model(default_cache_dir())))
    assert counts == [chat_template_length(tokenizer, r) for r in requests]
    assert all(check.fits for check in check_prompt_lengths(
        requests, backend=backend, max_new_tokens=32, sources=sources(len(requests))))
