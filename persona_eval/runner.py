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

import collections
import contextlib
import itertools
import json
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any

from persona_eval.backends.base import Backend, Generation, GenerationConfig, LabelScoring, requested_decoding
from persona_eval.cache import NullCache, ResultCache, cache_key, cache_keys
from persona_eval.errors import BackendError, ConfigError
from persona_eval.pool import InFlightGauge, RequestPool, cancel_future
from persona_eval.prompts import RenderedMessages

__all__ = ["CachedGeneration", "Progress", "Runner", "RunnerStats", "describe_identity_change"]

# Identity fields that a server reports, named as a person reads them, in the order they are told.
_SERVER_FACTS = {"root": "root", "max_model_len": "max_model_len", "process_started": "process started"}
_NOT_COMPARED = ("backend", "base_url", "identified_by")
# How many times its limit a pool holds (queued and running) before prefetched requests wait in the backlog.
_LOOKAHEAD = 2
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


@dataclass
class _Work:
    """Requests of one kind ("generate" or "score_labels") as the runner sends them: their prompts, cache keys
    and names in the pool, `call` (the backend, for some of them by index), `persist` (their answers into the
    cache), `from_cache` (a cached entry back into an answer), and `after` (run after answers were stored)."""

    kind: str
    prompts: list[str]
    make_keys: Callable[[Sequence[int]], list[str]]  # the cache keys of some of them, by index
    tickets: list[str]  # what the pool knows a request by: what was asked, not what is sent (_generation_work)
    call: Callable[[list[int]], list[Any]]
    persist: Callable[[list[int], list[Any]], None]
    from_cache: Callable[[dict[str, Any]], Any]
    after: Callable[[], None] | None
    _keys: dict[int, str] = field(default_factory=dict)

    def keys_of(self, indices: Sequence[int]) -> list[str]:
        """The cache keys of `indices`, computed when first needed: a request the pool answers for a case
        needs none (its prefetch computed it)."""
        wanted = [i for i in dict.fromkeys(indices) if i not in self._keys]
        if wanted:
            self._keys.update(zip(wanted, self.make_keys(wanted), strict=True))
        return [self._keys[i] for i in indices]

    def key(self, index: int) -> str:
        return self.keys_of([index])[0]


@dataclass
class _Ticket:
    """A request queued or answered in the pool: the future of its job and its place in the job's answers."""

    future: Future[Any]
    position: int


