"""The OpenAI-compatible backend without a network: payloads, response parsing, and the transport's
retries and capability detection over a mock HTTP transport (the real openai client, no server)."""

from __future__ import annotations

import importlib.metadata
import json
import math
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from persona_eval.backends import create_backend, openai_compat, parse_model_spec
from persona_eval.backends.base import GenerationConfig, LabelScoring, logsumexp
from persona_eval.backends.openai_compat import OpenAIBackend
from persona_eval.backends.openai_payload import (
    build_chat_payload,
    build_prompt_scoring_payload,
    build_tokenize_payload,
    decoding_sent,
    parse_chat_response,
    parse_prompt_scoring_response,
    parse_tokenize_response,
    ranking_schema,
    transcript,
)
from persona_eval.errors import BackendError, ConfigError
from persona_eval.evaluation import NOT_AVAILABLE, label_distribution
from persona_eval.parsing import find_triage_answer, split_reasoning
from persona_eval.personas import STUDY_PERSONAS
from persona_eval.prompts import RenderedMessages, render_messages
from persona_eval.testing.standin import RecordedRequest, StandInServer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself installs tomli before 3.11
    import tomli as tomllib

SCORING = LabelScoring()
NURSE = STUDY_PERSONAS[3]
BASELINE = STUDY_PERSONAS[0]
KEY = "sk-test-0123456789abcdef"
REPO = Path(__file__).resolve().parent.parent


def request(persona=NURSE, text: str = "Case text") -> RenderedMessages:
    return render_messages(text, persona, OpenAIBackend("m", model="m", base_url="http://h/v1").system_policy())


def top(**logprobs: float) -> list[dict[str, Any]]:
    return [{"token": token.replace("_", " "), "logprob": value, "bytes": list(token.replace("_", " ").encode())}
            for token, value in logprobs.items()]


def entry(token: str, logprob: float, alternatives: list[dict[str, Any]], raw: bytes | None = None) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(raw if raw is not None else token.encode()),
            "top_logprobs": alternatives}


def chat_response(text: str, content: list[dict[str, Any]] | None, finish: str = "stop") -> dict[str, Any]:
    return {"id": "x", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None if content is None else {"content": content}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 12, "completion_tokens": len(content or []), "total_tokens": 0}}


# -- payloads -------------------------------------------------------------------------------------------


def test_chat_payload_is_greedy_with_logprobs_only_when_scoring():
    payload = build_chat_payload(request(), GenerationConfig(max_new_tokens=7), SCORING, model="served")
    assert payload == {
        "model": "served",
        "messages": [{"role": "system", "content": NURSE.declaration}, {"role": "user", "content": "Case text"}],
        "max_completion_tokens": 7, "temperature": 0.0, "logprobs": True, "top_logprobs": 20}
    plain = build_chat_payload(request(), GenerationConfig(), None, model="served")
    assert "logprobs" not in plain and "top_logprobs" not in plain and "response_format" not in plain
    json.dumps(payload)  # plain JSON types only


def test_stop_sequences_and_the_thinking_switch_are_sent_only_when_given():
    stop = GenerationConfig(max_new_tokens=7, stop=("###", "\n\n"))
    payload = build_chat_payload(request(), stop, None, model="m", reasoning=False)
    assert payload["stop"] == ["###", "\n\n"]
    assert payload["chat_template_kwargs"] == {"enable_thinking": False}
    sent = decoding_sent(payload, stop)
    assert sent["stop"] == ["###", "\n\n"] and sent["chat_template_kwargs"] == {"enable_thinking": False}
    # Prompt scoring renders the prompt with the same switch as the chat completion.
    assert build_tokenize_payload(request(), SCORING, model="m", reasoning=True)["chat_template_kwargs"] == {
        "enable_thinking": True}
    # Neither given: neither sent, and the record (part of every cache key) is what it was without them.
    plain = build_chat_payload(request(), GenerationConfig(max_new_tokens=7), None, model="m")
    assert "stop" not in plain and "chat_template_kwargs" not in plain
    assert set(decoding_sent(plain, GenerationConfig())) == {"temperature", "top_p", "max_tokens", "stop",
                                                            "logprobs", "top_logprobs", "constrained_ranking"}
    assert "chat_template_kwargs" not in build_tokenize_payload(request(), SCORING, model="m")
    assert GenerationConfig(max_new_tokens=7).key() == {"max_new_tokens": 7, "temperature": 0.0,
                                                        "constrained_ranking": None}
    assert stop.key()["stop"] == ["###", "\n\n"]


def test_constrained_ranking_sends_a_json_schema():
    payload = build_chat_payload(request(), GenerationConfig(constrained_ranking=4), None, model="m")
    response_format = payload["response_format"]
    assert response_format["type"] == "json_schema"
    schema = response_format["json_schema"]["schema"]
    assert schema == ranking_schema(4)
    ranking = schema["properties"]["ranking"]
    assert ranking["minItems"] == ranking["maxItems"] == 4
    assert ranking["items"] == {"type": "integer", "minimum": 1, "maximum": 4}
    assert "uniqueItems" not in ranking  # vLLM's grammar engine rejects it; the caller validates
    with pytest.raises(ConfigError, match="constrained_ranking"):
        ranking_schema(0)


def test_baseline_system_policy_empty_or_omit():
    empty = OpenAIBackend("m", model="m", base_url="http://h/v1")
    omit = OpenAIBackend("m", model="m", base_url="http://h/v1", baseline_system="omit")
    assert render_messages("x", BASELINE, empty.system_policy()).messages == (("system", ""), ("user", "x"))
    assert render_messages("x", BASELINE, omit.system_policy()).messages == (("user", "x"),)
    assert render_messages("x", NURSE, omit.system_policy()).messages[0] == ("system", NURSE.declaration)


def test_render_prompt_is_a_transcript_that_differs_by_the_declaration_only():
    backend = OpenAIBackend("m", model="m", base_url="http://h/v1")
    nurse = backend.render_prompt(request(NURSE))
    baseline = backend.render_prompt(request(BASELINE))
    assert nurse == transcript(request(NURSE))
    assert nurse.startswith("<|system|>\nYou are an Emergency Department nurse.\n<|user|>\nCase text\n")
    assert nurse.endswith("<|assistant|>\n")
    assert nurse.replace(NURSE.declaration, "") == baseline


# -- parsing chat responses -------------------------------------------------------------------------------


