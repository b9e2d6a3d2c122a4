"""A stand-in OpenAI-compatible server on 127.0.0.1, so served-model behaviour is testable in seconds.

It answers what the suite asks of a vLLM server, the way vLLM shapes it:

* ``GET /v1/models``: one model card, ``id`` (the served name), ``root`` (the weights path),
  ``max_model_len`` and ``created`` (by default the time of the request, as vLLM writes it);
* ``GET /metrics``: Prometheus text with ``process_start_time_seconds``;
* ``POST /v1/chat/completions``: the reply is ``answer(messages)``, cut to ``max_completion_tokens``
  (or ``max_tokens``) whitespace tokens with ``finish_reason`` "length" when it was longer; with
  ``logprobs`` it lists each token with ``top_logprobs`` alternatives that include the label spellings
  ("A", " A", "B", ...), the generated token being the most likely;
* anything else: 404 ``{"detail": "Not Found"}`` (so prompt scoring through ``/tokenize`` is
  unavailable, as on a hosted API).

Every request is recorded (method, path, headers, JSON body); ``max_in_flight`` is the most requests
seen being answered at once. Knobs for faults: ``latency`` (seconds of sleep per request),
``reject_temperature`` (a 400 naming the parameter, as hosted reasoning models answer),
``reject_logprobs``, ``echo_headers`` (the Authorization header written into the reply, as a
misbehaving proxy would), ``fail_status`` with ``fail_first`` (the first n chat completions answered
with that status; None: all), and ``inject``, a hook that may answer any request itself. ``swap()``
puts another model behind the same name and port (a blue/green redeploy); a second server can also be
started on the port of a stopped one.

Reasoning replies: with ``reasoning`` set, each reply thinks first, ``think(messages)`` being the trace and
``answer(messages)`` the final response. ``"reasoning_content"`` or ``"reasoning"`` (vLLM with a reasoning
parser, older and newer field name): the model writes ``TRACE</think>\n\nANSWER`` (its chat template
opened the trace), the message carries the trace in that field and the rest in ``content`` (None when the
budget ran out inside the trace), and the log-probabilities list every generated token, the trace's too,
as vLLM's do (``reasoning_logprobs=False``: the content's alone). ``"headings"``: the text itself is
``## Thinking\nTRACE\n\n## Final Response\nANSWER`` (HuatuoGPT-o1); ``"tags"``:
``<think>TRACE</think>\n\nANSWER``. The token budget counts the trace's tokens as well. A request that
sends ``chat_template_kwargs: {enable_thinking: false}`` gets the final response alone, as a chat template
with that switch makes a reasoning model answer at once. ``stop`` sequences end the reply before the first
one it writes (``finish_reason`` "stop"), as vLLM's do.

Random faults, drawn from a generator seeded with ``seed``, one draw per chat completion:
``error_rate`` of them are answered HTTP 500, ``timeout_rate`` of them wait ``hang_seconds`` and then
close the connection without an answer (give the client a shorter timeout, so that its timeout fires
first). ``outage(seconds)`` answers every request 503 for that long; ``hang()`` makes every request
wait, unanswered, until the server stops (``hang(after=n)``: once n more chat completions were
answered). Rate limits, as a hosted API's: ``capacity`` answers a chat completion that arrives while that
many are being answered with HTTP 429 and ``Retry-After: retry_after``; ``rate_limit(seconds)`` answers
every chat completion 429 for that long (a storm). A fault never counts as an answer: ``answers`` holds,
per conversation (the role and text of each message), the chat completions answered 200 and written to
the client in full; ``faults`` counts the faults served by kind ("error", "timeout", "outage", "hang",
"rate_limit"); ``total_requests`` every request. ``serving_seconds`` is the server time of the chat
completions: from the first one's arrival to the last one's answer.

With ``prefix_cache`` the /metrics page carries vLLM's prefix-cache counters
(``vllm:prefix_cache_queries_total``, ``vllm:prefix_cache_hits_total``, in whitespace tokens): a chat
completion's system message counts as found in the cache when an earlier one had the same, and the rest
of its messages as looked up and not found.

    with StandInServer(served_name="m", root="/models/X", answer=lambda messages: "C") as server:
        ... --pe-model openai:m@{server.base_url} ...

Bounded: loopback only, request bodies up to 1 MiB, and the server stops by itself after
``lifetime`` seconds if nobody stopped it; its thread is a daemon, so it never holds a process open.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, TypeVar

_T = TypeVar("_T")

__all__ = ["RecordedRequest", "StandInServer", "conversation"]

Messages = Sequence[Mapping[str, Any]]
Conversation = tuple[tuple[str, str], ...]
FAULTS = ("error", "timeout", "outage", "hang", "rate_limit")
_MAX_BODY = 1 << 20
_LABELS = "ABCDE"
_FILLERS = ("the", " the", "I", " I", "Answer", ":", ".", "\n", " is", " to", " a", " care", " now", " go")
REASONING_STYLES = ("reasoning_content", "reasoning", "headings", "tags")
_SEPARATE = ("reasoning_content", "reasoning")  # the trace in its own message field
_CLOSE = "</think>"
# Whitespace-led pieces of text, the closing tag of a trace one of its own (as tokenizers make it).
_TOKEN = re.compile(r"\s*</think>|\s*(?:(?!</think>)\S)+")
TEMPERATURE_REFUSAL = ("Unsupported value: 'temperature' does not support 0 with this model. Only the "
                       "default (1) value is supported.")
LOGPROBS_REFUSAL = "Unsupported parameter: 'logprobs' is not supported with this model."


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the stand-in received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None


def conversation(messages: Messages) -> Conversation:
    """The key of ``StandInServer.answers``: each message's role and text, in order."""
    return tuple((str(m.get("role", "")), str(m.get("content", ""))) for m in messages)