class _StoreFailed(Exception):
    """An answer that could not be stored: raised to the caller at once, not waited out like a model's error."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


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
        # The pool of a backend with several requests in flight (created on first need), the requests queued
        # or answered in it and not yet taken by a caller, and what it kept in flight.
        self._gauge = InFlightGauge()
        self._pool: RequestPool | None = None
        self._tickets: dict[str, _Ticket] = {}
        # Prefetched requests not yet in the pool (see _top_up), each batch with its future.
        self._backlog: collections.deque[tuple[_Work, list[int], Future[Any]]] = collections.deque()

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
        return self._key("generate", prompt, **self._generate_parts(config, scoring, sent, context))

    @staticmethod
    def _generate_parts(config: GenerationConfig, scoring: LabelScoring | None, sent: dict[str, Any] | None,
                        context: Mapping[str, Any] | None) -> dict[str, Any]:
        """A generation's cache key parts besides its kind, the model's identity and the prompt."""
        parts: dict[str, Any] = {"decoding": config.key(), "scoring": scoring.key() if scoring else None,
                                 **(context or {})}
        if sent is not None:
            parts["sent"] = sent
        return parts

    def _keys(self, kind: str, prompts: Sequence[str], parts: Mapping[str, Any]) -> list[str]:
        """``_key(kind, prompt, **parts)`` of each prompt, the shared parts made canonical once."""
        return cache_keys({"kind": kind, "identity": self.identity(), **self.extra_key, **parts}, "prompt", prompts)

    # -- requests -----------------------------------------------------------------------------------
    def generate(self, requests: Sequence[RenderedMessages], config: GenerationConfig,
                 scoring: LabelScoring | None, *, progress: Progress | None = None,
                 context: Mapping[str, Any] | None = None) -> list[CachedGeneration]:
        """One generation per request, in order. `context` (plain JSON, e.g. the prompt template's id and
        hash) is part of every cache key besides the prompt text and decoding."""
        started = time.perf_counter()
        work = self._generation_work(requests, config, scoring, context)
        results: list[CachedGeneration | None] = [None] * len(requests)

        def take(indices: list[int], generations: list[Generation], cached: bool) -> None:
            for i, g in zip(indices, generations, strict=True):
                results[i] = CachedGeneration(g, work.prompts[i], cached)
            if progress is not None:
                progress.advance(len(indices), cached=len(indices) if cached else 0)

        try:
            hits = self._run(work, take)
        finally:
            self._record_dropped()  # what a failing run learnt about the model is kept too
        self.stats.requests += len(requests)
        self.stats.cache_hits += hits
        self.stats.wall_seconds += time.perf_counter() - started
        return [r for r in results if r is not None]

    def prefetch(self, requests: Sequence[RenderedMessages], config: GenerationConfig,
                 scoring: LabelScoring | None, *, context: Mapping[str, Any] | None = None,
                 score_prompts: bool = False) -> int:
        """Queue the generations of `requests` (and with `score_prompts`, their prompt-boundary readings)
        that are neither cached nor queued yet, without waiting: a later :meth:`generate` (or
        :meth:`score_labels`) with the same arguments takes them as they come, as fresh answers. Only a
        backend with several requests in flight has a pool to fill; for others this does nothing.
        Returns how many requests were queued."""
        if not self.pooled:
            return 0
        queued = self._submit(self._generation_work(requests, config, scoring, context))
        if score_prompts and scoring is not None:
            queued += self._submit(self._scoring_work(requests, scoring, context))
        return queued

    def score_labels(self, requests: Sequence[RenderedMessages], scoring: LabelScoring, *,
                     context: Mapping[str, Any] | None = None) -> list[dict[str, float | None]]:
        """Label log-probabilities at the prompt boundary, one mapping per request, in order."""
        work = self._scoring_work(requests, scoring, context)
        results: list[dict[str, float | None] | None] = [None] * len(requests)

        def take(indices: list[int], scores: list[dict[str, float | None]], cached: bool) -> None:
            for i, s in zip(indices, scores, strict=True):
                results[i] = s

        self._run(work, take)
        return [r for r in results if r is not None]

    @property
    def pooled(self) -> bool:
        """Whether requests go through the session's pool (several in flight) rather than one batch at a time."""
        return self.backend.max_in_flight > 1

    def pool_snapshot(self) -> dict[str, Any]:
        """How busy this runner kept its model: ``sent`` requests, ``max_in_flight``, ``mean_in_flight`` (over
        the ``busy_seconds`` with any request in flight), and what the backend adds (``describe_load``: the
        limit a rate limit left, the server's prefix-cache hit rate)."""
        snapshot = self._gauge.snapshot()
        describe = getattr(self.backend, "describe_load", None)
        if describe is not None:
            snapshot.update(describe())
        return snapshot

    def _generation_work(self, requests: Sequence[RenderedMessages], config: GenerationConfig,
                         scoring: LabelScoring | None, context: Mapping[str, Any] | None) -> _Work:
        prompts = [self.backend.render_prompt(r) for r in requests]
        self.identity()
        sent = self._sent(config, scoring)
        parts = self._generate_parts(config, scoring, sent, context)

        def make_keys(indices: Sequence[int]) -> list[str]:
            return self._keys("generate", [prompts[i] for i in indices], parts)

        def call(indices: list[int]) -> list[Generation]:
            return self.backend.generate([requests[i] for i in indices], config, scoring)

        def persist(indices: list[int], generations: list[Generation]) -> None:
            # A generation sent with less than was planned (a parameter refused meanwhile) is stored
            # under the key of what was sent for it.
            keys = work.keys_of(indices)
            self.cache.put_many({(key if g.sent is None or g.sent == sent
                                  else self._generate_key(prompts[i], config, scoring, g.sent, context)): g.to_json()
                                 for i, key, g in zip(indices, keys, generations, strict=True)})
            tokens = sum(int(g.usage.get("completion_tokens", 0)) for g in generations)
            with self._lock:
                self.stats.completion_tokens += tokens

        # In the pool a request is known by what was asked, not by what is sent: a parameter the model refuses
        # meanwhile changes the cache key of every later request, not the request a case waits for.
        work = _Work("generate", prompts, make_keys, _tickets("generate", prompts, parts, without=("sent",)), call,
                     persist, Generation.from_json, self._record_dropped)
        return work

    def _scoring_work(self, requests: Sequence[RenderedMessages], scoring: LabelScoring,
                      context: Mapping[str, Any] | None) -> _Work:
        prompts = [self.backend.render_prompt(r) for r in requests]
        parts = {"scoring": scoring.key(), **(context or {})}

        def make_keys(indices: Sequence[int]) -> list[str]:
            return self._keys("score_labels", [prompts[i] for i in indices], parts)

        def call(indices: list[int]) -> list[dict[str, float | None]]:
            return self.backend.score_labels([requests[i] for i in indices], scoring)

        def persist(indices: list[int], scores: list[dict[str, float | None]]) -> None:
            # A reading with no label at all (a server found to score no prompts) is not a result: kept
            # out of the cache, so that a server that can score is asked next time.
            self.cache.put_many({key: {"label_logprobs": s}
                                 for key, s in zip(work.keys_of(indices), scores, strict=True)
                                 if any(v is not None for v in s.values())})

        work = _Work("score_labels", prompts, make_keys, _tickets("score_labels", prompts, parts), call, persist,
                     lambda found: found["label_logprobs"], None)
        return work

    def _run(self, work: _Work, take: Callable[[list[int], list[Any], bool], None]) -> int:
        """Every item of `work` through `take` (indices, results, whether from the cache): fresh results of
        the pool first, then the cache, then the model. Returns the cache hits."""
        claimed = self._claim(work) if self.pooled else {}
        unclaimed = [i for i, ticket in enumerate(work.tickets) if ticket not in claimed]
        keys = dict(zip(unclaimed, work.keys_of(unclaimed), strict=True))
        found = self.cache.get_many(list(dict.fromkeys(keys.values())))
        hits = [i for i in unclaimed if keys[i] in found]
        if hits:
            take(hits, [work.from_cache(found[keys[i]]) for i in hits], True)
        missing = [i for i in unclaimed if keys[i] not in found]
        if self.pooled:
            self._wait_pooled(work, missing, claimed, take)
        else:
            self._run_here(work, missing, take)
        return len(hits)

    def _run_here(self, work: _Work, missing: list[int], take: Callable[[list[int], list[Any], bool], None]) -> None:
        """A local model: one batch after another in the calling thread (sorted by prompt length, so that a
        batch holds prompts of similar length, less padding), each stored as soon as it is answered."""
        if not missing:
            return
        ordered = sorted(missing, key=lambda i: len(work.prompts[i]))
        size = max(1, self.backend.batch_size)
        in_flight = _InFlight()
        with self._noting_from_a_thread(in_flight):
            for start in range(0, len(ordered), size):
                batch = ordered[start:start + size]
                token = in_flight.begin(len(batch))
                self._gauge.enter(len(batch))
                began = time.perf_counter()
                try:
                    outcome = work.call(batch)
                finally:
                    self._gauge.exit(len(batch))
                    in_flight.end(token)
                    self.stats.model_seconds += time.perf_counter() - began
                    self.stats.model_calls += 1
                work.persist(batch, outcome)
                take(batch, outcome, False)
                if work.after is not None:
                    work.after()
        self.stats.max_in_flight_seen = max(self.stats.max_in_flight_seen, 1)

    # -- the pool: one per runner, shared by every caller ----------------------------------------------
    def _pool_or_create(self) -> RequestPool:
        with self._lock:
            if self._pool is None:
                self._pool = RequestPool(max(1, self.backend.max_in_flight), gauge=self._gauge)
            return self._pool

    def _claim(self, work: _Work) -> dict[str, _Ticket]:
        """The tickets of `work`'s keys already queued or answered in the pool (taken out of it: each
        answer goes to one caller). A ticket whose job was cancelled or failed is dropped, to be sent again."""
        claimed: dict[str, _Ticket] = {}
        with self._lock:
            for key in dict.fromkeys(work.tickets):
                ticket = self._tickets.get(key)
                if ticket is None:
                    continue
                if ticket.future.done() and (ticket.future.cancelled() or ticket.future.exception() is not None):
                    del self._tickets[key]
                    continue
                claimed[key] = self._tickets.pop(key)
        return claimed

    def _submit(self, work: _Work, indices: Sequence[int] | None = None) -> int:
        """Queue the items of `work` (all, or `indices`) that are neither cached nor queued; returns how many.
        Ordered by prompt text, so that prompts sharing a prefix (a persona's system turn) go out together
        and a server's prefix cache is hit."""
        wanted = range(len(work.prompts)) if indices is None else indices
        first: dict[str, int] = {}
        with self._lock:
            for i in wanted:
                if work.tickets[i] not in first and work.tickets[i] not in self._tickets:
                    first[work.tickets[i]] = i
        if indices is None and first:  # a prefetch: what the cache holds needs no request
            found = self.cache.get_many(work.keys_of(list(first.values())))
            first = {ticket: i for ticket, i in first.items() if work.key(i) not in found}
        if not first:
            return 0
        pool = self._pool_or_create()
        ordered = sorted(first.values(), key=lambda i: work.prompts[i])
        size = max(1, self.backend.batch_size)
        for start in range(0, len(ordered), size):
            batch = ordered[start:start + size]
            future: Future[Any] = Future()
            with self._lock:
                for position, i in enumerate(batch):
                    self._tickets[work.tickets[i]] = _Ticket(future, position)
                if indices is None:
                    self._backlog.append((work, batch, future))
            if indices is not None:  # a case's own requests: into the pool at once
                pool.submit(lambda batch=batch: self._answer(work, batch), requests=len(batch),  # type: ignore[misc]
                            future=future)
        self._top_up()
        return len(first)

    def _top_up(self) -> None:
        """Move prefetched requests from the backlog into the pool while it holds fewer than its lookahead
        (queued and running): the server never waits for work, and at most that many answers wait in memory
        for a case that has not started yet, however large the run."""
        pool = self._pool
        if pool is None:
            return
        lookahead = _LOOKAHEAD * pool.limit
        while True:
            with self._lock:
                if not self._backlog or pool.pending >= lookahead:
                    return
                work, batch, future = self._backlog.popleft()
            pool.submit(lambda work=work, batch=batch: self._answer(work, batch), requests=len(batch),  # type: ignore[misc]
                        future=future)

    def _cancel_backlog(self) -> None:
        """Nothing prefetched is sent any more (a request failed, or the run was interrupted)."""
        with self._lock:
            backlog, self._backlog = list(self._backlog), collections.deque()
        for _, _, future in backlog:
            cancel_future(future)

    def _answer(self, work: _Work, batch: list[int]) -> list[Any]:
        """A pool job: ask the model for `batch` and store the answers (on the pool's thread, so that what
        was answered is kept whoever waits for it, and whatever happens to the run afterwards)."""
        began = time.perf_counter()
        try:
            outcome = work.call(batch)
        except BaseException:
            self._cancel_backlog()
            raise
        finally:
            with self._lock:
                self.stats.model_seconds += time.perf_counter() - began
                self.stats.model_calls += 1
        try:
            work.persist(batch, outcome)
        except Exception as error:
            self._cancel_backlog()
            raise _StoreFailed(error) from error
        self._top_up()
        return list(outcome)

    def _wait_pooled(self, work: _Work, missing: list[int], claimed: dict[str, _Ticket],
                     take: Callable[[list[int], list[Any], bool], None]) -> None:
        """Send what is missing through the pool and wait for it and for the claimed tickets, taking each
        answer as it comes. A backend's error: the queue is cancelled, the requests in flight are waited for
        (and kept), then it is raised. A store that fails is raised at once. An interrupt (Ctrl-C) cancels
        the backend and stops the pool: nothing more is sent or retried."""
        self._submit(work, missing)
        claimed.update(self._claim(work))
        by_key: dict[str, list[int]] = {}
        for i, name in enumerate(work.tickets):
            if name in claimed:
                by_key.setdefault(name, []).append(i)
        waiting: dict[Future[Any], list[tuple[str, int]]] = {}
        for key, ticket in claimed.items():
            waiting.setdefault(ticket.future, []).append((key, ticket.position))
        pool = self._pool_or_create()
        in_flight = _InFlight()
        tokens = {future: in_flight.begin(len(items)) for future, items in waiting.items()}
        failure: BaseException | None = None
        try:
            while waiting:
                done, _ = wait(list(waiting), timeout=_POLL_SECONDS, return_when=FIRST_COMPLETED)
                with self._lock:
                    self.stats.max_in_flight_seen = max(self.stats.max_in_flight_seen, pool.peak_running)
                for future in done:
                    items = waiting.pop(future)
                    in_flight.end(tokens.pop(future))
                    error = pool.failure if future.cancelled() else future.exception()
                    if isinstance(error, _StoreFailed):
                        raise error.error
                    if future.cancelled() or error is not None:
                        failure = failure or error or BackendError(
                            f"model {self.backend.name!r}: a request was not sent (the run was stopping)")
                        continue
                    outcome = future.result()
                    indices = [i for key, _ in items for i in by_key[key]]
                    take(indices, [outcome[position] for key, position in items for _ in by_key[key]], False)
                if work.after is not None and done:
                    work.after()
                self._note_if_due(in_flight)
        except BaseException as error:
            if not isinstance(error, Exception):
                # Interrupted (Ctrl-C, SystemExit): the run ends here. Nothing more is retried or sent.
                self._cancel_backlog()
                pool.stop()
                cancel = getattr(self.backend, "cancel", None)
                if cancel is not None:
                    cancel()
            raise
        if failure is not None:
            self._cancel_backlog()
            pool.cancel_queued()
            pool.wait_running()
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