def test_token_offsets_label_logsumexp_and_floor():
    content = [
        entry("Answer", -0.1, top(Answer=-0.1, The=-3.0)),
        entry(":", -0.01, top(**{":": -0.01})),
        entry(" C", -0.3, top(_C=-0.3, _B=-1.6, C=-4.0, _A=-5.0, _D=-7.5)),
        entry(" because", -0.5, top(_because=-0.5, _as=-2.0)),
        entry("<|im_end|>", -0.01, top(**{"<|im_end|>": -0.01})),  # listed by vLLM, not part of the text
    ]
    generation = parse_chat_response(chat_response("Answer: C because", content), SCORING)
    assert generation.text == "Answer: C because"
    assert generation.finish_reason == "stop"
    assert generation.usage == {"prompt_tokens": 12, "completion_tokens": 5}
    assert generation.tokens is not None
    assert [t.offset for t in generation.tokens] == [0, 6, 7, 9]
    assert [t.token for t in generation.tokens] == ["Answer", ":", " C", " because"]
    answer = generation.tokens[2]
    assert answer.label_logprobs["C"] == pytest.approx(logsumexp([-0.3, -4.0]))  # " C" and "C" summed
    assert answer.label_logprobs["B"] == -1.6
    assert answer.label_logprobs["A"] == -5.0
    assert answer.floor == -7.5
    first = generation.tokens[0]
    assert first.label_logprobs == {"A": None, "B": None, "C": None}  # absent from the top-k
    assert first.floor == -3.0
    # Round trip through the cache's JSON form.
    assert type(generation).from_json(json.loads(json.dumps(generation.to_json()))) == generation


def test_answer_position_distribution_through_the_evaluation():
    content = [entry("Answer", -0.1, top(Answer=-0.1)), entry(":", -0.01, top(**{":": -0.01})),
               entry(" B", -0.2, top(_B=-0.2, _C=-2.0, _X=-6.0))]
    generation = parse_chat_response(chat_response("Answer: B", content), SCORING)
    span = find_triage_answer(generation.text, labels=["A", "B", "C"])
    probs, flagged = label_distribution(generation, span, ["A", "B", "C"])
    assert flagged  # "A" was not in the top-k: it got the floor (-6.0)
    weights = {"A": math.exp(-6.0), "B": math.exp(-0.2), "C": math.exp(-2.0)}
    total = sum(weights.values())
    assert probs == pytest.approx({label: w / total for label, w in weights.items()})


def test_multibyte_character_split_over_tokens_keeps_character_offsets():
    # "é" is two bytes; a byte-level tokenizer may split it over two tokens.
    content = [entry("caf", -0.1, []), entry("bytes:\\xc3", -0.1, [], b"\xc3"), entry("bytes:\\xa9", -0.1, [], b"\xa9"),
               entry(" A", -0.1, top(_A=-0.1))]
    generation = parse_chat_response(chat_response("café A", content), SCORING)
    assert generation.tokens is not None
    # As the transformers backend counts them (a decoded half character is one replacement character).
    assert [t.offset for t in generation.tokens] == [0, 3, 4, 4]
    assert generation.tokens[3].label_logprobs["A"] == -0.1


def test_no_logprobs_in_the_reply_or_none_asked_gives_no_tokens():
    assert parse_chat_response(chat_response("Answer: A", None), SCORING).tokens is None
    content = [entry("Answer", -0.1, top(Answer=-0.1))]
    assert parse_chat_response(chat_response("Answer", content), None).tokens is None


def test_a_reply_without_choices_is_a_backend_error():
    with pytest.raises(BackendError, match="no choices"):
        parse_chat_response({"choices": []}, SCORING)


# -- prompt scoring payloads --------------------------------------------------------------------------------


def test_tokenize_payload_opens_the_assistant_turn_with_the_answer_prefix():
    payload = build_tokenize_payload(request(), SCORING, model="m")
    assert payload["messages"][-1] == {"role": "assistant", "content": "Answer:"}
    assert payload["continue_final_message"] is True and payload["add_generation_prompt"] is False
    assert parse_tokenize_response({"count": 3, "tokens": [1, 2, 3]}) == [1, 2, 3]
    with pytest.raises(BackendError, match="token list"):
        parse_tokenize_response({"detail": "Not Found"})


def test_prompt_scoring_payload_and_parse():
    label_tokens = {"A": [49, 330], "B": [389], "C": []}
    payload = build_prompt_scoring_payload([1, 2], label_tokens, model="m")
    assert payload["prompt"] == [[1, 2, 49], [1, 2, 330], [1, 2, 389]]
    assert payload["echo"] is True and payload["max_tokens"] == 0 and payload["logprobs"] == 0
    choices = [{"index": i, "logprobs": {"token_logprobs": [None, -0.5, value]}}
               for i, value in enumerate([-9.0, -1.0, -2.0])]
    scores = parse_prompt_scoring_response({"choices": list(reversed(choices))}, label_tokens)
    assert scores["A"] == pytest.approx(logsumexp([-9.0, -1.0]))
    assert scores["B"] == -2.0
    assert scores["C"] is None
    with pytest.raises(BackendError, match="expected 3"):
        parse_prompt_scoring_response({"choices": choices[:2]}, label_tokens)


# -- options, identity and the key ----------------------------------------------------------------------------


def test_max_in_flight_defaults_to_256_for_a_self_served_model_and_32_for_the_hosted_api(tmp_path):
    served = create_backend(parse_model_spec("openai:m@http://gpu-host:8000/v1"), cache_dir=tmp_path)
    hosted = create_backend(parse_model_spec("openai:gpt-4o"), cache_dir=tmp_path)
    given = OpenAIBackend("m", model="m", base_url="http://gpu-host:8000/v1", max_in_flight=8)
    assert (served.max_in_flight, hosted.max_in_flight, given.max_in_flight) == (256, 32, 8)


def test_models_file_options_reach_the_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_SERVER_API_KEY", KEY)
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  served:\n    backend: openai\n    model: org/Big-Model\n"
                      "    base_url: http://gpu-host:8000/v1\n    api_key_env: MY_SERVER_API_KEY\n"
                      "    max_in_flight: 64\n    timeout: 30\n    max_retries: 2\n    logprobs: false\n"
                      "    baseline_system: omit\n    revision: 2024-08-06\n")
    from persona_eval.backends import load_models_file

    backend = create_backend(load_models_file(models)["served"], cache_dir=tmp_path)
    assert isinstance(backend, OpenAIBackend)
    assert (backend.max_in_flight, backend.batch_size, backend.timeout, backend.max_retries) == (64, 1, 30.0, 2)
    assert backend.capabilities().logprobs is False
    assert backend.revision == "2024-08-06"  # YAML reads it as a date; it names a version
    assert backend.address() == {"backend": "openai", "model": "org/Big-Model", "base_url": "http://gpu-host:8000/v1"}


