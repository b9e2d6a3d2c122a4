"""Any OpenAI-compatible endpoint (a vLLM server, a hosted API) through the openai client.

Two halves. The pure half (persona_eval.backends.openai_payload) builds request bodies and reads response
bodies (plain dicts), so it is tested without a network. The transport, here, is the openai client with
its own retries turned off: retries are bounded, with exponential backoff and jitter, on timeouts,
connection errors, HTTP 429 and 5xx; after the last try a :class:`~persona_eval.errors.BackendError`
names the endpoint and the last status.

What the backend sends and reads:

* **Generation**: one chat completion per request (``batch_size`` 1; the runner keeps
  ``max_in_flight`` requests in flight so that the server batches them: by default
  SERVED_MAX_IN_FLIGHT, 256, for a self-served model, a ``base_url``, and HOSTED_MAX_IN_FLIGHT, 32, for
  the hosted OpenAI API). Greedy, at most
  ``max_new_tokens`` (``max_completion_tokens``, which vLLM and reasoning models both accept). With
  label scoring it asks for ``logprobs`` and ``top_logprobs`` and reads, at every generated token, each
  label's log-probability (logsumexp over the label's spellings found in the top-k; None when none is
  there) and the lowest top-k log-probability, the ``floor`` for an absent label.
* **Reasoning replies**: a server with a reasoning parser returns the trace apart from the answer
  (``reasoning_content``, in newer vLLM ``reasoning``). The generation keeps it: its text is
  ``<think>TRACE</think>``, a blank line and the content (the trace unclosed when the budget ran out
  inside it), which persona_eval.parsing reads as any inline trace, and the token scores are those of the
  content's tokens at their place in that text (vLLM lists the trace's tokens too; they are left out).
  Secrets are masked in the trace as in the answer, and the cache holds the text as recorded.
* **The prompt-boundary fallback** (``score_labels``), exact, not top-k: the server's own tokenizer
  renders the chat with the assistant turn opened and the answer prefix written (vLLM's ``/tokenize``
  with ``continue_final_message``), each single-token label spelling is appended, and one completions
  call with ``echo`` + ``logprobs`` + ``max_tokens: 0`` returns the log-probability of that last token.
  This is what the transformers backend computes from its logits. A server without ``/tokenize`` or
  prompt echo (hosted APIs) has no fallback: its scores are None ("unavailable"), and
  ``capabilities().prompt_scoring`` turns False. The OpenAI API itself (no ``base_url``) is never asked.
* **No log-probabilities** (many hosted reasoning models): set ``logprobs: false`` in the models file.
  Without it the backend finds out by itself: a 400 that names the ``logprobs`` parameter, or a reply
  without a ``logprobs`` object, turns ``capabilities().logprobs`` False for the rest of the process and
  the request is sent again without them; the generation then has no token scores, and the evaluation
  reports consistency and calibration as not available. A 400 naming ``temperature`` (models that only
  sample at their default) drops it the same way. Each dropped parameter is kept with its reason (the
  server's message, redacted; :meth:`OpenAIBackend.dropped_parameters`), every generation records what
  was actually sent for it (``Generation.sent``, which the runner's cache key follows), and
  :meth:`OpenAIBackend.decoding` reports it.
* **Constrained ranking** (``GenerationConfig.constrained_ranking = k``): ``response_format`` with a
  JSON schema {"ranking": k integers in 1..k} (vLLM: guided decoding). vLLM's grammar engine rejects
  ``uniqueItems``, so uniqueness is left to the caller's validation, as GenerationConfig says.

**Identity**: the served name and the public base URL say where a model is, not which model it is (a
blue/green redeploy keeps both). So ``identity()`` also holds what the server reports about the weights
and the process serving them, asked once per process on first need: ``GET /v1/models`` (the card of
the served name: ``root``, the weights path or repository, and ``max_model_len``) and ``GET /metrics``
at the server root (``process_start_time_seconds``, as ``process_started`` in UTC), plus the models
file's ``revision``, which pins what a hosted API cannot tell. With a pinned revision the process start
is not asked: the revision vouches for the weights, so a restarted server keeps its cached answers;
without one a restart counts as a new deployment. ``identified_by`` lists what it rests on. The
card's ``created`` is left out: vLLM writes the time of the request there, which would make every
process a different model. A server without /v1/models or /metrics is identified by what it
has; one that cannot be reached is a BackendError naming the endpoint. The OpenAI API itself (no
``base_url``) is not asked: it reports neither.

**Prompt lengths** (``count_prompt_tokens``): a server with ``/tokenize`` (vLLM) counts each prompt with
its own chat template, so that a default answer budget can be fitted to what its context leaves
(persona_eval.lengths); a server without it, and the OpenAI API, count nothing (None), and the prompts are
judged by their characters. The counting requests are not inference requests (``loaded`` stays False).

``render_prompt`` is a readable transcript of the messages, not the server's template: the server
renders the real one, and the transcript is what the cache key and cases.jsonl hold (stable whether or
not a tokenizer is at hand). The API key is read from the environment when the client is first
needed and lives in that client only: it is never in ``identity()``, a result, an error or a log line.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import date
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from persona_eval.backends.base import Capabilities, Generation, GenerationConfig, LabelScoring, requested_decoding
from persona_eval.backends.openai_payload import (
    build_chat_payload,
    build_label_tokenize_payload,
    build_prompt_scoring_payload,
    build_tokenize_payload,
    decoding_sent,
    parse_chat_response,
    parse_model_card,
    parse_prefix_cache,
    parse_process_start,
    parse_prompt_scoring_response,
    parse_tokenize_response,
    shorten,
    template_switches,
    transcript,
)
from persona_eval.errors import BackendError, ConfigError, MissingDependencyError
from persona_eval.pool import AdaptiveLimit, Slot
from persona_eval.prompts import RenderedMessages, SystemPolicy
from persona_eval.redaction import find_secrets, mask, mask_found, placeholder, register_secret

__all__ = ["HOSTED_MAX_IN_FLIGHT", "OPENAI_API_BASE", "SERVED_MAX_IN_FLIGHT", "OpenAIBackend"]

OPENAI_API_BASE = "https://api.openai.com/v1"
# Requests in flight when the models file gives no max_in_flight: a self-served model (a base_url, e.g. vLLM on
# a GPU) batches hundreds of sequences at once; the hosted OpenAI API rate-limits an account well before that.
SERVED_MAX_IN_FLIGHT = 256
HOSTED_MAX_IN_FLIGHT = 32
# A local server needs no key, but the openai client refuses to start without one.
PLACEHOLDER_KEY = "EMPTY"
BASELINE_SYSTEM = {
    # SmolLM2's and Qwen2.5's templates insert a default system prompt when none is sent: an empty one
    # keeps the baseline free of an identity that no other condition has (see persona_eval.prompts).
    "empty": SystemPolicy(system_role_supported=True, baseline_empty_system=True),
    "omit": SystemPolicy(system_role_supported=True, baseline_empty_system=False),
}
_RETRY_STATUSES = frozenset({408, 409, 429})
# What a server says when it takes fewer requests at once than it is sent: a rate limit, an overload.
_OVERLOADED = frozenset({429, 503})
# What a server without /tokenize or prompt echo answers a prompt-scoring request.
_NO_SCORING = frozenset({400, 404, 405, 422, 501})
# How long an inference request refused with 429 keeps being retried (with backoff, honouring Retry-After)
# before it fails: a hosted API's rate limit slows a run down; it should not fail it.
RATE_LIMIT_PATIENCE = 600.0
# The parameters a server may refuse that the backend then stops sending (the request still means the
# same thing to the evaluation: greedy where the model allows it, log-probabilities where it gives them).
DROPPABLE = ("temperature", "logprobs")


def _public_url(url: str) -> str:
    """`url` without user:password@, so it can go into an identity or an error message."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _register_url_credentials(url: str | None) -> None:
    """Mask the password in `url` (or its user name, when it holds a token alone) wherever it appears:
    a server's error text or an echoed request may quote it, as written or percent-decoded."""
    if url is None:
        return
    parts = urlsplit(url)
    for written, name in ((parts.password, "base_url password"),
                          (parts.username if parts.password is None else None, "base_url user")):
        if written:
            register_secret(written, name)
            register_secret(unquote(written), name)