def _tickets(kind: str, prompts: Sequence[str], parts: Mapping[str, Any], without: Sequence[str] = ()) -> list[str]:
    """What the pool knows each request by: its kind, its parts (less `without`) and its prompt, as text
    (unique within one runner, whose model is one; cheaper than a cache key)."""
    shared = json.dumps([kind, {name: value for name, value in parts.items() if name not in without}],
                        sort_keys=True, default=str)
    return [f"{shared}\n{prompt}" for prompt in prompts]


def describe_identity_change(name: str, where: str, previous: dict[str, Any], current: dict[str, Any]) -> str:
    """The sentence saying that model `name` at `where` is not the one cached before, and how it differs.

    >>> describe_identity_change("m", "http://h/v1", {"root": "/models/X"}, {"root": "/models/Y"})
    "model 'm' at http://h/v1 is not the model cached before (the server now reports root /models/Y, \
was /models/X): its cached answers are not used"
    """
    server: list[str] = []
    other: list[str] = []
    others = sorted((set(previous) | set(current)) - set(_SERVER_FACTS) - set(_NOT_COMPARED))
    for fact in [*_SERVER_FACTS, *others]:
        old, new = previous.get(fact), current.get(fact)
        if old == new:
            continue
        if fact in _SERVER_FACTS:
            server.append(f"{_SERVER_FACTS[fact]} {_shown(new, 'not reported')}, was {_shown(old, 'not reported')}")
        else:
            other.append(f"{fact} {_shown(new, 'none')}, was {_shown(old, 'none')}")
    parts = (["the server now reports " + "; ".join(server)] if server else []) + other
    if not parts:
        parts = [f"identified now by {', '.join(current.get('identified_by') or []) or 'nothing'}, was by "
                 f"{', '.join(previous.get('identified_by') or []) or 'nothing'}"]
    return (f"model {name!r} at {where} is not the model cached before ({'; '.join(parts)}): "
            "its cached answers are not used")


def _shown(value: Any, missing: str) -> str:
    return missing if value is None else str(value)
