"""Batching, concurrency, caching and progress: the only place that calls a backend.

Requests are looked up in the cache first; the misses are sorted by prompt length (less padding), cut
into batches of ``backend.batch_size`` and sent with up to ``backend.max_in_flight`` batches in
flight. Each finished batch is written to the cache at once, so an interrupted or failed run keeps
everything it finished, and a rerun asks the model only for what is missing.

Batches in flight run on daemon threads, and the calling thread waits on them in short steps, so a
Ctrl-C in it stops the run at once: nothing more is sent, ``backend.cancel()`` is called when the
backend has it (no retry or backoff goes on), and the requests still in flight are left to their
threads, which never keep the process alive. Any other exception raised in the calling thread (a cache
that cannot be written) stops the run as well, without cancelling the backend. (A backend's own error
is different: the batches in flight are waited for and kept, then it is raised.) With one batch in
flight (a local model) the batch runs in the calling thread, and the run stops between batches or
wherever the model lets an interrupt through. While requests are in flight and the oldest has waited
``wait_note_after`` seconds, ``notice`` gets a line about every ``wait_note_after`` seconds saying what
is being waited on.

The model under test is the model that answered. A cache key holds the backend's identity (for a
served model, what the server reports about its weights and process) and the decoding actually sent:
a result generated without a parameter that the server refused is stored under the key of what was
sent, and the refused parameters are kept in the cache per identity, so that a later run computes the
same keys before sending. On first need the runner compares the identity with the one last recorded
at the same address (backend kind, served name and URL, or model path); when they differ,
``identity_change`` says why the cache misses.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from persona_eval.backends.base import Backend, Generation, GenerationConfig, LabelScoring, requested_decoding
from persona_eval.cache import NullCache, ResultCache, cache_key
from persona_eval.errors import ConfigError
from persona_eval.prompts import RenderedMessages

__all__ = ["CachedGeneration", "Progress", "Runner", "RunnerStats", "describe_identity_change"]

# Identity fields that a server reports, named as a person reads them, in the order they are told.
_SERVER_FACTS = {"root": "root", "max_model_len": "max_model_len", "process_started": "process started"}
_NOT_COMPARED = ("backend", "base_url", "identified_by")
# How long the calling thread waits on the batches in flight before it looks again (notes, interrupts).
_POLL_SECONDS = 0.2


@dataclass
class CachedGeneration:
    """A generation with the exact prompt text it answered and whether it came from the cache."""

    generation: Generation
    prompt: str
    cached: bool


@dataclass
class RunnerStats:
    """Counters for the end-of-run summary and the benchmarks."""

    requests: int = 0
    cache_hits: int = 0
    model_calls: int = 0
    model_seconds: float = 0.0
    max_in_flight_seen: int = 0
    completion_tokens: int = 0
    wall_seconds: float = 0.0

    def merge(self, other: RunnerStats) -> None:
        for name in ("requests", "cache_hits", "model_calls", "model_seconds", "completion_tokens",
                     "wall_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.max_in_flight_seen = max(self.max_in_flight_seen, other.max_in_flight_seen)

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


class Progress:
    """"model/persona: done/total cases" lines, one about every quarter of the way and one at the end."""

    def __init__(self, label: str, total: int, *, write: Callable[[str], None] | None = None,
                 every: float = 0.25) -> None:
        self.label, self.total, self.done, self.cached = label, total, 0, 0
        self._write = write
        self._every = every
        self._next_report = every
        self._started = time.perf_counter()
        self._lock = threading.Lock()

    def advance(self, count: int, *, cached: int = 0) -> None:
        with self._lock:
            self.done += count
            self.cached += cached
            if self._write is None or self.total == 0 or count == 0:
                return
            fraction = self.done / self.total
            if fraction >= self._next_report or self.done == self.total:
                elapsed = time.perf_counter() - self._started
                self._write(f"persona-eval {self.label}: {self.done}/{self.total} cases "
                            f"({self.cached} cached, {elapsed:.0f} s)\n")
                while self._next_report <= fraction:
                    self._next_report += self._every


class _InFlight:
    """The batches being answered: how many requests each holds and when it was sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sent: dict[int, tuple[float, int]] = {}
        self._tokens = itertools.count()
        self._last_note = -math.inf

    def begin(self, requests: int) -> int:
        token = next(self._tokens)
        with self._lock:
            self._sent[token] = (time.monotonic(), requests)
        return token

    def end(self, token: int) -> None:
        with self._lock:
            self._sent.pop(token, None)

    def due(self, after: float) -> tuple[int, float] | None:
        """(requests in flight, seconds the oldest has waited) when a note is due: the oldest has
        waited `after` seconds and the last note is `after` seconds old; else None."""
        now = time.monotonic()
        with self._lock:
            if not self._sent or now - self._last_note < after:
                return None
            oldest = now - min(sent for sent, _ in self._sent.values())
            if oldest < after:
                return None
            self._last_note = now
            return sum(requests for _, requests in self._sent.values()), oldest


