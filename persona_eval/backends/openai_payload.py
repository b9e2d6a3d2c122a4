"""The pure half of the OpenAI-compatible backend: request bodies built and response bodies read as plain
dicts, tested without a network (persona_eval.backends.openai_compat is the transport)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from persona_eval.backends.base import (
    Generation,
    GenerationConfig,
    LabelScoring,
    TokenScores,
    logsumexp,
)
from persona_eval.errors import BackendError, ConfigError
from persona_eval.prompts import RenderedMessages

__all__ = [
    "REASONING_FIELDS",
    "build_chat_payload",
    "build_label_tokenize_payload",
    "build_prompt_scoring_payload",
    "build_tokenize_payload",
    "decoding_sent",
    "parse_chat_response",
    "parse_model_card",
    "parse_prefix_cache",
    "parse_process_start",
    "parse_prompt_scoring_response",
    "parse_tokenize_response",
    "ranking_schema",
    "shorten",
    "template_switches",
    "transcript",
    "with_reasoning",
]

ERROR_TEXT_LIMIT = 300  # characters of a server's reply quoted in an error message
_PROCESS_START = re.compile(r"^process_start_time_seconds(?:\{[^}]*\})?\s+(\S+)\s*$", re.MULTILINE)


def transcript(request: RenderedMessages) -> str:
    """A readable transcript of the chat messages, ending with the opened assistant turn.

    >>> from persona_eval.prompts import RenderedMessages
    >>> print(transcript(RenderedMessages((("system", ""), ("user", "Hi")), "")))
    <|system|>
    <BLANKLINE>
    <|user|>
    Hi
    <|assistant|>
    <BLANKLINE>
    """
    return "".join(f"<|{role}|>\n{content}\n" for role, content in request.messages) + "<|assistant|>\n"


def ranking_schema(k: int) -> dict[str, Any]:
    """The JSON schema of {"ranking": [k integers in 1..k]} (uniqueness is checked by the caller)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"constrained_ranking must be a positive integer, got {k!r}")
    return {
        "type": "object",
        "properties": {"ranking": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": k},
                                   "minItems": k, "maxItems": k}},
        "required": ["ranking"],
        "additionalProperties": False,
    }


def template_switches(reasoning: bool | None) -> dict[str, Any]:
    """What a request sends to switch a self-served reasoning model's thinking on or off (vLLM's and
    SGLang's ``chat_template_kwargs``, the chat template's ``enable_thinking``); nothing for None.

    >>> template_switches(False)
    {'chat_template_kwargs': {'enable_thinking': False}}
    """
    return {} if reasoning is None else {"chat_template_kwargs": {"enable_thinking": reasoning}}