def test_command_line_spec_and_hosted_default(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    local = create_backend(parse_model_spec("openai:smollm2@http://127.0.0.1:8000/v1"), cache_dir=tmp_path)
    assert isinstance(local, OpenAIBackend)
    assert local.address()["base_url"] == "http://127.0.0.1:8000/v1"
    assert local.capabilities().prompt_scoring is True
    hosted = create_backend(parse_model_spec("openai:gpt-4o"), cache_dir=tmp_path)
    # The OpenAI API reports neither weights nor process: it is not asked, so no key is needed yet.
    assert hosted.identity() == {"backend": "openai", "model": "gpt-4o", "base_url": "https://api.openai.com/v1",
                                 "root": None, "max_model_len": None, "process_started": None, "revision": None,
                                 "identified_by": ["served name", "base_url"]}
    assert hosted.capabilities().prompt_scoring is False  # the OpenAI API has no prompt echo
    # Cheap: a missing key is an error only when a request is made.
    with pytest.raises(ConfigError, match="set the environment variable OPENAI_API_KEY"):
        hosted.generate([request()], GenerationConfig(), None)


def test_identity_never_holds_credentials(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    backend, seen = mock_backend(lambda r: httpx2.Response(200, json={"data": [{"id": "m", "root": "/models/m"}]}),
                                 base_url="http://user:secret-pass@server:8000/v1")
    identity = backend.identity()
    assert identity["base_url"] == "http://server:8000/v1" and identity["root"] == "/models/m"
    assert "secret-pass" not in json.dumps(identity) and KEY not in json.dumps(identity)
    assert seen  # it asked the server


@pytest.mark.parametrize(("options", "message"), [
    ({"revision": ""}, "'revision' must be a non-empty string"),
    ({"revision": ["a"]}, "'revision' must be a non-empty string"),
    ({"max_in_flight": 0}, "'max_in_flight' must be an integer >= 1"),
    ({"timeout": -1}, "'timeout' must be a positive number"),
    ({"max_retries": -1}, "'max_retries' must be an integer >= 0"),
    ({"logprobs": "no"}, "'logprobs' must be true or false"),
    ({"baseline_system": "default"}, "'baseline_system' must be one of empty, omit"),
    ({"base_url": "gpu-host:8000"}, "'base_url' must start with http"),
])
def test_bad_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        OpenAIBackend("m", **{"model": "m", "base_url": "http://h/v1", **options})


# -- the transport over a mock HTTP transport ---------------------------------------------------------------------

Handler = Callable[[httpx2.Request], httpx2.Response]


def mock_backend(handler: Handler, **options: Any) -> tuple[OpenAIBackend, list[httpx2.Request]]:
    seen: list[httpx2.Request] = []

    def record(http_request: httpx2.Request) -> httpx2.Response:
        seen.append(http_request)
        return handler(http_request)

    backend = OpenAIBackend("m", **{"model": "m", "base_url": "http://server:8000/v1", "max_retries": 3,
                                    "http_client": httpx2.Client(transport=httpx2.MockTransport(record)), **options})
    backend.retry_base_delay = 0.001
    return backend, seen


def ok_reply(text: str = "Answer: A") -> dict[str, Any]:
    return chat_response(text, [entry("Answer", -0.1, top(Answer=-0.1)), entry(":", -0.1, top(**{":": -0.1})),
                                entry(" A", -0.1, top(_A=-0.1, _B=-2.0, _C=-3.0))])


def test_the_key_from_the_environment_is_sent_and_a_local_server_needs_none(monkeypatch):
    monkeypatch.setenv("MY_API_KEY", KEY)
    backend, seen = mock_backend(lambda r: httpx2.Response(200, json=ok_reply()), api_key_env="MY_API_KEY")
    backend.generate([request()], GenerationConfig(), SCORING)
    assert seen[0].headers["authorization"] == f"Bearer {KEY}"
    assert json.loads(seen[0].content)["model"] == "m"
    monkeypatch.delenv("MY_API_KEY")
    local, seen = mock_backend(lambda r: httpx2.Response(200, json=ok_reply()), api_key_env="MY_API_KEY")
    local.generate([request()], GenerationConfig(), SCORING)
    assert seen[0].headers["authorization"] == "Bearer EMPTY"


@pytest.mark.parametrize("failure", ["429", "503", "timeout", "connection"])
def test_transient_failures_are_retried_then_succeed(failure):
    calls = {"n": 0}

    def handler(http_request: httpx2.Request) -> httpx2.Response:
        calls["n"] += 1
        if calls["n"] < 3:
            if failure == "timeout":
                raise httpx2.ReadTimeout("slow", request=http_request)
            if failure == "connection":
                raise httpx2.ConnectError("refused", request=http_request)
            return httpx2.Response(int(failure), json={"error": {"message": "busy"}}, headers={"retry-after": "0"})
        return httpx2.Response(200, json=ok_reply())

    backend, _ = mock_backend(handler)
    (generation,) = backend.generate([request()], GenerationConfig(), SCORING)
    assert generation.text == "Answer: A"
    assert calls["n"] == 3 and backend.http_retries == 2 and backend.http_requests == 3


def test_retries_are_bounded_and_the_error_names_the_endpoint_and_last_status(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    backend, seen = mock_backend(lambda r: httpx2.Response(502, text=f"bad gateway {KEY}"))
    with pytest.raises(BackendError) as raised:
        backend.generate([request()], GenerationConfig(), SCORING)
    assert len(seen) == 4  # one try and max_retries=3 retries
    message = str(raised.value)
    assert "endpoint: http://server:8000/v1/chat/completions" in message
    assert "last status: HTTP 502" in message
    assert raised.value.endpoint == "http://server:8000/v1/chat/completions"
    assert KEY not in message

    def refuse(http_request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("[Errno 111] Connection refused", request=http_request)

    backend, seen = mock_backend(refuse, max_retries=0)
    with pytest.raises(BackendError, match=r"last status: connection error \(\[Errno 111\] Connection refused\)"):
        backend.generate([request()], GenerationConfig(), SCORING)
    assert len(seen) == 1


def test_backoff_is_exponential_with_jitter_and_capped():
    backend = OpenAIBackend("m", model="m", base_url="http://h/v1")
    for retry in range(8):
        nominal = min(backend.retry_max_delay, backend.retry_base_delay * 2 ** retry)
        delays = {backend._backoff(retry, None) for _ in range(50)}
        assert all(nominal / 2 <= d <= nominal for d in delays)
        assert len(delays) > 1  # jittered
    assert backend._backoff(0, 5.0) >= 5.0  # Retry-After is honoured
    assert backend._backoff(0, 1e9) <= backend.retry_max_delay


def test_a_rejected_request_is_not_retried_and_quotes_the_server():
    backend, seen = mock_backend(lambda r: httpx2.Response(
        404, json={"message": "The model `m` does not exist.", "type": "NotFoundError", "code": 404}))
    with pytest.raises(BackendError, match=r"does not exist.*last status: HTTP 404"):
        backend.generate([request()], GenerationConfig(), SCORING)
    assert len(seen) == 1


def test_a_model_that_rejects_logprobs_is_detected_and_asked_again_without():
    def handler(http_request: httpx2.Request) -> httpx2.Response:
        body = json.loads(http_request.content)
        if "logprobs" in body:
            return httpx2.Response(400, json={"error": {
                "message": "Unsupported parameter: 'logprobs' is not supported with this model.",
                "type": "invalid_request_error", "param": "logprobs", "code": "unsupported_parameter"}})
        return httpx2.Response(200, json=chat_response("Answer: B", None))

    backend, seen = mock_backend(handler)
    assert backend.capabilities().logprobs is True
    (generation,) = backend.generate([request()], GenerationConfig(), SCORING)
    assert generation.text == "Answer: B" and generation.tokens is None
    assert backend.capabilities().logprobs is False and backend.capabilities().prompt_scoring is False
    assert len(seen) == 2
    backend.generate([request()], GenerationConfig(), SCORING)
    assert len(seen) == 3  # no second rejection
    assert backend.score_labels([request()], SCORING) == [{"A": None, "B": None, "C": None}]
    assert len(seen) == 3


def test_a_server_that_ignores_logprobs_is_detected():
    backend, _ = mock_backend(lambda r: httpx2.Response(200, json=chat_response("Answer: A", None)))
    (generation,) = backend.generate([request()], GenerationConfig(), SCORING)
    assert generation.tokens is None
    assert backend.capabilities().logprobs is False


def test_a_model_that_rejects_temperature_zero_gets_its_default():
    def handler(http_request: httpx2.Request) -> httpx2.Response:
        if "temperature" in json.loads(http_request.content):
            return httpx2.Response(400, json={"error": {
                "message": "Unsupported value: 'temperature' does not support 0 with this model.",
                "param": "temperature", "code": "unsupported_value"}})
        return httpx2.Response(200, json=ok_reply())

    backend, seen = mock_backend(handler)
    first, second = backend.generate([request(), request()], GenerationConfig(), SCORING)
    assert len(seen) == 3
    # What was sent is recorded with each generation, and the refusal with the server's words.
    assert first.sent is not None and second.sent is not None
    assert first.sent["temperature"] is None and first.sent["logprobs"] is True
    assert backend.dropped_parameters() == {
        "temperature": "HTTP 400: Unsupported value: 'temperature' does not support 0 with this model."}
    assert backend.decoding(GenerationConfig(), SCORING)["dropped"] == backend.dropped_parameters()


def test_prompt_scoring_through_tokenize_and_echo():
    def handler(http_request: httpx2.Request) -> httpx2.Response:
        body = json.loads(http_request.content)
        if http_request.url.path == "/tokenize":
            assert http_request.url.host == "server"  # beside /v1, not under it
            if "prompt" in body:
                return httpx2.Response(200, json={"tokens": {"A": [49], " A": [330], "\nA": [198, 49], "B": [50],
                                                             " B": [389], "\nB": [198, 50], "C": [51], " C": [340],
                                                             "\nC": [198, 51]}[body["prompt"]]})
            return httpx2.Response(200, json={"tokens": [1, 2, 3]})
        assert http_request.url.path == "/v1/completions"
        assert body["prompt"] == [[1, 2, 3, t] for t in (49, 330, 50, 389, 51, 340)]
        values = [-9.0, -1.0, -8.0, -2.0, -7.0, -0.5]
        return httpx2.Response(200, json={"choices": [{"index": i, "logprobs": {"token_logprobs": [None, -1, -1, v]}}
                                                      for i, v in enumerate(values)]})

    backend, seen = mock_backend(handler)
    first, second = backend.score_labels([request(), request(NURSE, "other")], SCORING)
    assert first["A"] == pytest.approx(logsumexp([-9.0, -1.0]))
    assert first["C"] == pytest.approx(logsumexp([-7.0, -0.5]))
    assert second == first
    # The label spellings are tokenized once per process: 9 + 2 x (tokenize + completions).
    assert len(seen) == 9 + 4


def test_prompt_scoring_is_unavailable_on_a_server_without_tokenize():
    backend, seen = mock_backend(lambda r: httpx2.Response(404, json={"detail": "Not Found"}))
    assert backend.score_labels([request()], SCORING) == [{"A": None, "B": None, "C": None}]
    assert backend.capabilities().prompt_scoring is False
    assert backend.score_labels([request()], SCORING) == [{"A": None, "B": None, "C": None}]
    assert len(seen) == 1


def test_nothing_is_sent_before_the_first_request_and_the_identity_is_asked_once():
    backend, seen = mock_backend(lambda r: httpx2.Response(200, json=ok_reply()))
    backend.render_prompt(request()), backend.capabilities(), backend.system_policy(), backend.address()
    backend.decoding(GenerationConfig(), SCORING), backend.dropped_parameters()
    assert seen == [] and backend.loaded is False
    backend.identity(), backend.identity()
    assert [(r.method, r.url.path) for r in seen] == [("GET", "/v1/models"), ("GET", "/metrics")]
    assert backend.loaded is False  # asking who the model is is not running it
    backend.generate([request()], GenerationConfig(), SCORING)
    assert backend.loaded is True and len(seen) == 3
    backend.close()


# -- identity and the decoding record against the stand-in server ---------------------------------------------


def standin_backend(server: StandInServer, **options: Any) -> OpenAIBackend:
    backend = OpenAIBackend(server.served_name, **{"model": server.served_name, "base_url": server.base_url,
                                                   "max_retries": 0, **options})
    backend.retry_base_delay = 0.001
    return backend


def test_identity_holds_what_the_server_reports_about_weights_and_process():
    with StandInServer(served_name="m", root="/models/X", max_model_len=4096, started=1796119200.0) as server:
        identity = standin_backend(server).identity()
        pinned = standin_backend(server, revision="r7").identity()
        server.swap(root="/models/X", started=1796119200.0 + 60)  # a restart of the same deployment
        restarted = standin_backend(server, revision="r7").identity()
    assert identity == {
        "backend": "openai", "model": "m", "base_url": server.base_url, "root": "/models/X",
        "max_model_len": 4096, "process_started": "2026-12-01T10:00:00.000Z", "revision": None,
        "identified_by": ["served name", "base_url", "/v1/models root", "/v1/models max_model_len",
                          "/metrics process start"]}
    # A pinned revision vouches for the weights: the process start is not asked, so a restart keeps the cache.
    assert pinned == {**identity, "process_started": None, "revision": "r7",
                      "identified_by": ["served name", "base_url", "/v1/models root", "/v1/models max_model_len",
                                        "revision"]}
    assert restarted == pinned


@pytest.mark.parametrize("change", ["root", "started", "max_model_len"])
def test_another_model_behind_the_same_name_and_url_is_another_identity(change):
    with StandInServer(served_name="m", root="/models/X", started=1796119200.0, created=1) as server:
        before = standin_backend(server).identity()
        server.created = 2  # vLLM writes the time of the request here: it must not count
        assert standin_backend(server).identity() == before
        server.swap(root="/models/Y" if change == "root" else "/models/X",
                    started=1796119200.0 + (60 if change == "started" else 0),
                    max_model_len=8192 if change == "max_model_len" else None)
        after = standin_backend(server).identity()
    assert after != before
    assert after["base_url"] == before["base_url"] and after["model"] == before["model"]


def test_a_server_without_models_list_or_metrics_is_identified_by_what_it_has():
    with StandInServer(served_name="m", serve_models=False, serve_metrics=False) as server:
        bare = standin_backend(server).identity()
    assert bare["identified_by"] == ["served name", "base_url"]
    assert (bare["root"], bare["max_model_len"], bare["process_started"]) == (None, None, None)
    with StandInServer(served_name="m", root=None, max_model_len=None, serve_metrics=False) as hosted_like:
        card_without_root = standin_backend(hosted_like, revision="2024-08-06").identity()
    assert card_without_root["identified_by"] == ["served name", "base_url", "revision"]


def test_an_unreachable_server_is_a_backend_error_naming_the_models_endpoint():
    with StandInServer() as server:
        base_url = server.base_url
    backend = OpenAIBackend("m", model="m", base_url=base_url, max_retries=1)
    backend.retry_base_delay = 0.001
    with pytest.raises(BackendError) as raised:
        backend.identity()
    message = str(raised.value)
    assert message.startswith("model 'm': cannot ask the server which model it serves: no answer after 2 tries")
    assert f"endpoint: {base_url}/models" in message and "last status: connection error" in message
    assert "Traceback" not in message


def test_identity_is_asked_once_even_from_many_threads():
    with StandInServer(latency=0.05) as server:
        backend = standin_backend(server)
        identities: list[dict[str, Any]] = []
        threads = [threading.Thread(target=lambda: identities.append(backend.identity())) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(server.requests_to("/v1/models")) == 1 and len(server.requests_to("/metrics")) == 1
    assert len(identities) == 8 and all(i == identities[0] for i in identities)
    assert backend.identity_requests == 2 and backend.http_requests == 0


def test_the_decoding_record_says_what_is_sent_and_what_was_refused(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)

    def refuse_with_the_key_in_the_message(recorded: RecordedRequest) -> tuple[int, dict[str, Any]] | None:
        if recorded.path == "/v1/chat/completions" and "temperature" in (recorded.body or {}):
            return 400, {"error": {"message": f"'temperature' is not supported (key {KEY})",
                                   "param": "temperature"}}
        return None

    asked = GenerationConfig(max_new_tokens=16, constrained_ranking=3)
    with StandInServer(served_name="m", inject=refuse_with_the_key_in_the_message) as server:
        backend = standin_backend(server)
        assert backend.decoding(asked, SCORING) == {
            "temperature": 0.0, "top_p": None, "max_tokens": 16, "stop": None, "logprobs": True,
            "top_logprobs": 20, "constrained_ranking": 3, "dropped": {}}
        assert backend.decoding(GenerationConfig(), None)["logprobs"] is False
        (generation,) = backend.generate([request()], asked, SCORING)
        bodies = [r.body for r in server.requests_to("/v1/chat/completions")]
    assert "temperature" in bodies[0] and "temperature" not in bodies[1]
    record = backend.decoding(asked, SCORING)
    assert record["temperature"] is None and set(record["dropped"]) == {"temperature"}
    assert record["dropped"]["temperature"].startswith("HTTP 400: 'temperature' is not supported")
    assert KEY not in json.dumps(record) and "[secret $OPENAI_API_KEY masked]" in record["dropped"]["temperature"]
    assert generation.sent == {name: value for name, value in record.items() if name != "dropped"}


def test_parameters_refused_in_an_earlier_run_are_not_sent():
    with StandInServer(served_name="m", reject_temperature=True) as server:
        backend = standin_backend(server)
        backend.learn_dropped_parameters({"temperature": "HTTP 400: refused", "seed": "not ours to drop"})
        assert backend.dropped_parameters() == {"temperature": "HTTP 400: refused"}
        backend.generate([request()], GenerationConfig(), SCORING)
        assert [("temperature" in (r.body or {})) for r in server.requests_to("/v1/chat/completions")] == [False]
        logprobs_refused = standin_backend(server)
        logprobs_refused.learn_dropped_parameters({"logprobs": "HTTP 400: refused"})
        assert logprobs_refused.capabilities().logprobs is False


# -- the stand-in server itself ----------------------------------------------------------------------------------


def test_the_stand_in_serves_models_metrics_and_chat_with_label_alternatives():
    with StandInServer(served_name="m", root="/models/X", answer=lambda messages: "Answer: C. Go now",
                       started=1796119200.0) as server:
        client = httpx2.Client(base_url=server.root_url)
        card = client.get("/v1/models").json()["data"][0]
        assert (card["id"], card["root"], card["max_model_len"]) == ("m", "/models/X", 2048)
        assert "process_start_time_seconds 1796119200.0" in client.get("/metrics").text
        reply = client.post("/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2,
            "logprobs": True, "top_logprobs": 20}, headers={"Authorization": "Bearer x"}).json()
        assert client.post("/v1/chat/completions", json={"model": "other", "messages": []}).status_code == 404
        assert client.get("/tokenize").status_code == 404
        client.close()
        assert server.chat_completions == 2
        assert server.requests_to("/v1/chat/completions")[0].headers["authorization"] == "Bearer x"
    choice = reply["choices"][0]
    assert choice["message"]["content"] == "Answer: C." and choice["finish_reason"] == "length"
    second = choice["logprobs"]["content"][1]
    assert second["token"] == " C." and len(second["top_logprobs"]) == 20
    assert {"A", " A", "B", " B", "C", " C"} <= {t["token"] for t in second["top_logprobs"]}
    assert sum(math.exp(t["logprob"]) for t in second["top_logprobs"]) < 1


def test_the_stand_in_counts_requests_in_flight_and_injects_faults():
    with StandInServer(latency=0.1, fail_status=503, fail_first=1, echo_headers=True,
                       answer=lambda messages: "B") as server:
        def ask() -> httpx2.Response:
            return httpx2.post(server.base_url + "/chat/completions", json={"model": "standin", "messages": []},
                               headers={"Authorization": "Bearer leaked"})
        threads = [threading.Thread(target=ask) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert server.max_in_flight >= 2 and server.chat_completions == 4
        assert ask().json()["choices"][0]["message"]["content"] == "B Bearer leaked"
        port = server.port
    with StandInServer(port=port, reject_temperature=True) as again:  # the same port, another model
        refused = httpx2.post(again.base_url + "/chat/completions",
                              json={"model": "standin", "messages": [], "temperature": 0})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "temperature"


# -- the declared openai version can run this backend ------------------------------------------------------------

# The first openai release whose client is built on httpx2 (2.x depends on httpx, with httpx2 only as an
# optional extra that its client does not use): read from the wheels' METADATA.
FIRST_OPENAI_ON_HTTPX2 = Version("3.0.0")


def test_the_declared_openai_lower_bound_installs_the_http_client_the_backend_imports():
    source = Path(openai_compat.__file__).read_text(encoding="utf-8")
    assert "import httpx2" in source  # what the transport imports; change the bound with it
    document = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    (declared,) = [Requirement(r) for r in document["project"]["dependencies"] if Requirement(r).name == "openai"]
    lower = [Version(spec.version) for spec in declared.specifier if spec.operator in (">=", "==", "~=")]
    assert lower and min(lower) >= FIRST_OPENAI_ON_HTTPX2, f"{declared} allows an openai without httpx2"
    installed = [Requirement(r) for r in importlib.metadata.requires("openai") or []]
    assert any(r.name == "httpx2" and r.marker is None for r in installed)
    assert declared.specifier.contains(importlib.metadata.version("openai"))


# -- through the plugin, against a loopback stand-in for a hosted model without log-probabilities ---------------


@pytest.mark.slow
def test_a_model_without_logprobs_reports_consistency_and_calibration_as_not_available(pytester, monkeypatch):
    repo = Path(__file__).resolve().parent.parent
    shutil.copytree(repo / "evals", pytester.path / "evals")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    # Answers as hosted reasoning models do: a 400 for `logprobs`, else a reply; no weights path.
    with StandInServer(served_name="reasoner", root=None, reject_logprobs=True,
                       answer=lambda messages: "Answer: C. Go to emergency care now.") as server:
        result = pytester.runpytest_subprocess(
            "evals", "-p", "no:cacheprovider", "-k", "triage", "--pe-limit", "2", "--pe-persona", "ed_nurse",
            "--pe-model", f"openai:reasoner@{server.base_url}",
            "--pe-dataset", f"triage={repo / 'fixtures/triage/vignettes.jsonl'}",
            "--pe-cache-dir", str(pytester.path / "cache"), "--pe-reports-dir", str(pytester.path / "reports"),
            timeout=300)
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), result.stdout.str()
    run_dir = pytester.path / "reports" / "latest"
    summary = json.loads((run_dir / "summary.json").read_text())
    cases = [json.loads(line) for line in (run_dir / "cases.jsonl").read_text().splitlines()]
    assert len(cases) == 3 * 4 and all(c["generated_label"] == "C" for c in cases)  # no_persona, placebo, ed_nurse
    assert all(c["label_probs"] is None and c["probs_source"] is None for c in cases)
    for row in summary["results"]:
        for name in ("consistency_rate", "expected_calibration_error", "brier_score"):
            assert row["metrics"][name] is None
            assert row["notes"][name] == NOT_AVAILABLE
        assert row["metrics"]["accuracy"] is not None
    probability_checks = [c for c in summary["checks"]
                          if c["bound"]["metric"] in ("consistency_rate", "expected_calibration_error")]
    assert probability_checks and all(c["status"] == "skipped" for c in probability_checks)
    assert "not available for this model" in result.stdout.str()
    # The first requests in flight were rejected and taught the backend; each was sent again without
    # logprobs, and so was everything after them, with the key.
    sent = server.requests_to("/v1/chat/completions")
    rejected = sum("logprobs" in (r.body or {}) for r in sent)
    assert 1 <= rejected <= len(cases)  # at most the first wave: every persona's requests go out together
    assert len(sent) == len(cases) + rejected
    assert {r.headers["authorization"] for r in server.requests} == {f"Bearer {KEY}"}
    assert KEY not in (run_dir / "summary.json").read_text() + (run_dir / "cases.jsonl").read_text()


# -- secrets that a server echoes into its answers --------------------------------------------------------------


@pytest.fixture
def no_registered_secrets(monkeypatch):
    """Secrets registered by other tests' backends stay out of these, and these' stay out of others."""
    from persona_eval import redaction

    monkeypatch.setattr(redaction, "_registered", {})


def test_an_answer_echoing_the_key_is_kept_masked_and_cached_without_it(tmp_path, monkeypatch,
                                                                      no_registered_secrets):
    from persona_eval.cache import ResultCache
    from persona_eval.runner import Runner

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    cache_path = tmp_path / "results.sqlite3"
    with StandInServer(served_name="m", echo_headers=True, answer=lambda messages: "Answer: B") as server:
        backend = standin_backend(server)
        with ResultCache(cache_path) as cache:
            (first,) = Runner(backend, cache).generate([request()], GenerationConfig(), SCORING)
        with ResultCache(cache_path) as cache:
            (again,) = Runner(backend, cache).generate([request()], GenerationConfig(), SCORING)
        assert server.requests_to("/v1/chat/completions")[0].headers["authorization"] == f"Bearer {KEY}"
    generation = first.generation
    assert generation.text == "Answer: B Bearer [secret $OPENAI_API_KEY masked]"
    assert generation.masked == ["OPENAI_API_KEY"]
    assert generation.tokens and "".join(token.token for token in generation.tokens) == generation.text
    span = find_triage_answer(generation.text, labels=["A", "B", "C"])
    probs, _ = label_distribution(generation, span, ["A", "B", "C"])
    assert span is not None and span.label == "B" and max(probs, key=probs.get) == "B"
    assert again.cached and again.generation.text == generation.text and again.generation.masked == ["OPENAI_API_KEY"]
    stored = b"".join(path.read_bytes() for path in tmp_path.glob("results.sqlite3*"))
    assert b"[secret $OPENAI_API_KEY masked]" in stored and KEY.encode() not in stored


def test_a_key_from_any_variable_split_over_tokens_is_masked_and_offsets_follow(monkeypatch, no_registered_secrets):
    monkeypatch.setenv("LLM_CREDENTIALS", KEY)  # not a name that looks secret: the backend says it is

    def echo(http_request: httpx2.Request) -> httpx2.Response:
        header = http_request.headers["authorization"]
        pieces = ["Bearer", " sk-test", "-0123", "456789abcdef", " Answer", ":", " A"]
        assert "".join(pieces) == header + " Answer: A"
        content = [entry(piece, -0.1, top(Answer=-0.1)) for piece in pieces[:-1]]
        content.append(entry(" A", -0.1, top(_A=-0.1, _B=-2.0, _C=-3.0)))
        return httpx2.Response(200, json=chat_response(header + " Answer: A", content))

    backend, _ = mock_backend(echo, api_key_env="LLM_CREDENTIALS")
    (generation,) = backend.generate([request()], GenerationConfig(), SCORING)
    placeholder = "[secret $LLM_CREDENTIALS masked]"
    assert generation.text == f"Bearer {placeholder} Answer: A" and generation.masked == ["LLM_CREDENTIALS"]
    assert generation.tokens is not None
    assert [token.token for token in generation.tokens] == ["Bearer", f" {placeholder}", "", "", " Answer", ":", " A"]
    assert all(generation.text.startswith(token.token, token.offset) for token in generation.tokens)
    assert generation.tokens[-1].offset == generation.text.rindex(" A")
    probs, _ = label_distribution(generation, find_triage_answer(generation.text, labels=["A", "B", "C"]),
                                  ["A", "B", "C"])
    assert probs is not None and max(probs, key=probs.get) == "A"
    assert not any(piece in json.dumps(generation.to_json()) for piece in ("-0123", "456789abcdef"))


def test_an_answer_without_a_secret_is_left_as_it_was(monkeypatch, no_registered_secrets):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    backend, _ = mock_backend(lambda r: httpx2.Response(200, json=ok_reply()))
    (generation,) = backend.generate([request()], GenerationConfig(), SCORING)
    assert generation.text == "Answer: A" and generation.masked == []
    assert [(token.token, token.offset) for token in generation.tokens or []] == [("Answer", 0), (":", 6), (" A", 7)]


def test_credentials_in_the_base_url_are_masked_as_written_and_decoded(no_registered_secrets):
    from persona_eval.redaction import mask

    OpenAIBackend("m", model="m", base_url="http://admin:pa%40ss-word-1@gpu-host:8000/v1")
    OpenAIBackend("t", model="t", base_url="https://tok_0123456789abcdef@proxy.example/v1")
    assert mask("http://admin:pa%40ss-word-1@gpu-host") == "http://admin:[secret base_url password masked]@gpu-host"
    assert mask("Basic pa@ss-word-1") == "Basic [secret base_url password masked]"
    assert mask("tok_0123456789abcdef") == "[secret base_url user masked]"


def test_a_backend_error_quoting_the_key_prints_it_masked(monkeypatch, no_registered_secrets):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    backend, _ = mock_backend(lambda r: httpx2.Response(200, text=f"<html>proxy saw Bearer {KEY}</html>"))
    with pytest.raises(BackendError) as raised:
        backend.generate([request()], GenerationConfig(), SCORING)
    assert "proxy saw Bearer [secret $OPENAI_API_KEY masked]" in str(raised.value)
    assert KEY not in str(raised.value)
    direct = BackendError(f"model 'm': echoed {KEY}", endpoint="http://server:8000/v1", status=f"HTTP 401 {KEY}")
    assert KEY not in f"{direct} {direct.endpoint} {direct.status}"


# -- timeout and retries from the command line; cancellation ----------------------------------------------


def test_timeout_and_retries_given_to_create_backend_override_the_models_file(tmp_path):
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  served:\n    backend: openai\n    model: m\n    base_url: http://gpu:8000/v1\n"
                      "    timeout: 30\n    max_retries: 2\n")
    from persona_eval.backends import load_models_file

    spec = load_models_file(models)["served"]
    backend = create_backend(spec, cache_dir=tmp_path, timeout=600, retries=0)
    assert (backend.timeout, backend.max_retries) == (600.0, 0)
    kept = create_backend(spec, cache_dir=tmp_path)
    assert (kept.timeout, kept.max_retries) == (30.0, 2)
    spec = parse_model_spec("openai:m@http://gpu:8000/v1")
    assert create_backend(spec, cache_dir=tmp_path, timeout=2.5).timeout == 2.5
    local = create_backend(parse_model_spec(f"hf:{tmp_path}"), cache_dir=tmp_path, timeout=5, retries=3)
    assert not hasattr(local, "timeout")  # a local model has neither: ignored


@pytest.mark.parametrize(("options", "message"), [
    ({"timeout": 0}, "timeout: expected a positive number of seconds, got 0"),
    ({"timeout": float("inf")}, "timeout: expected a positive number of seconds"),
    ({"timeout": True}, "timeout: expected a positive number of seconds"),
    ({"retries": -1}, "retries: expected a whole number >= 0, got -1"),
    ({"retries": 1.5}, "retries: expected a whole number >= 0"),
])
def test_bad_timeout_or_retries_is_a_config_error(tmp_path, options, message):
    import re

    with pytest.raises(ConfigError, match=re.escape(message)):
        create_backend(parse_model_spec("openai:m@http://gpu:8000/v1"), cache_dir=tmp_path, **options)


def test_a_cancelled_backend_sends_nothing_more():
    backend, seen = mock_backend(lambda http_request: httpx2.Response(200, json=ok_reply()))
    backend.generate([request()], GenerationConfig(), None)
    backend.cancel()
    assert backend.cancelled
    with pytest.raises(BackendError, match="cancelled") as raised:
        backend.generate([request()], GenerationConfig(), None)
    assert raised.value.endpoint == "http://server:8000/v1/chat/completions"
    assert len(seen) == 1


def test_describe_wait_counts_the_tries_that_failed_since_the_last_answer():
    replies = iter([503, 503, 200, 503, 503])

    def handler(http_request: httpx2.Request) -> httpx2.Response:
        status = next(replies)
        return httpx2.Response(status, json=ok_reply() if status == 200 else {"error": {"message": "busy"}})

    backend, _ = mock_backend(handler, max_retries=1, timeout=7)
    assert backend.describe_wait() == {"endpoint": "http://server:8000/v1", "timeout": 7.0, "retries": 1,
                                       "failed_in_a_row": 0, "last_failure": None}
    with pytest.raises(BackendError):
        backend.generate([request()], GenerationConfig(), None)
    assert (backend.describe_wait()["failed_in_a_row"], backend.describe_wait()["last_failure"]) == (2, "HTTP 503")
    backend.generate([request()], GenerationConfig(), None)
    assert backend.describe_wait()["failed_in_a_row"] == 0
    with pytest.raises(BackendError):
        backend.generate([request()], GenerationConfig(), None)


# -- reasoning replies: the trace apart from the content ---------------------------------------------------


def reasoning_response(reasoning: str | None, content: str | None, entries: list[dict[str, Any]] | None,
                       *, field: str = "reasoning_content", finish: str = "stop") -> dict[str, Any]:
    data = chat_response(content or "", entries, finish)
    data["choices"][0]["message"] = {"role": "assistant", field: reasoning, "content": content}
    return data


def answer_entries(pieces: list[str]) -> list[dict[str, Any]]:
    """Tokens whose letter pieces (" A", " C") put their own label first, the others a neutral token."""
    listed = []
    for piece in pieces:
        letter = piece.strip()
        scores = {f"_{label}": (-0.1 if label == letter else -3.0) for label in "ABC"}
        listed.append(entry(piece, -0.1, top(**scores) if letter in "ABC" and letter else top(x=-0.1, **scores)))
    return listed


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_a_trace_returned_apart_is_kept_before_the_content_and_the_letter_is_read_in_the_content(field):
    content_pieces = ["\n\n", "Answer", ":", " C"]
    generation = parse_chat_response(
        reasoning_response("Maybe A, a mild case?", "".join(content_pieces), answer_entries(content_pieces),
                           field=field), SCORING)
    assert generation.text == "<think>Maybe A, a mild case?</think>\n\n\n\nAnswer: C"
    assert split_reasoning(generation.text) == ("Maybe A, a mild case?", "Answer: C")
    span = find_triage_answer(generation.text)
    assert span is not None and span.label == "C"
    assert generation.tokens is not None
    assert all(generation.text.startswith(token.token, token.offset) for token in generation.tokens)
    assert generation.tokens[-1].offset == generation.text.rindex(" C")
    probs, _ = label_distribution(generation, span, ["A", "B", "C"])
    assert probs is not None and max(probs, key=probs.get) == "C"


def test_logprobs_that_list_the_trace_tokens_too_are_aligned_on_the_content():
    # vLLM lists every generated token, the trace's (here with a draft letter " A") included, and its end.
    trace_pieces = ["Maybe", " A", ",", " mild", "?", "</think>"]
    content_pieces = ["\n\n", "Answer", ":", " C"]
    entries = [*answer_entries(trace_pieces + content_pieces), entry("<|im_end|>", -0.01, [])]
    generation = parse_chat_response(
        reasoning_response("Maybe A, mild?", "".join(content_pieces), entries), SCORING)
    assert generation.tokens is not None
    assert [token.token for token in generation.tokens] == content_pieces
    assert all(generation.text.startswith(token.token, token.offset) for token in generation.tokens)
    span = find_triage_answer(generation.text)
    probs, _ = label_distribution(generation, span, ["A", "B", "C"])
    assert span is not None and probs is not None and max(probs, key=probs.get) == "C"


def test_a_token_holding_the_end_of_the_trace_and_the_start_of_the_content_is_cut_to_its_content():
    entries = answer_entries(["Mild", "</think>\n\nAnswer", ":", " B"])
    generation = parse_chat_response(reasoning_response("Mild", "\n\nAnswer: B", entries), SCORING)
    assert generation.tokens is not None
    assert [token.token for token in generation.tokens] == ["\n\nAnswer", ":", " B"]
    assert generation.tokens[0].offset == generation.text.index("\n\nAnswer")


def test_logprobs_that_do_not_spell_the_content_give_no_token_scores():
    entries = answer_entries(["Something", " else"])
    generation = parse_chat_response(reasoning_response("Mild", "Answer: B", entries), SCORING)
    assert generation.tokens == []
    span = find_triage_answer(generation.text)
    assert span is not None and label_distribution(generation, span, ["A", "B", "C"]) == (None, False)


def test_a_trace_cut_at_the_budget_stays_unfinished_and_has_no_answer():
    generation = parse_chat_response(reasoning_response("Chest pain, so C or", None, None, finish="length"),
                                     SCORING)
    assert generation.text == "<think>Chest pain, so C or"
    assert split_reasoning(generation.text) == ("Chest pain, so C or", "")
    assert find_triage_answer(generation.text) is None and generation.finish_reason == "length"
    # A finished trace with nothing after it is closed: the model ended its turn.
    closed = parse_chat_response(reasoning_response("Nothing to add.", None, None), SCORING)
    assert closed.text == "<think>Nothing to add.</think>\n\n"


def test_a_message_without_a_trace_or_with_an_empty_one_is_read_as_before():
    for reasoning in (None, "", "  \n"):
        generation = parse_chat_response(reasoning_response(reasoning, "Answer: A", None), SCORING)
        assert generation.text == "Answer: A"


@pytest.mark.parametrize("style", ["reasoning_content", "reasoning", "headings", "tags"])
def test_the_stand_in_returns_reasoning_replies_that_the_backend_reads(style):
    with StandInServer(served_name="m", reasoning=style, think=lambda messages: "Draft: A, then weigh it.",
                       answer=lambda messages: "Answer: C") as server:
        (generation,) = standin_backend(server).generate([request()], GenerationConfig(max_new_tokens=64), SCORING)
        message = server.respond(RecordedRequest("POST", "/v1/chat/completions", {}, {
            "model": "m", "messages": [], "logprobs": True, "top_logprobs": 5}))[1]["choices"][0]["message"]
    assert split_reasoning(generation.text) == ("Draft: A, then weigh it.", "Answer: C")
    if style in ("reasoning_content", "reasoning"):
        assert message[style] == "Draft: A, then weigh it." and "think" not in message["content"]
    else:
        assert "Draft" in message["content"]
    span = find_triage_answer(generation.text)
    probs, _ = label_distribution(generation, span, ["A", "B", "C"])
    assert span is not None and span.label == "C" and probs is not None and max(probs, key=probs.get) == "C"


def test_the_stand_in_cuts_a_reasoning_reply_at_the_budget_inside_the_trace():
    with StandInServer(served_name="m", reasoning="reasoning_content", answer=lambda messages: "Answer: C",
                       think=lambda messages: "one two three four five six") as server:
        (generation,) = standin_backend(server).generate([request()], GenerationConfig(max_new_tokens=3), SCORING)
    assert generation.text == "<think>one two three" and generation.finish_reason == "length"
    assert find_triage_answer(generation.text) is None


def test_a_secret_in_the_trace_is_masked_too(monkeypatch, no_registered_secrets):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with StandInServer(served_name="m", reasoning="reasoning_content", answer=lambda messages: "Answer: B",
                       think=lambda messages: f"The header said {KEY}; anyway B.") as server:
        (generation,) = standin_backend(server).generate([request()], GenerationConfig(max_new_tokens=64), SCORING)
    assert KEY not in generation.text and generation.masked == ["OPENAI_API_KEY"]
    trace, final = split_reasoning(generation.text)
    assert trace == "The header said [secret $OPENAI_API_KEY masked]; anyway B." and final == "Answer: B"
    assert generation.tokens and all(generation.text.startswith(t.token, t.offset) for t in generation.tokens)
    probs, _ = label_distribution(generation, find_triage_answer(generation.text), ["A", "B", "C"])
    assert probs is not None and max(probs, key=probs.get) == "B"


def test_prompt_tokens_are_counted_by_the_server_s_tokenize_and_not_as_inference():
    def handler(http_request: httpx2.Request) -> httpx2.Response:
        body = json.loads(http_request.content)
        assert http_request.url.path == "/tokenize" and body["add_generation_prompt"] is True
        assert body["messages"][-1] == {"role": "user", "content": body["messages"][-1]["content"]}
        return httpx2.Response(200, json={"tokens": list(range(len(body["messages"][-1]["content"])))})

    backend, seen = mock_backend(handler)
    assert backend.count_prompt_tokens([request(text="four"), request(text="sixsix")]) == [4, 6]
    assert len(seen) == 2 and not backend.loaded


def test_a_server_without_tokenize_counts_nothing_and_is_asked_once():
    backend, seen = mock_backend(lambda r: httpx2.Response(404, json={"detail": "Not Found"}))
    assert backend.count_prompt_tokens([request(), request()]) == [None, None]
    assert backend.count_prompt_tokens([request()]) == [None]
    assert len(seen) == 1
    hosted = OpenAIBackend("m", model="gpt-4o")
    assert hosted.count_prompt_tokens([request()]) == [None]  # the OpenAI API is never asked