class Runner:
    """Sends requests for one backend through the cache.

    ``identity_change`` is None, or a sentence saying that the model now at this backend's address is
    not the one whose answers the cache holds (set on the first request or decoding_record call).

    ``notice`` receives the waiting notes (see the module docstring), one line ending in a newline
    each, as Progress writes; from a helper thread when the batches run in the calling thread."""

    def __init__(self, backend: Backend, cache: ResultCache | NullCache, *,
                 extra_key: dict[str, Any] | None = None, notice: Callable[[str], None] | None = None,
                 wait_note_after: float = 30.0) -> None:
        if (isinstance(wait_note_after, bool) or not isinstance(wait_note_after, (int, float))
                or not wait_note_after > 0):
            raise ConfigError(f"wait_note_after must be a positive number of seconds, got {wait_note_after!r}")
        self.backend = backend
        self.cache = cache
        self.extra_key = extra_key or {}
        self.notice = notice
        self.wait_note_after = float(wait_note_after)
        self.stats = RunnerStats()
        self.identity_change: str | None = None
        self._identity: dict[str, Any] | None = None
        self._dropped_recorded: dict[str, str] = {}
        self._lock = threading.Lock()
        self._prepare_lock = threading.Lock()

    # -- identity and decoding ----------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """The backend's identity, compared once with the cache's record (see the module docstring)."""
        if self._identity is None:
            with self._prepare_lock:
                if self._identity is None:
                    identity = self.backend.identity()
                    self._compare_with_record(identity)
                    self._restore_dropped(identity)
                    self._identity = identity
        return self._identity

    def _address(self, identity: dict[str, Any]) -> dict[str, Any]:
        address = getattr(self.backend, "address", None)
        if address is not None:
            return dict(address())
        return {"backend": identity.get("backend"), "model": identity.get("model"),
                "base_url": identity.get("base_url")}

    def _compare_with_record(self, identity: dict[str, Any]) -> None:
        address = self._address(identity)
        name = "identity/" + cache_key(address)
        record = self.cache.get_note(name)
        previous = record.get("identity") if record is not None else None
        if isinstance(previous, dict) and cache_key(previous) == cache_key(identity):
            return
        if isinstance(previous, dict):
            where = address.get("base_url") or address.get("model")
            self.identity_change = describe_identity_change(self.backend.name, str(where), previous, identity)
        self.cache.put_note(name, {"address": address, "identity": identity})

    def _dropped_note(self, identity: dict[str, Any]) -> str:
        return "dropped/" + cache_key(identity)

    def _restore_dropped(self, identity: dict[str, Any]) -> None:
        learn = getattr(self.backend, "learn_dropped_parameters", None)
        record = self.cache.get_note(self._dropped_note(identity)) if learn is not None else None
        if record is None or not isinstance(record.get("dropped"), dict) or learn is None:
            return
        known = {str(k): str(v) for k, v in record["dropped"].items()}
        learn(known)
        self._dropped_recorded = known

    def _record_dropped(self) -> None:
        """Keep the parameters the model refused, for the next run's keys (only when they changed)."""
        dropped = getattr(self.backend, "dropped_parameters", None)
        if dropped is None or self._identity is None:
            return
        now = dict(dropped())
        if now and now != self._dropped_recorded:
            self.cache.put_note(self._dropped_note(self._identity), {"identity": self._identity, "dropped": now})
            self._dropped_recorded = now

    def decoding_record(self, config: GenerationConfig, scoring: LabelScoring | None) -> dict[str, Any]:
        """What is sent to the model for `config` and `scoring` (plain JSON): temperature, top_p,
        max_tokens, stop, logprobs, top_logprobs, constrained_ranking, and ``dropped``, each parameter
        the model refused -> the reason."""
        self.identity()  # parameters refused in an earlier run are known from here on
        decoding = getattr(self.backend, "decoding", None)
        record = dict(decoding(config, scoring)) if decoding is not None else requested_decoding(config, scoring)
        record["dropped"] = dict(record.get("dropped") or {})
        return record

    def _sent(self, config: GenerationConfig, scoring: LabelScoring | None) -> dict[str, Any] | None:
        """What the backend will send, for the key; None for a backend that does not say."""
        decoding = getattr(self.backend, "decoding", None)
        if decoding is None:
            return None
        return {name: value for name, value in decoding(config, scoring).items() if name != "dropped"}

    def _key(self, kind: str, prompt: str, **parts: Any) -> str:
        return cache_key({"kind": kind, "identity": self.identity(), "prompt": prompt, **self.extra_key, **parts})

    def _generate_key(self, prompt: str, config: GenerationConfig, scoring: LabelScoring | None,
                      sent: dict[str, Any] | None, context: Mapping[str, Any] | None = None) -> str:
        parts: dict[str, Any] = {"decoding": config.key(), "scoring": scoring.key() if scoring else None,
                                 **(context or {})}
        if sent is not None:
            parts["sent"] = sent
        return self._key("generate", prompt, **parts)

    # -- requests -----------------------------------------------------------------------------------
    def generate(self, requests: Sequence[RenderedMessages], config: GenerationConfig,
                 scoring: LabelScoring | None, *, progress: Progress | None = None,
                 context: Mapping[str, Any] | None = None) -> list[CachedGeneration]:
        """One generation per request, in order. `context` (plain JSON, e.g. the prompt template's id and
        hash) is part of every cache key besides the prompt text and decoding."""
        started = time.perf_counter()
        prompts = [self.backend.render_prompt(r) for r in requests]
        self.identity()
        sent = self._sent(config, scoring)
        keys = [self._generate_key(p, config, scoring, sent, context) for p in prompts]
        found = self.cache.get_many(list(dict.fromkeys(keys)))
        results: list[CachedGeneration | None] = [
            CachedGeneration(Generation.from_json(found[k]), p, True) if k in found else None
            for k, p in zip(keys, prompts, strict=True)
        ]
        hits = sum(r is not None for r in results)
        if progress is not None:
            progress.advance(hits, cached=hits)
        missing = [i for i, r in enumerate(results) if r is None]

        def call(indices: list[int]) -> list[Generation]:
            return self.backend.generate([requests[i] for i in indices], config, scoring)

        def store(indices: list[int], generations: list[Generation]) -> None:
            # A generation sent with less than was planned (a parameter refused meanwhile) is stored
            # under the key of what was sent for it.
            stored = {(keys[i] if g.sent is None or g.sent == sent
                       else self._generate_key(prompts[i], config, scoring, g.sent, context)): g.to_json()
                      for i, g in zip(indices, generations, strict=True)}
            self.cache.put_many(stored)
            for i, g in zip(indices, generations, strict=True):
                results[i] = CachedGeneration(g, prompts[i], False)
                self.stats.completion_tokens += int(g.usage.get("completion_tokens", 0))
            self._record_dropped()
            if progress is not None:
                progress.advance(len(indices))

        try:
            self._dispatch(missing, [len(p) for p in prompts], call, store)
        finally:
            self._record_dropped()  # what a failing run learnt about the model is kept too
        self.stats.requests += len(requests)
        self.stats.cache_hits += hits
        self.stats.wall_seconds += time.perf_counter() - started
        return [r for r in results if r is not None]

    def score_labels(self, requests: Sequence[RenderedMessages], scoring: LabelScoring, *,
                     context: Mapping[str, Any] | None = None) -> list[dict[str, float | None]]:
        """Label log-probabilities at the prompt boundary, one mapping per request, in order."""
        prompts = [self.backend.render_prompt(r) for r in requests]
        keys = [self._key("score_labels", p, scoring=scoring.key(), **(context or {})) for p in prompts]
        found = self.cache.get_many(list(dict.fromkeys(keys)))
        results: list[dict[str, float | None] | None] = [found[k]["label_logprobs"] if k in found else None
                                                         for k in keys]
        missing = [i for i, r in enumerate(results) if r is None]

        def call(indices: list[int]) -> list[dict[str, float | None]]:
            return self.backend.score_labels([requests[i] for i in indices], scoring)

        def store(indices: list[int], scores: list[dict[str, float | None]]) -> None:
            # A reading with no label at all (a server found to score no prompts) is not a result: kept
            # out of the cache, so that a server that can score is asked next time.
            self.cache.put_many({keys[i]: {"label_logprobs": s} for i, s in zip(indices, scores, strict=True)
                                 if any(v is not None for v in s.values())})
            for i, s in zip(indices, scores, strict=True):
                results[i] = s

        self._dispatch(missing, [len(p) for p in prompts], call, store)
        return [r for r in results if r is not None]

    def _dispatch(self, missing: list[int], lengths: list[int], call: Callable[[list[int]], list[Any]],
                  store: Callable[[list[int], list[Any]], None]) -> None:
        """Run `call` on batches of `missing`, with up to max_in_flight batches at once; `store` each
        result as it arrives (in this thread). On a failure, stop sending, keep what finished, re-raise.
        On an interrupt, stop at once (see the module docstring)."""
        if not missing:
            return
        ordered = sorted(missing, key=lambda i: lengths[i])
        size = max(1, self.backend.batch_size)
        batches = [ordered[i:i + size] for i in range(0, len(ordered), size)]
        in_flight_limit = max(1, self.backend.max_in_flight)
        in_flight = _InFlight()

        def timed(batch: list[int]) -> list[Any]:
            start = time.perf_counter()
            token = in_flight.begin(len(batch))
            try:
                return call(batch)
            finally:
                in_flight.end(token)
                with self._lock:
                    self.stats.model_seconds += time.perf_counter() - start
                    self.stats.model_calls += 1

        if in_flight_limit == 1:
            with self._noting_from_a_thread(in_flight):
                for batch in batches:
                    store(batch, timed(batch))
            self.stats.max_in_flight_seen = max(self.stats.max_in_flight_seen, 1)
            return
        try:
            self._dispatch_on_threads(batches, in_flight_limit, timed, store, in_flight)
        except Exception:
            raise  # the batches in flight finish on their own threads; their results are not kept
        except BaseException:
            # Interrupted (Ctrl-C, SystemExit): the run ends here. Nothing more is retried or sent.
            cancel = getattr(self.backend, "cancel", None)
            if cancel is not None:
                cancel()
            raise

    def _dispatch_on_threads(self, batches: list[list[int]], in_flight_limit: int,
                             timed: Callable[[list[int]], list[Any]],
                             store: Callable[[list[int], list[Any]], None], in_flight: _InFlight) -> None:
        """Each batch on a daemon thread of its own, at most `in_flight_limit` at once. (Not a
        ThreadPoolExecutor: the interpreter joins its threads at exit, which waits out every request
        still in flight.)"""
        finished: queue.SimpleQueue[tuple[list[int], list[Any] | None, BaseException | None]] = queue.SimpleQueue()

        def work(batch: list[int]) -> None:
            try:
                outcome = timed(batch)
            except BaseException as error:  # handed to the calling thread, which raises it
                finished.put((batch, None, error))
            else:
                finished.put((batch, outcome, None))

        waiting = list(reversed(batches))
        pending = 0
        failure: BaseException | None = None
        while waiting or pending:
            while waiting and failure is None and pending < in_flight_limit:
                threading.Thread(target=work, args=(waiting.pop(),), name="persona-eval-request",
                                 daemon=True).start()
                pending += 1
            self.stats.max_in_flight_seen = max(self.stats.max_in_flight_seen, pending)
            try:
                batch, outcome, error = finished.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                self._note_if_due(in_flight)
                continue
            pending -= 1
            if error is not None:
                failure = failure or error
                waiting.clear()
            else:
                store(batch, outcome or [])
            self._note_if_due(in_flight)
        if failure is not None:
            raise failure

    @contextlib.contextmanager
    def _noting_from_a_thread(self, in_flight: _InFlight) -> Iterator[None]:
        """Waiting notes from a daemon thread, for batches that run in the calling thread."""
        if self.notice is None:
            yield
            return
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(min(_POLL_SECONDS * 5, self.wait_note_after)):
                self._note_if_due(in_flight)

        watcher = threading.Thread(target=watch, name="persona-eval-wait-notes", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()

    def _note_if_due(self, in_flight: _InFlight) -> None:
        if self.notice is None:
            return
        due = in_flight.due(self.wait_note_after)
        if due is not None:
            self.notice(self._wait_note(*due))

    def _wait_note(self, requests: int, oldest: float) -> str:
        """The note on `requests` in flight whose oldest has waited `oldest` seconds, e.g.
        ``persona-eval: waiting on http://gpu:8000/v1: 32 requests in flight, oldest 31 s (timeout 120
        s, 5 retries)``; for a backend that does not describe an endpoint, ``waiting on model NAME``."""
        count = f"{requests} request{'' if requests == 1 else 's'} in flight, oldest {oldest:.0f} s"
        describe = getattr(self.backend, "describe_wait", None)
        if describe is None:
            return f"persona-eval: waiting on model {self.backend.name}: {count}\n"
        facts = describe()
        retries = facts.get("retries")
        text = (f"persona-eval: waiting on {facts.get('endpoint')}: {count} (timeout {facts.get('timeout'):g} s, "
                f"{retries} {'retry' if retries == 1 else 'retries'})")
        failed = int(facts.get("failed_in_a_row") or 0)
        if failed:
            text += (f"; the last {failed} {'try' if failed == 1 else 'tries'} failed"
                     + (f" ({facts['last_failure']})" if facts.get("last_failure") else ""))
        return text + "\n"


def describe_identity_change(name: str, where: str, previous: dict[str, Any], current: dict[str, Any]) -> str:
    """The sentence saying that model `name` at `where` is not the one cached before, and how it differs.

    >>> describe_identity_change("m", "http://h/v1", {"root": "/models/X"}, {"root": "/models/Y"})
    "model 'm' at http://h/v1 is not the model cached before (the server now reports root /models/Y, \
was /models/X): its cached answers are not used"
    """
    server: list[str] = []
    other: list[str] = []
    others = sorted((set(previous) | set(current)) - set(_SERVER_FACTS) - set(_NOT_COMPARED))
    for field in [*_SERVER_FACTS, *others]:
        old, new = previous.get(field), current.get(field)
        if old == new:
            continue
        if field in _SERVER_FACTS:
            server.append(f"{_SERVER_FACTS[field]} {_shown(new, 'not reported')}, was {_shown(old, 'not reported')}")
        else:
            other.append(f"{field} {_shown(new, 'none')}, was {_shown(old, 'none')}")
    parts = (["the server now reports " + "; ".join(server)] if server else []) + other
    if not parts:
        parts = [f"identified now by {', '.join(current.get('identified_by') or []) or 'nothing'}, was by "
                 f"{', '.join(previous.get('identified_by') or []) or 'nothing'}"]
    return (f"model {name!r} at {where} is not the model cached before ({'; '.join(parts)}): "
            "its cached answers are not used")


def _shown(value: Any, missing: str) -> str:
    return missing if value is None else str(value)