def build_chat_payload(request: RenderedMessages, config: GenerationConfig, scoring: LabelScoring | None,
                       *, model: str, reasoning: bool | None = None) -> dict[str, Any]:
    """The body of a chat completion for `request`; with `scoring`, log-probabilities are asked for;
    `reasoning`: see :func:`template_switches`."""
    payload: dict[str, Any] = {
        "model": model,
        "messages": request.as_dicts(),
        "max_completion_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        **template_switches(reasoning),
    }
    if config.stop:
        payload["stop"] = list(config.stop)
    if scoring is not None:
        payload["logprobs"] = True
        payload["top_logprobs"] = scoring.top_logprobs
    if config.constrained_ranking is not None:
        payload["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "ranking", "schema": ranking_schema(config.constrained_ranking), "strict": True}}
    return payload


def decoding_sent(payload: Mapping[str, Any], config: GenerationConfig) -> dict[str, Any]:
    """The decoding record (see :func:`~persona_eval.backends.base.requested_decoding`, without
    ``dropped``) of a chat completion body as it is sent."""
    sent = {
        "temperature": payload.get("temperature"),
        "top_p": payload.get("top_p"),
        "max_tokens": payload.get("max_completion_tokens"),
        "stop": payload.get("stop"),
        "logprobs": bool(payload.get("logprobs", False)),
        "top_logprobs": payload.get("top_logprobs"),
        "constrained_ranking": config.constrained_ranking if "response_format" in payload else None,
    }
    if "chat_template_kwargs" in payload:  # only when sent: the keys of runs without it stay as they were
        sent["chat_template_kwargs"] = payload["chat_template_kwargs"]
    return sent


def parse_model_card(data: Any, model: str) -> dict[str, Any] | None:
    """The card of `model` in a /v1/models body, or None when it is not listed there."""
    cards = data.get("data") if isinstance(data, Mapping) else None
    if not isinstance(cards, list):
        return None
    for card in cards:
        if isinstance(card, Mapping) and card.get("id") == model:
            return dict(card)
    return None


_PREFIX_CACHE = re.compile(r"^vllm:prefix_cache_(queries|hits)(?:_total)?(?:\{[^}]*\})?\s+(\S+)\s*$", re.MULTILINE)


def parse_prefix_cache(metrics: str) -> tuple[float, float] | None:
    """vLLM's prefix-cache counters in a Prometheus text body, summed over its engines: (prompt tokens
    looked up, tokens found cached); None when the server reports none.

    >>> parse_prefix_cache('vllm:prefix_cache_queries_total{engine="0"} 200.0\\n'
    ...                    'vllm:prefix_cache_hits_total{engine="0"} 150.0\\n')
    (200.0, 150.0)
    >>> parse_prefix_cache("process_start_time_seconds 1.7e+09\\n") is None
    True
    """
    totals = {"queries": 0.0, "hits": 0.0}
    seen = False
    for kind, value in _PREFIX_CACHE.findall(metrics):
        try:
            totals[kind] += float(value)
        except ValueError:
            continue
        seen = True
    return (totals["queries"], totals["hits"]) if seen else None


def parse_process_start(metrics: str) -> str | None:
    """``process_start_time_seconds`` of a Prometheus text body, as an ISO 8601 UTC time, or None.

    >>> parse_process_start("# TYPE process_start_time_seconds gauge\\nprocess_start_time_seconds 1.7961192e+09\\n")
    '2026-12-01T10:00:00.000Z'
    """
    match = _PROCESS_START.search(metrics)
    if match is None:
        return None
    try:
        seconds = float(match.group(1))
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _first_choice(data: Mapping[str, Any], what: str) -> Mapping[str, Any]:
    choices = data.get("choices") if isinstance(data, Mapping) else None
    if not choices or not isinstance(choices[0], Mapping):
        raise BackendError(f"the {what} response has no choices: {shorten(json.dumps(data, default=str))}")
    return choices[0]


def _usage(data: Mapping[str, Any]) -> dict[str, int]:
    usage = data.get("usage") or {}
    return {name: int(usage[name]) for name in ("prompt_tokens", "completion_tokens")
            if isinstance(usage.get(name), int)}


def _token_bytes(entry: Mapping[str, Any]) -> bytes:
    raw = entry.get("bytes")
    if isinstance(raw, list):
        return bytes(raw)
    return str(entry.get("token", "")).encode("utf-8")


def _spelling_labels(scoring: LabelScoring) -> dict[str, str]:
    """Each spelling of a label ("A", " A", "\nA") -> the label."""
    return {spelling: label for label in reversed(scoring.labels) for spelling in scoring.variants(label)}


def _label_scores(top: Sequence[Mapping[str, Any]], labels: Sequence[str], spelling_labels: Mapping[str, str]
                  ) -> dict[str, float | None]:
    found: dict[str, list[float]] = {}
    for alternative in top:
        label = spelling_labels.get(alternative.get("token"))  # type: ignore[arg-type]
        if label is not None:
            found.setdefault(label, []).append(float(alternative["logprob"]))
    return {label: logsumexp(found[label]) if label in found else None for label in labels}


def _token_scores(content: Sequence[Mapping[str, Any]], text: str, scoring: LabelScoring) -> list[TokenScores]:
    """TokenScores for the tokens whose text makes up `text`, at their character offsets.

    Offsets come from the tokens' bytes (a character split over two tokens starts where its first byte
    is). A token that does not continue the text, such as the end-of-turn token vLLM lists after the
    last one, is left out, as the transformers backend leaves out its stop token."""
    spelling_labels = _spelling_labels(scoring)
    tokens: list[TokenScores] = []
    consumed = b""
    for entry in content:
        piece = _token_bytes(entry)
        extended = consumed + piece
        if not text.startswith(extended.decode("utf-8", errors="ignore")):
            continue
        top = entry.get("top_logprobs") or []
        floor = min((float(t["logprob"]) for t in top), default=None)
        tokens.append(TokenScores(offset=len(consumed.decode("utf-8", errors="replace")),
                                  token=piece.decode("utf-8", errors="replace"),
                                  label_logprobs=_label_scores(top, scoring.labels, spelling_labels), floor=floor))
        consumed = extended
    return tokens


# The fields in which servers with a reasoning parser return the trace: vLLM's older name, then its newer.
REASONING_FIELDS = ("reasoning_content", "reasoning")


def with_reasoning(reasoning: str, content: str, *, finished: bool = True) -> str:
    """The generated text of a reply whose trace came apart from its content: ``<think>TRACE</think>``, a
    blank line, then the content as it was sent, which :func:`persona_eval.parsing.split_reasoning` reads
    back. Not `finished` (cut at the token budget before the trace was closed): the closing tag is left
    out, so that the reply reads as the unfinished reasoning it is.

    >>> with_reasoning(" Sweating with chest pain. ", "Answer: C")
    '<think>Sweating with chest pain.</think>\\n\\nAnswer: C'
    """
    return f"<think>{reasoning.strip()}</think>\n\n{content}" if finished else f"<think>{reasoning.strip()}"


def _reasoning(message: Mapping[str, Any]) -> str | None:
    for name in REASONING_FIELDS:
        value = message.get(name)
        if isinstance(value, str) and value.strip():
            return value
    return None


def _content_entries(entries: Sequence[Mapping[str, Any]], content: str) -> list[Mapping[str, Any]]:
    """The log-probability entries of the tokens that spell `content`.

    vLLM lists every generated token, the trace's too, though its reasoning parser returns the trace apart:
    then the content is the last stretch of the tokens that ends where a token ends (the end-of-turn token
    may follow), and a token that holds both the end of the trace and the start of the content is cut to
    its content part. A server that lists the content's tokens alone gives them back as they are; one
    whose tokens do not spell the content gives none."""
    pieces = [_token_bytes(entry) for entry in entries]
    raw, target = b"".join(pieces), content.encode("utf-8")
    if raw.startswith(target):
        return list(entries)
    starts, position = [], 0
    for piece in pieces:
        starts.append(position)
        position += len(piece)
    ends = {start + len(piece) for start, piece in zip(starts, pieces, strict=True)}
    begin = raw.rfind(target)
    while begin > 0 and begin + len(target) not in ends:
        begin = raw.rfind(target, 0, begin + len(target) - 1)
    if begin < 0:
        return []
    kept: list[Mapping[str, Any]] = []
    for entry, start, piece in zip(entries, starts, pieces, strict=True):
        if start >= begin:
            kept.append(entry)
        elif start + len(piece) > begin:
            part = piece[begin - start:]
            kept.append({**entry, "token": part.decode("utf-8", errors="replace"), "bytes": list(part)})
    return kept


def parse_chat_response(data: Mapping[str, Any], scoring: LabelScoring | None) -> Generation:
    """The Generation in a chat completion body. ``tokens`` is None without `scoring` or when the
    server sent no log-probabilities.

    A message that carries its reasoning trace apart (``reasoning_content``, or ``reasoning`` in newer
    vLLM) keeps it: the text is :func:`with_reasoning` of the trace and the content, and the tokens'
    offsets are those of the content's tokens in that text, so the answer letter is read where the content
    holds it."""
    choice = _first_choice(data, "chat completion")
    message = choice.get("message") or {}
    content = message.get("content") or ""
    reasoning = _reasoning(message)
    finish_reason = choice.get("finish_reason")
    text = content if reasoning is None else with_reasoning(
        reasoning, content, finished=bool(content) or finish_reason != "length")
    tokens = None
    logprobs = choice.get("logprobs")
    if scoring is not None and isinstance(logprobs, Mapping) and logprobs.get("content") is not None:
        entries = logprobs["content"]
        if reasoning is None:
            tokens = _token_scores(entries, text, scoring)
        else:
            shift = len(text) - len(content)
            tokens = _token_scores(_content_entries(entries, content), content, scoring)
            for token in tokens:
                token.offset += shift
    return Generation(text=text, tokens=tokens, finish_reason=finish_reason, usage=_usage(data))


def build_tokenize_payload(request: RenderedMessages, scoring: LabelScoring, *, model: str,
                           reasoning: bool | None = None) -> dict[str, Any]:
    """The body of vLLM's /tokenize for the prompt of `request` with the assistant turn opened and
    ``scoring.answer_prefix`` written: the tokens the label is read after (the chat template switched as
    the chat completion switches it: `reasoning`)."""
    return {
        "model": model,
        "messages": [*request.as_dicts(), {"role": "assistant", "content": scoring.answer_prefix}],
        "add_generation_prompt": False,
        "continue_final_message": True,
        "add_special_tokens": False,
        **template_switches(reasoning),
    }


def build_label_tokenize_payload(spelling: str, *, model: str) -> dict[str, Any]:
    """The body of vLLM's /tokenize for one label spelling on its own (as the transformers backend
    encodes it)."""
    return {"model": model, "prompt": spelling, "add_special_tokens": False}


def parse_tokenize_response(data: Mapping[str, Any]) -> list[int]:
    tokens = data.get("tokens") if isinstance(data, Mapping) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise BackendError(f"the /tokenize response has no token list: {shorten(json.dumps(data, default=str))}")
    return tokens


def build_prompt_scoring_payload(prompt_tokens: Sequence[int], label_tokens: Mapping[str, Sequence[int]],
                                 *, model: str) -> dict[str, Any]:
    """The body of one completions call that scores every label token after `prompt_tokens`: one prompt
    per (label, token), in label order, each echoed with its log-probabilities and nothing generated."""
    prompts = [[*prompt_tokens, token] for label in label_tokens for token in label_tokens[label]]
    return {"model": model, "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0}


def parse_prompt_scoring_response(data: Mapping[str, Any], label_tokens: Mapping[str, Sequence[int]]
                                  ) -> dict[str, float | None]:
    """Each label's log-probability (logsumexp over its tokens) from the completions body that
    :func:`build_prompt_scoring_payload` asked for; None for a label with no single-token spelling."""
    choices = data.get("choices") if isinstance(data, Mapping) else None
    expected = sum(len(tokens) for tokens in label_tokens.values())
    if not isinstance(choices, list) or len(choices) != expected:
        raise BackendError(f"the prompt-scoring response has {len(choices) if isinstance(choices, list) else 'no'} "
                           f"choices, expected {expected}")
    ordered = sorted(choices, key=lambda c: int(c.get("index", 0)))
    values: list[float] = []
    for choice in ordered:
        logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or []
        if not logprobs or logprobs[-1] is None:
            raise BackendError("the prompt-scoring response has no log-probability for the label token "
                               "(does the server support echo with logprobs?)")
        values.append(float(logprobs[-1]))
    scores: dict[str, float | None] = {}
    position = 0
    for label, tokens in label_tokens.items():
        found = values[position:position + len(tokens)]
        position += len(tokens)
        scores[label] = logsumexp(found) if found else None
    return scores


def shorten(text: str) -> str:
    """`text` cut to ERROR_TEXT_LIMIT characters, for an error message that quotes a reply."""
    return text if len(text) <= ERROR_TEXT_LIMIT else text[:ERROR_TEXT_LIMIT] + "..."