def _refusal(param: str, message: str, code: str) -> tuple[int, dict[str, Any]]:
    return 400, {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


class StandInServer:
    """An OpenAI-compatible server in a daemon thread (see the module docstring)."""

    def __init__(self, *, served_name: str = "standin", root: str | None = "/models/standin",
                 max_model_len: int | None = 2048, started: float | None = None, created: int | None = None,
                 answer: Callable[[Messages], str] = lambda messages: "Answer: A", latency: float = 0.0,
                 reject_temperature: bool = False, reject_logprobs: bool = False, echo_headers: bool = False,
                 fail_status: int | None = None, fail_first: int | None = None,
                 inject: Callable[[RecordedRequest], tuple[int, dict[str, Any]] | None] | None = None,
                 serve_models: bool = True, serve_metrics: bool = True, port: int = 0,
                 lifetime: float = 600.0, error_rate: float = 0.0, timeout_rate: float = 0.0,
                 hang_seconds: float = 5.0, seed: int = 0, reasoning: str | None = None,
                 think: Callable[[Messages], str] = lambda messages: "The findings point one way.",
                 reasoning_logprobs: bool = True, capacity: int | None = None, retry_after: float = 1.0,
                 prefix_cache: bool = False) -> None:
        if reasoning is not None and reasoning not in REASONING_STYLES:
            raise ValueError(f"reasoning must be one of {', '.join(REASONING_STYLES)} or None, got {reasoning!r}")
        for option, rate in (("error_rate", error_rate), ("timeout_rate", timeout_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{option} must be a fraction from 0 to 1, got {rate!r}")
        if error_rate + timeout_rate > 1.0:
            raise ValueError(f"error_rate + timeout_rate must be at most 1, got {error_rate + timeout_rate!r}")
        self.served_name = served_name
        self.root = root  # None: the model card has no root, as on hosted APIs
        self.max_model_len = max_model_len
        self.started = time.time() if started is None else started
        self.created = created  # None: the time of each request, as vLLM writes it
        self.answer = answer
        self.latency = latency
        self.reject_temperature = reject_temperature
        self.reject_logprobs = reject_logprobs
        self.echo_headers = echo_headers
        self.fail_status = fail_status
        self.fail_first = fail_first
        self.inject = inject
        self.serve_models = serve_models
        self.serve_metrics = serve_metrics
        self.lifetime = lifetime
        self.error_rate = error_rate
        self.timeout_rate = timeout_rate
        self.hang_seconds = hang_seconds
        self.reasoning = reasoning
        self.think = think
        self.reasoning_logprobs = reasoning_logprobs
        self.capacity = capacity
        self.retry_after = retry_after
        self.prefix_cache = prefix_cache
        self.requests: list[RecordedRequest] = []
        self.chats_in_flight = 0
        self._first_chat: float | None = None  # time.monotonic() of the first chat completion's arrival
        self._last_answer: float | None = None  # and of the last one's answer
        self._rate_limited_until = 0.0
        self._systems_seen: set[str] = set()
        self._prefix_queries = 0
        self._prefix_hits = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._failed = 0
        self._port = port
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._answers: Counter[Conversation] = Counter()
        self._faults: Counter[str] = Counter()
        self._outage_until = 0.0  # time.monotonic() until which every request is answered 503
        self._hang_after: int | None = None  # chat completions still answered before every request hangs
        self._stopping = threading.Event()  # set by stop(): hung requests end, unanswered
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Timer | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> StandInServer:
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", self._port), _handler_for(self))
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"standin-{self._port}",
                                        daemon=True)
        self._thread.start()
        self._watchdog = threading.Timer(self.lifetime, self.stop)
        self._watchdog.daemon = True
        self._watchdog.start()
        return self

    def stop(self) -> None:
        """Stop serving and free the port (idempotent)."""
        server, self._server = self._server, None
        self._stopping.set()
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.cancel()
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> StandInServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def base_url(self) -> str:
        return self.root_url + "/v1"

    def swap(self, *, root: str | None, answer: Callable[[Messages], str] | None = None,
             started: float | None = None, max_model_len: int | None = None) -> None:
        """Put another model behind the same name and port: new weights path, new process start time
        (now unless given), and optionally new answers and context length."""
        with self._lock:
            self.root = root
            self.started = time.time() if started is None else started
            if answer is not None:
                self.answer = answer
            if max_model_len is not None:
                self.max_model_len = max_model_len

    def outage(self, seconds: float) -> None:
        """Answer every request 503 for the next `seconds` (from now; a later call replaces it)."""
        with self._lock:
            self._outage_until = time.monotonic() + seconds

    def rate_limit(self, seconds: float) -> None:
        """Answer every chat completion 429 (Retry-After: retry_after) for the next `seconds`."""
        with self._lock:
            self._rate_limited_until = time.monotonic() + seconds

    def hang(self, *, after: int = 0) -> None:
        """Every request from now on (or once `after` more chat completions were answered) waits,
        unanswered, until the server stops; then its connection is closed."""
        with self._lock:
            self._hang_after = after

    # -- what was asked ----------------------------------------------------------------------------
    def requests_to(self, path: str, method: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.path == path and (method is None or r.method == method)]

    @property
    def chat_completions(self) -> int:
        """How many chat completions were asked (answered or refused)."""
        return len(self.requests_to("/v1/chat/completions", "POST"))

    @property
    def answers(self) -> Counter[Conversation]:
        """Chat completions answered 200 and written in full, per conversation (a copy)."""
        return self._locked(lambda: Counter(self._answers))

    @property
    def answered(self) -> int:
        return self._locked(lambda: sum(self._answers.values()))

    @property
    def faults(self) -> Counter[str]:
        """Faults served, by kind (a copy): "error", "timeout", "outage", "hang"."""
        return self._locked(lambda: Counter(self._faults))

    @property
    def serving_seconds(self) -> float:
        """Seconds from the first chat completion's arrival to the last one's answer (0 before any)."""
        with self._lock:
            if self._first_chat is None or self._last_answer is None:
                return 0.0
            return self._last_answer - self._first_chat

    @property
    def total_requests(self) -> int:
        return self._locked(lambda: len(self.requests))

    def _locked(self, read: Callable[[], _T]) -> _T:
        """What `read` returns, read under the lock the handler threads write under."""
        with self._lock:
            return read()

    def _fault(self, request: RecordedRequest) -> str | None:
        """The fault this request gets, if any (see the module docstring), counted."""
        chat = request.method == "POST" and request.path == "/v1/chat/completions"
        with self._lock:
            fault: str | None = None
            if self._hang_after is not None and self._hang_after <= 0:
                fault = "hang"
            elif time.monotonic() < self._outage_until:
                fault = "outage"
            elif chat and time.monotonic() < self._rate_limited_until:
                fault = "rate_limit"
            elif chat and (self.error_rate or self.timeout_rate):
                draw = self._random.random()
                if draw < self.error_rate:
                    fault = "error"
                elif draw < self.error_rate + self.timeout_rate:
                    fault = "timeout"
            if fault is not None:
                self._faults[fault] += 1
            elif chat and self._hang_after is not None:
                self._hang_after -= 1
            return fault

    def _answered(self, request: RecordedRequest) -> None:
        messages = (request.body or {}).get("messages") or []
        with self._lock:
            self._answers[conversation(messages)] += 1
            if self.prefix_cache:
                for message in messages:
                    tokens = len(str(message.get("content", "")).split())
                    self._prefix_queries += tokens
                    if message.get("role") == "system":
                        content = str(message.get("content", ""))
                        if content in self._systems_seen:
                            self._prefix_hits += tokens
                        self._systems_seen.add(content)

    # -- answers -----------------------------------------------------------------------------------
    def respond(self, request: RecordedRequest) -> tuple[int, dict[str, Any] | str]:
        """The status and body (JSON object, or text for /metrics) for `request`."""
        if self.inject is not None:
            injected = self.inject(request)
            if injected is not None:
                return injected
        if request.method == "GET" and request.path == "/v1/models" and self.serve_models:
            return 200, self._model_list()
        if request.method == "GET" and request.path == "/metrics" and self.serve_metrics:
            return 200, ("# HELP process_start_time_seconds Start time of the process since unix epoch.\n"
                         "# TYPE process_start_time_seconds gauge\n"
                         f"process_start_time_seconds {self.started!r}\n"
                         f'vllm:num_requests_running{{model_name="{self.served_name}"}} {self.in_flight}.0\n'
                         + (f'vllm:prefix_cache_queries_total{{engine="0"}} {self._prefix_queries}.0\n'
                            f'vllm:prefix_cache_hits_total{{engine="0"}} {self._prefix_hits}.0\n'
                            if self.prefix_cache else ""))
        if request.method == "POST" and request.path == "/v1/chat/completions" and request.body is not None:
            return self._chat(request)
        return 404, {"detail": "Not Found"}

    def _model_list(self) -> dict[str, Any]:
        card: dict[str, Any] = {"id": self.served_name, "object": "model", "owned_by": "vllm",
                                "created": int(time.time()) if self.created is None else self.created}
        if self.root is not None:
            card.update(root=self.root, parent=None)
        if self.max_model_len is not None:
            card["max_model_len"] = self.max_model_len
        return {"object": "list", "data": [card]}

    def _thought(self, trace: str, answer: str) -> str:
        """The whole generated text of a reasoning reply (see the module docstring)."""
        if self.reasoning == "headings":
            return f"## Thinking\n{trace}\n\n## Final Response\n{answer}"
        if self.reasoning == "tags":
            return f"<think>{trace}</think>\n\n{answer}"
        return f"{trace}{_CLOSE}\n\n{answer}"

    def _chat(self, request: RecordedRequest) -> tuple[int, dict[str, Any]]:
        body = request.body or {}
        if body.get("model") != self.served_name:
            return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                   "type": "NotFoundError", "param": None, "code": 404}}
        if self.fail_status is not None:
            with self._lock:
                failing = self.fail_first is None or self._failed < self.fail_first
                self._failed += failing
            if failing:
                return self.fail_status, {"error": {"message": f"injected failure {self.fail_status}"}}
        if self.reject_temperature and "temperature" in body:
            return _refusal("temperature", TEMPERATURE_REFUSAL, "unsupported_value")
        if self.reject_logprobs and ("logprobs" in body or "top_logprobs" in body):
            return _refusal("logprobs", LOGPROBS_REFUSAL, "unsupported_parameter")
        messages = body.get("messages") or []
        text = self.answer(messages)
        if self.echo_headers:
            text += " " + request.headers.get("authorization", "")
        switches = body.get("chat_template_kwargs")
        thinking = self.reasoning is not None and not (isinstance(switches, Mapping)
                                                       and switches.get("enable_thinking") is False)
        if thinking:
            text = self._thought(self.think(messages), text)
        tokens = _TOKEN.findall(text) or [text]
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        finish = "stop"
        if isinstance(limit, int) and len(tokens) > limit:
            tokens, finish = tokens[:limit], "length"
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else [s for s in stop or [] if isinstance(s, str) and s]
        written = "".join(tokens)
        found = [index for index in (written.find(s) for s in stops) if index >= 0]
        if found:  # as vLLM: the text ends before the stop sequence, which is not returned
            tokens, finish = _TOKEN.findall(written[:min(found)]), "stop"
        message: dict[str, Any] = {"role": "assistant", "content": "".join(tokens)}
        listed = tokens
        if thinking and self.reasoning in _SEPARATE:
            trace, closed, content = message["content"].partition(_CLOSE)
            message = {"role": "assistant", self.reasoning: trace.strip(), "content": content if closed else None}
            if not self.reasoning_logprobs:
                listed = _TOKEN.findall(content) if closed else []
        choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        if body.get("logprobs"):
            top = min(int(body.get("top_logprobs") or 0), 20)
            choice["logprobs"] = {"content": [_token_entry(token, top) for token in listed]}
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages") or [])
        return 200, {"id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "model": self.served_name,
                     "created": int(time.time()), "choices": [choice],
                     "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                               "total_tokens": prompt_tokens + len(tokens)}}


def _token_entry(token: str, top: int) -> dict[str, Any]:
    """`token` with its most likely alternatives: itself first (-0.1), then label spellings and fillers
    at decreasing log-probabilities that sum, with it, to less than one."""
    alternatives = [token]
    for candidate in [spelling for label in _LABELS for spelling in (label, " " + label)] + list(_FILLERS):
        if len(alternatives) >= top:
            break
        if candidate not in alternatives:
            alternatives.append(candidate)
    listed = [{"token": t, "logprob": -0.1 if i == 0 else -4.0 - 0.25 * i, "bytes": list(t.encode())}
              for i, t in enumerate(alternatives[:top])]
    return {"token": token, "logprob": -0.1, "bytes": list(token.encode()), "top_logprobs": listed}


class _Server(ThreadingHTTPServer):
    # Many clients connect at once (a runner keeps up to 256 requests in flight to a self-served model, and
    # a fault closes a connection): a longer listen queue than socketserver's 5 keeps connects from waiting
    # on SYN retries.
    request_queue_size = 512


def _handler_for(server: StandInServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects

        def do_GET(self) -> None:
            self._answer(None)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > _MAX_BODY:
                self._send(413, {"detail": "request body too large"})
                return
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                self._send(400, {"detail": "the body is not JSON"})
                return
            self._answer(body if isinstance(body, dict) else {})

        def _answer(self, body: dict[str, Any] | None) -> None:
            recorded = RecordedRequest(self.command, self.path.split("?", 1)[0],
                                       {k.lower(): v for k, v in self.headers.items()}, body)
            chat = recorded.method == "POST" and recorded.path == "/v1/chat/completions"
            with server._lock:
                server.requests.append(recorded)
                server.in_flight += 1
                server.max_in_flight = max(server.max_in_flight, server.in_flight)
                # Over capacity: refused at once, as a rate limiter in front of a server does.
                over = chat and server.capacity is not None and server.chats_in_flight >= server.capacity
                if over:
                    server._faults["rate_limit"] += 1
                elif chat:
                    server.chats_in_flight += 1
                    if server._first_chat is None:
                        server._first_chat = time.monotonic()
            try:
                if server.latency and not over:
                    time.sleep(server.latency)
                fault = "rate_limit" if over else server._fault(recorded)
                status: int
                reply: dict[str, Any] | str
                if fault in ("hang", "timeout"):
                    # No answer: wait (until the server stops), then drop the connection.
                    server._stopping.wait(None if fault == "hang" else server.hang_seconds)
                    self.close_connection = True
                    return
                headers: dict[str, str] = {}
                if fault == "outage":
                    status, reply = 503, {"error": {"message": "injected outage: service unavailable"}}
                elif fault == "rate_limit":
                    status, reply = 429, {"error": {"message": "Rate limit reached: too many requests at once",
                                                    "type": "requests", "code": "rate_limit_exceeded"}}
                    headers["Retry-After"] = f"{server.retry_after:g}"
                elif fault == "error":
                    status, reply = 500, {"error": {"message": "injected failure 500"}}
                else:
                    status, reply = server.respond(recorded)
            finally:
                with server._lock:
                    server.in_flight -= 1
                    if chat and not over:
                        server.chats_in_flight -= 1
            try:
                self._send(status, reply, headers)
            except OSError:
                self.close_connection = True  # the client went away: not answered
                return
            if chat and not over:
                with server._lock:
                    server._last_answer = time.monotonic()
            if status == 200 and recorded.method == "POST" and recorded.path == "/v1/chat/completions":
                server._answered(recorded)

        def _send(self, status: int, reply: dict[str, Any] | str, headers: Mapping[str, str] | None = None) -> None:
            text = reply if isinstance(reply, str) else json.dumps(reply)
            data = text.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; version=0.0.4" if isinstance(reply, str)
                             else "application/json")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the tests read the recorded requests, not a log on stderr

    return Handler