def _mask_generation(generation: Generation) -> None:
    """Mask the secrets in `generation`'s text and tokens in place, and record their names.

    A token's offset moves with the text before it. A token that overlaps a secret (a tokenizer splits
    a key into many) is cut to what remains of it in the masked text: the first holds the placeholder,
    the others only what lies outside the secret, so that no piece of a key survives in the token list
    and the tokens still spell the masked text."""
    spans = find_secrets(generation.text)
    if not spans:
        return
    original = generation.text
    generation.text, generation.masked = mask_found(original)

    def moved(offset: int) -> int:
        shift = 0
        for start, end, name in spans:
            if offset <= start:
                break
            replaced = len(placeholder(name)) - (end - start)
            if offset < end:
                return end + shift + replaced  # inside a secret: just after its placeholder
            shift += replaced
        return offset + shift

    tokens = generation.tokens or []
    # A token ends where the next begins; the last where its own text ends.
    ends = [token.offset for token in tokens[1:]]
    if tokens:
        ends.append(min(len(original), tokens[-1].offset + len(tokens[-1].token)))
    for token, end in zip(tokens, ends, strict=True):
        start = moved(token.offset)
        token.token = generation.text[start:moved(end)]
        token.offset = start


# -- the transport ---------------------------------------------------------------------------------------


class _Rejected(Exception):
    """A response that retrying will not fix (400, 401, 404, ...)."""

    def __init__(self, status: int, message: str, param: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def names(self, parameter: str) -> bool:
        return self.status == 400 and (self.param == parameter or f"'{parameter}'" in self.message
                                       or f"`{parameter}`" in self.message)


class OpenAIBackend:
    """A model behind an OpenAI-compatible HTTP API (see the module docstring)."""

    def __init__(self, name: str, *, model: str, base_url: str | None = None,
                 base_urls: Sequence[str] | None = None, api_key_env: str = "OPENAI_API_KEY",
                 max_in_flight: int | None = None, timeout: float = 120.0, max_retries: int = 5, logprobs: bool = True,
                 prompt_scoring: bool = True, baseline_system: str = "empty", revision: object = None,
                 reasoning: bool | None = None, http_client: Any = None) -> None:
        where = f"model {name!r}"
        if base_urls is not None:
            if base_url is not None:
                raise ConfigError(f"{where}: give 'base_url' (one server) or 'base_urls' (replicas), not both")
            if isinstance(base_urls, str) or not base_urls or len(set(base_urls)) != len(base_urls):
                raise ConfigError(f"{where}: 'base_urls' must be a list of distinct server URLs, got {base_urls!r}")
            base_url = base_urls[0]
        if max_in_flight is None:
            max_in_flight = HOSTED_MAX_IN_FLIGHT if base_url is None else SERVED_MAX_IN_FLIGHT
        if not isinstance(model, str) or not model:
            raise ConfigError(f"{where}: 'model' must be the served model name, got {model!r}")
        for url in base_urls or ([] if base_url is None else [base_url]):
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ConfigError(f"{where}: 'base_url' must start with http:// or https://, got {url!r}")
        if not isinstance(api_key_env, str) or not api_key_env:
            raise ConfigError(f"{where}: 'api_key_env' must name an environment variable, got {api_key_env!r}")
        for option, value, lowest in (("max_in_flight", max_in_flight, 1), ("max_retries", max_retries, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
                raise ConfigError(f"{where}: '{option}' must be an integer >= {lowest}, got {value!r}")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise ConfigError(f"{where}: 'timeout' must be a positive number of seconds, got {timeout!r}")
        for option, flag in (("logprobs", logprobs), ("prompt_scoring", prompt_scoring)):
            if not isinstance(flag, bool):
                raise ConfigError(f"{where}: '{option}' must be true or false, got {flag!r}")
        if reasoning is not None and not isinstance(reasoning, bool):
            raise ConfigError(f"{where}: 'reasoning' must be true or false, got {reasoning!r}")
        if baseline_system not in BASELINE_SYSTEM:
            raise ConfigError(f"{where}: 'baseline_system' must be one of {', '.join(BASELINE_SYSTEM)}, "
                              f"got {baseline_system!r}")
        if revision is not None and (not isinstance(revision, (str, int, float, date))
                                     or isinstance(revision, bool) or not str(revision)):
            raise ConfigError(f"{where}: 'revision' must be a non-empty string naming the model's version, "
                              f"got {revision!r}")
        self.name = name
        # One chat completion per request: the chat API takes one conversation per call. Parallelism is
        # the number of requests in flight, which the server batches (continuous batching in vLLM).
        self.batch_size = 1
        self.max_in_flight = max_in_flight
        self.model = model
        self.hosted = base_url is None
        # Replicas of one model behind several servers (base_urls): each request goes to the one with the fewest
        # in flight, and all must serve the same weights (identity()). One server is a list of one.
        self.replicas = [url.rstrip("/") for url in (base_urls or [base_url or OPENAI_API_BASE])]
        self._replica_load = dict.fromkeys(self.replicas, 0)
        self._on = threading.local()  # the replica this thread's request goes to
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.baseline_system = baseline_system
        self.reasoning = reasoning  # the chat template's thinking switch; None: the template's default
        # YAML reads `revision: 2024-08-06` as a date and `revision: 3` as a number: both name a version.
        self.revision: str | None = None if revision is None else str(revision)
        # Backoff before retry n (0-based): base * 2**n, at most max, times a random factor in [0.5, 1].
        self.retry_base_delay = 0.5
        self.retry_max_delay = 30.0
        self.rate_limit_patience = RATE_LIMIT_PATIENCE
        # How many inference requests go out at once: max_in_flight, halved by a 429 or 503 and grown back.
        self._limit = AdaptiveLimit(max_in_flight)
        # vLLM's prefix-cache counters (tokens looked up, tokens found) at the first reading of /metrics.
        self._prefix_cache_start: tuple[float, float] | None = None
        self._logprobs = logprobs
        self._prompt_scoring = prompt_scoring and not self.hosted
        self._dropped: dict[str, str] = {}  # parameter -> why it is no longer sent
        self._identity: dict[str, Any] | None = None
        self._identity_lock = threading.Lock()  # apart from _lock, which creating the client takes
        self._label_tokens: dict[str, dict[str, list[int]]] = {}
        self._label_lock = threading.Lock()
        self._counting = not self.hosted  # whether /tokenize may count prompts; False once it refused
        self._clients: dict[str, Any] = {}  # one openai client per replica
        self._http_client = http_client  # an httpx2.Client to send through (tests, proxies); None: the default
        self._lock = threading.Lock()
        # Set by cancel(): no request starts or is retried from then on; backoff sleeps wait on it.
        self._cancelled = threading.Event()
        # Tries that failed in a row (a retryable error or a timeout) and the last one's status, for the
        # runner's waiting note; an answer (or a refusal) resets them.
        self._failed_in_a_row = 0
        self._last_failure: str | None = None
        # Counters: requests sent (tries included), retries, and seconds spent inside HTTP calls; the
        # identity's requests are counted apart, so that a fully cached run still reports no model call.
        self.http_requests = 0
        self.http_retries = 0
        self.http_seconds = 0.0
        self.identity_requests = 0
        for url in self.replicas if not self.hosted else ():
            _register_url_credentials(url)

    # -- identity, decoding and prompts --------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What identifies this model (see the module docstring). The server is asked on the first
        call only; constructing the backend sends nothing."""
        if self._identity is None:
            with self._identity_lock:
                if self._identity is None:
                    self._identity = self._server_identity()
        return dict(self._identity)

    @property
    def base_url(self) -> str:
        """The server this thread's request goes to (the first replica outside a request)."""
        return getattr(self._on, "replica", None) or self.replicas[0]

    @contextlib.contextmanager
    def _replica(self, url: str | None = None) -> Iterator[str]:
        """Send this thread's requests to `url`, or to the replica with the fewest requests in flight."""
        with self._lock:
            chosen = url or min(self.replicas, key=lambda replica: self._replica_load[replica])
            self._replica_load[chosen] += 1
        previous = getattr(self._on, "replica", None)
        self._on.replica = chosen
        try:
            yield chosen
        finally:
            self._on.replica = previous
            with self._lock:
                self._replica_load[chosen] -= 1

    def address(self) -> dict[str, Any]:
        address: dict[str, Any] = {"backend": "openai", "model": self.model, "base_url": _public_url(self.replicas[0])}
        if len(self.replicas) > 1:
            address["base_urls"] = [_public_url(url) for url in self.replicas]
        return address

    def _server_identity(self) -> dict[str, Any]:
        """What the server reports (see the module docstring); with replicas, what every one of them reports,
        which must agree: a replica serving other weights would mix two models' answers in one evaluation."""
        identities = []
        for url in self.replicas:
            with self._replica(url):
                identities.append(self._one_server_identity())
        identity = identities[0]
        for url, other in zip(self.replicas[1:], identities[1:], strict=True):
            for field in ("root", "max_model_len"):
                if other[field] != identity[field]:
                    raise BackendError(
                        f"model {self.name!r}: its replicas serve different models: {_public_url(self.replicas[0])} "
                        f"reports {field} {identity[field]}, {_public_url(url)} reports {field} {other[field]}; "
                        "every server in base_urls must serve the same weights", endpoint=_public_url(url))
        if len(identities) > 1:
            identity["process_started"] = [other["process_started"] for other in identities]
        return identity

    def _one_server_identity(self) -> dict[str, Any]:
        identity: dict[str, Any] = {**self.address(), "root": None, "max_model_len": None,
                                    "process_started": None, "revision": self.revision}
        identified_by = ["served name", "base_url"]
        if not self.hosted:
            card = self._model_card()
            if card is not None and isinstance(card.get("root"), str) and card["root"]:
                identity["root"] = card["root"]
                identified_by.append("/v1/models root")
            if card is not None and isinstance(card.get("max_model_len"), int):
                identity["max_model_len"] = card["max_model_len"]
                identified_by.append("/v1/models max_model_len")
            if self.revision is None:
                # Without a pinned revision a restart counts as a new deployment: the same path may hold
                # new weights. A pinned revision vouches for the weights, so a restarted server (a crash,
                # a rolling restart) keeps its cached answers.
                identity["process_started"] = self._process_started()
                if identity["process_started"] is not None:
                    identified_by.append("/metrics process start")
        if self.revision is not None:
            identified_by.append("revision")
        identity["identified_by"] = identified_by
        return identity

    def _model_card(self) -> dict[str, Any] | None:
        """The /v1/models card of the served name; None when the server has no such list or card."""
        endpoint = self.base_url + "/models"
        try:
            response = self._request("get", endpoint, None, counted=False,
                                     what="cannot ask the server which model it serves")
        except _Rejected:
            return None  # no /v1/models here: the identity rests on what else there is
        try:
            return parse_model_card(response.json(), self.model)
        except ValueError:
            return None

    def _process_started(self) -> str | None:
        """When the serving process started (/metrics), or None. One try: it is optional, and a server
        that answers /v1/models but hangs on /metrics must not hold the run."""
        try:
            response = self._request("get", self._root_url("/metrics"), None, counted=False, tries=1,
                                     what="cannot read the server's metrics")
        except (_Rejected, BackendError):
            return None
        counters = parse_prefix_cache(response.text)
        if counters is not None:  # where the prefix cache stood before this run: its hit rate counts from here
            with self._lock:
                start = self._prefix_cache_start or (0.0, 0.0)
                self._prefix_cache_start = (start[0] + counters[0], start[1] + counters[1])
        return parse_process_start(response.text)

    def decoding(self, config: GenerationConfig, scoring: LabelScoring | None) -> dict[str, Any]:
        """What a chat completion with `config` and `scoring` sends now, and what was dropped and why."""
        asked = scoring if scoring is not None and self._logprobs else None
        payload = build_chat_payload(RenderedMessages((), None), config, asked, model=self.model,
                                     reasoning=self.reasoning)
        with self._lock:
            dropped = dict(self._dropped)
        for parameter in dropped:
            payload.pop(parameter, None)
        record = {**requested_decoding(config, scoring), **decoding_sent(payload, config)}
        record["dropped"] = {parameter: reason for parameter, reason in dropped.items()
                             if parameter != "logprobs" or scoring is not None}
        return record

    def dropped_parameters(self) -> dict[str, str]:
        with self._lock:
            return dict(self._dropped)

    def learn_dropped_parameters(self, known: Mapping[str, str]) -> None:
        with self._lock:
            for parameter, reason in known.items():
                if parameter in DROPPABLE and parameter not in self._dropped:
                    self._dropped[parameter] = str(reason)
                    if parameter == "logprobs":
                        self._logprobs = False

    def _drop(self, parameter: str, reason: str) -> None:
        with self._lock:
            self._dropped.setdefault(parameter, reason)
            if parameter == "logprobs":
                self._logprobs = False

    def system_policy(self) -> SystemPolicy:
        return BASELINE_SYSTEM[self.baseline_system]

    def capabilities(self) -> Capabilities:
        return Capabilities(logprobs=self._logprobs, prompt_scoring=self._logprobs and self._prompt_scoring,
                            constrained_json=True)

    def render_prompt(self, request: RenderedMessages) -> str:
        return transcript(request)

    @property
    def loaded(self) -> bool:
        """Whether this process sent the server any inference request (a fully cached run sends none;
        the identity's requests do not count)."""
        return self.http_requests > 0

    # -- inference --------------------------------------------------------------------------------
    def generate(self, requests: Sequence[RenderedMessages], config: GenerationConfig,
                 scoring: LabelScoring | None) -> list[Generation]:
        results = []
        for request in requests:
            with self._replica():
                results.append(self._generate_one(request, config, scoring))
        return results

    def _generate_one(self, request: RenderedMessages, config: GenerationConfig,
                      scoring: LabelScoring | None) -> Generation:
        while True:
            asked = scoring if scoring is not None and self._logprobs else None
            payload = build_chat_payload(request, config, asked, model=self.model, reasoning=self.reasoning)
            for parameter in self.dropped_parameters():  # a snapshot: another thread may add to it
                payload.pop(parameter, None)
            try:
                data = self._post("/chat/completions", payload)
            except _Rejected as rejected:
                refusal = f"HTTP {rejected.status}: {rejected.message}"
                if asked is not None and (rejected.names("logprobs") or rejected.names("top_logprobs")):
                    self._drop("logprobs", refusal)
                    continue
                if "temperature" in payload and rejected.names("temperature"):
                    self._drop("temperature", refusal)
                    continue
                raise self._error("the chat completion was rejected", "/chat/completions", rejected) from None
            try:
                generation = parse_chat_response(data, asked)
            except BackendError as error:
                raise BackendError(f"model {self.name!r}: {error}",
                                   endpoint=_public_url(self.base_url + "/chat/completions")) from None
            if asked is not None and generation.tokens is None:
                # The server ignores the parameter: this reply was asked with it, the next ones are not.
                self._drop("logprobs", "the server's replies carry no log-probabilities")
            # A proxy that echoes the Authorization header must not put the key into results and files.
            _mask_generation(generation)
            generation.sent = decoding_sent(payload, config)
            return generation

    def score_labels(self, requests: Sequence[RenderedMessages], scoring: LabelScoring
                     ) -> list[dict[str, float | None]]:
        results = []
        for request in requests:
            with self._replica():
                results.append(self._score_one(request, scoring))
        return results

    def _score_one(self, request: RenderedMessages, scoring: LabelScoring) -> dict[str, float | None]:
        unavailable: dict[str, float | None] = dict.fromkeys(scoring.labels)
        if not (self._logprobs and self._prompt_scoring):
            return unavailable
        endpoint = self._root_url("/tokenize")
        try:
            label_tokens = self._scoring_label_tokens(scoring)
            if label_tokens is None or not any(label_tokens.values()):
                return unavailable  # no prompt scoring here, or no label is a single token of this model
            prompt = parse_tokenize_response(self._post(endpoint, build_tokenize_payload(
                request, scoring, model=self.model, reasoning=self.reasoning)))
            endpoint = self.base_url + "/completions"
            data = self._post(endpoint, build_prompt_scoring_payload(prompt, label_tokens, model=self.model))
            return parse_prompt_scoring_response(data, label_tokens)
        except _Rejected as rejected:
            if rejected.status in _NO_SCORING:
                # No /tokenize, or no prompt echo, on this server: the fallback is unavailable.
                self._prompt_scoring = False
                return unavailable
            raise self._error("prompt scoring was rejected", endpoint, rejected) from None
        except BackendError as error:
            if error.endpoint is not None:
                raise
            raise BackendError(f"model {self.name!r}: {error}", endpoint=_public_url(endpoint)) from None

    def count_prompt_tokens(self, requests: Sequence[RenderedMessages]) -> list[int | None]:
        """Each request's prompt tokens as the server renders them (its /tokenize, the chat template with
        the generation prompt); None for every request when the server has no such endpoint (then it is
        not asked again) or cannot be reached in one try (the generation reports that)."""
        counts: list[int | None] = []
        for request in requests:
            if not self._counting:
                counts.append(None)
                continue
            body = {"model": self.model, "messages": request.as_dicts(), "add_generation_prompt": True,
                    "add_special_tokens": False, **template_switches(self.reasoning)}
            try:
                response = self._request("post", self._root_url("/tokenize"), body, counted=False, tries=1,
                                         what="cannot count the prompt's tokens")
                counts.append(len(parse_tokenize_response(response.json())))
            except _Rejected:
                self._counting = False
                counts.append(None)
            except (BackendError, ValueError):
                counts.append(None)
        return counts

    def _scoring_label_tokens(self, scoring: LabelScoring) -> dict[str, list[int]] | None:
        """The labels' token ids, or None when the server scores no prompts. The first reading finds that
        out while the others wait (a pool sends hundreds at once), so a server without /tokenize is asked once."""
        with self._label_lock:
            if not self._prompt_scoring:
                return None
            try:
                return self._label_token_ids(scoring)
            except _Rejected as rejected:
                if rejected.status not in _NO_SCORING:
                    raise
                self._prompt_scoring = False
                return None

    def _label_token_ids(self, scoring: LabelScoring) -> dict[str, list[int]]:
        """The token ids of each label's single-token spellings, asked of the server once."""
        key = json.dumps(scoring.key(), sort_keys=True)
        if key not in self._label_tokens:
            found: dict[str, list[int]] = {}
            for label in scoring.labels:
                ids: list[int] = []
                for spelling in scoring.variants(label):
                    tokens = parse_tokenize_response(self._post(
                        self._root_url("/tokenize"), build_label_tokenize_payload(spelling, model=self.model)))
                    if len(tokens) == 1 and tokens[0] not in ids:
                        ids.append(tokens[0])
                found[label] = ids
            self._label_tokens[key] = found
        return self._label_tokens[key]

    def _root_url(self, path: str) -> str:
        """vLLM serves /tokenize beside /v1, not under it."""
        root = self.base_url[:-len("/v1")] if self.base_url.endswith("/v1") else self.base_url
        return root + path

    # -- HTTP -------------------------------------------------------------------------------------
    def _client_or_create(self) -> Any:
        url = self.base_url
        if url not in self._clients:
            with self._lock:
                if url not in self._clients:
                    try:
                        import openai
                    except ImportError:
                        raise MissingDependencyError("openai", "The OpenAI-compatible backend",
                                                     "pip install openai") from None
                    key = os.environ.get(self.api_key_env) or None
                    if key is not None:
                        # Any variable name may hold the key: mask it wherever it appears from now on.
                        register_secret(key, self.api_key_env)
                    if key is None:
                        if self.hosted:
                            raise ConfigError(f"model {self.name!r}: the OpenAI API needs a key; set the "
                                              f"environment variable {self.api_key_env}")
                        key = PLACEHOLDER_KEY
                    # Retries are ours (bounded, with jitter, and counted); the client's are turned off.
                    self._clients[url] = openai.OpenAI(api_key=key, base_url=url, timeout=self.timeout,
                                                       max_retries=0, http_client=self._http_client)
        return self._clients[url]

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `body` to `path` (relative to base_url, or a full URL) and return the JSON reply."""
        response = self._request("post", path, body)
        endpoint = path if path.startswith(("http://", "https://")) else self.base_url + path
        try:
            document = response.json()
        except ValueError:
            raise BackendError(f"model {self.name!r}: the server's reply is not JSON: "
                               f"{self._redact(shorten(response.text))}", endpoint=_public_url(endpoint),
                               status=response.status_code) from None
        if not isinstance(document, dict):
            raise BackendError(f"model {self.name!r}: the server's reply is not a JSON object",
                               endpoint=_public_url(endpoint), status=response.status_code)
        return document

    def _request(self, method: str, path: str, body: dict[str, Any] | None, *, counted: bool = True,
                 tries: int | None = None, what: str | None = None) -> Any:
        """Send one request (`body` for a POST) and return the httpx2 response of the first success.

        Retries timeouts, connection errors, 408, 409, 429 and 5xx up to max_retries times (or makes
        `tries` tries); raises _Rejected for other HTTP errors and BackendError when the tries are used
        up, its message starting with `what` when given. `counted`: it counts as an inference request,
        sent within the backend's adaptive limit on requests at once (persona_eval.pool.AdaptiveLimit),
        which a 429 or 503 lowers; an inference request refused with 429 is retried for up to
        ``rate_limit_patience`` seconds without using up its retries. After :meth:`cancel` no try starts
        and no backoff goes on: a BackendError says "cancelled"."""
        import httpx2
        import openai

        endpoint = path if path.startswith(("http://", "https://")) else self.base_url + path
        if self._cancelled.is_set():
            raise self._cancelled_error(endpoint)
        client = self._client_or_create()
        tries = self.max_retries + 1 if tries is None else tries
        last_status: int | str | None = None
        retry_after: float | None = None
        failed = 0  # tries that failed and count against `tries`
        attempt = 0
        limited_since: float | None = None  # when this request was first refused with 429 (rate limited)
        while failed < tries:
            if attempt:
                if counted:
                    with self._lock:
                        self.http_retries += 1
                if self._cancelled.wait(self._backoff(attempt - 1, retry_after)):
                    break
                retry_after = None
            attempt += 1
            if self._cancelled.is_set():
                break
            with self._limit.slot(self._cancelled) if counted else contextlib.nullcontext(Slot()) as slot:
                if self._cancelled.is_set():
                    break
                started = time.perf_counter()
                try:
                    if method == "get":
                        response = client.get(path, cast_to=httpx2.Response)
                    else:
                        response = client.post(path, body=body, cast_to=httpx2.Response)
                except openai.APIStatusError as error:
                    status = error.status_code
                    if status in _OVERLOADED:
                        slot.limited()  # fewer requests at once from now on
                    if status in _RETRY_STATUSES or status >= 500:
                        last_status = f"HTTP {status}"
                        retry_after = _retry_after(error.response)
                        self._count_failure(last_status)
                        now = time.monotonic()
                        if status == 429 and counted:
                            # A rate limit slows the run down rather than failing it: waited out for up to
                            # rate_limit_patience seconds, without using up the retries.
                            limited_since = now if limited_since is None else limited_since
                            if now - limited_since < self.rate_limit_patience:
                                continue
                        failed += 1
                        continue
                    slot.answered()  # a refusal is an answer: the server is up
                    self._count_failure(None)
                    raise _Rejected(status, self._redact(_error_message(error)), _error_param(error)) from None
                except openai.APITimeoutError:
                    last_status = f"timeout after {self.timeout:g} s"
                    self._count_failure(last_status)
                    failed += 1
                    continue
                except openai.APIConnectionError as error:
                    last_status = f"connection error ({self._redact(str(error.__cause__ or error))})"
                    self._count_failure(last_status)
                    failed += 1
                    continue
                except Exception:
                    if self._cancelled.is_set():
                        break  # the client was closed under this request by cancel()
                    raise
                finally:
                    with self._lock:
                        if counted:
                            self.http_requests += 1
                            self.http_seconds += time.perf_counter() - started
                        else:
                            self.identity_requests += 1
                slot.answered()
            self._count_failure(None)
            return response
        if self._cancelled.is_set():
            raise self._cancelled_error(endpoint)
        rate_limited = last_status == "HTTP 429" and limited_since is not None
        attempts = (f"no answer after {attempt} {'try' if attempt == 1 else 'tries'}"
                    + (f" (rate limited for {self.rate_limit_patience:g} s)" if rate_limited else ""))
        raise BackendError(f"model {self.name!r}: " + (f"{what}: {attempts}" if what else attempts),
                           endpoint=_public_url(endpoint), status=last_status)

    def _count_failure(self, status: str | None) -> None:
        """One more try failed with `status` (None: the server answered, which ends the run of failures)."""
        with self._lock:
            if status is None:
                self._failed_in_a_row, self._last_failure = 0, None
            else:
                self._failed_in_a_row += 1
                self._last_failure = status

    def _cancelled_error(self, endpoint: str) -> BackendError:
        return BackendError(f"model {self.name!r}: cancelled (the run was interrupted); nothing more is sent",
                            endpoint=_public_url(endpoint))

    def _backoff(self, retry: int, retry_after: float | None) -> float:
        delay = min(self.retry_max_delay, self.retry_base_delay * 2 ** min(retry, 16)) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.retry_max_delay))
        return delay

    def _error(self, what: str, path: str, rejected: _Rejected) -> BackendError:
        endpoint = path if path.startswith(("http://", "https://")) else self.base_url + path
        return BackendError(f"model {self.name!r}: {what}: {rejected.message}", endpoint=_public_url(endpoint),
                            status=f"HTTP {rejected.status}")

    def _redact(self, text: str) -> str:
        """A server's text fit for an error message: secrets masked (before shortening, so that no
        cut leaves a piece of one), then at most ERROR_TEXT_LIMIT characters."""
        return shorten(mask(text))

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    def cancel(self) -> None:
        """Stop for good (the run was interrupted): from now on no request starts, no backoff goes on
        and no retry is made; each raises a BackendError saying "cancelled". Safe from any thread.

        The client is closed too, which frees its idle connections. That does not wake a request
        blocked reading its answer (closing a socket from another thread does not interrupt a read):
        such a request returns when the server answers or its timeout fires, and then stops. The
        runner sends requests from daemon threads, so those never keep the process alive."""
        self._cancelled.set()
        self.close()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def describe_load(self) -> dict[str, Any]:
        """How the server took the load, for the run's throughput line: the inference requests ``sent`` (tries
        included, so a prompt reading the server cannot give is not one) and the ``retries`` among them;
        ``limit`` (max_in_flight as
        ``ceiling``, the ``lowest`` a 429/503 brought the limit on requests at once to, and how often it was
        ``cuts``) and ``prefix_cache_hit_rate``, the share of prompt tokens the server found in its prefix
        cache since this process first read its /metrics (vLLM's counters; when it asks the model's identity,
        unless a pinned revision spares that, else at the first call of this; None where none is reported)."""
        with self._lock:
            sent, retries = self.http_requests, self.http_retries
        load: dict[str, Any] = {"sent": sent, "retries": retries, "limit": self._limit.snapshot(),
                                "prefix_cache_hit_rate": None}
        now = self._prefix_cache()
        with self._lock:
            start = self._prefix_cache_start
            if start is None:
                self._prefix_cache_start = now
        if start is not None and now is not None and now[0] > start[0]:
            load["prefix_cache_hit_rate"] = round((now[1] - start[1]) / (now[0] - start[0]), 4)
        return load

    def _prefix_cache(self) -> tuple[float, float] | None:
        """The servers' prefix-cache counters now, summed over the replicas (one try each; None for a hosted
        API or servers without them)."""
        if self.hosted:
            return None
        totals: tuple[float, float] | None = None
        for url in self.replicas:
            with self._replica(url):
                try:
                    response = self._request("get", self._root_url("/metrics"), None, counted=False, tries=1,
                                             what="cannot read the server's metrics")
                except (_Rejected, BackendError):
                    continue
            counters = parse_prefix_cache(response.text)
            if counters is not None:
                totals = counters if totals is None else (totals[0] + counters[0], totals[1] + counters[1])
        return totals

    def describe_wait(self) -> dict[str, Any]:
        """What the runner's note on requests in flight says about this endpoint: ``endpoint`` (the
        public base URL), ``timeout`` (seconds per try), ``retries``, and ``failed_in_a_row`` with
        ``last_failure``, the tries that failed since the last answer and the status of the last one."""
        with self._lock:
            failed, last = self._failed_in_a_row, self._last_failure
        return {"endpoint": _public_url(self.base_url), "timeout": self.timeout, "retries": self.max_retries,
                "failed_in_a_row": failed, "last_failure": last}


def _retry_after(response: Any) -> float | None:
    value = response.headers.get("retry-after") if response is not None else None
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


def _error_message(error: Any) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(error, "message", error))


def _error_param(error: Any) -> str | None:
    body = getattr(error, "body", None)
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and isinstance(inner.get("param"), str):
            return str(inner["param"])
    return None
