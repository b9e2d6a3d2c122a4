"""Batching, concurrency, caching and progress: the only place that calls a backend.

Requests are looked up in the cache first; the misses are sorted by prompt length (less padding), cut
into batches of ``backend.batch_size`` and sent with up to ``backend.max_in_flight`` batches in
flight. Each finished batch is written to the cache at once, so an interrupted or failed run keeps
everything it finished, and a rerun asks the model only for what is missing.

The model under test is the model that answered. A cache key holds the backend's identity (for a
served model, what the server reports about its weights and process) and the decoding actually sent:
a result generated without a parameter that the server refused is stored under the key of what was
sent, and the refused parameters are kept in the cache per identity, so that a later run computes the
same keys before sending. On first need the runner compares the identity with the one last recorded
at the same address (backend kind, served name and URL, or model path); when they differ,
``identity_change`` says why the cache misses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from persona_eval.backends.base import Backend, Generation, GenerationConfig, LabelScoring, requested_decoding
from persona_eval.cache import NullCache, ResultCache, cache_key
from persona_eval.prompts import RenderedMessages

__all__ = ["CachedGeneration", "Progress", "Runner", "RunnerStats", "describe_identity_change"]

# Identity fields that a server reports, named as a person reads them, in the order they are told.
_SERVER_FACTS = {"root": "root", "max_model_len": "max_model_len", "process_started": "process started"}
_NOT_COMPARED = ("backend", "base_url", "identified_by")


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


class Runner:
    """Sends requests for one backend through the cache.

    ``identity_change`` is None, or a sentence saying that the model now at this backend's address is
    not the one whose answers the cache holds (set on the first request or decoding_record call)."""

    def __init__(self, backend: Backend, cache: ResultCache | NullCache, *,
                 extra_key: dict[str, Any] | None = None) -> None:
        self.backend = backend
        self.cache = cache
        self.extra_key = extra_key or {}
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
                      sent: dict[str, Any] | None) -> str:
        parts: dict[str, Any] = {"decoding": config.key(), "scoring": scoring.key() if scoring else None}
        if sent is not None:
            parts["sent"] = sent
        return self._key("generate", prompt, **parts)

    # -- requests -----------------------------------------------------------------------------------
    def generate(self, requests: Sequence[RenderedMessages], config: GenerationConfig,
                 scoring: LabelScoring | None, *, progress: Progress | None = None) -> list[CachedGeneration]:
        """One generation per request, in order."""
        started = time.perf_counter()
        prompts = [self.backend.render_prompt(r) for r in requests]
        self.identity()
        sent = self._sent(config, scoring)
        keys = [self._generate_key(p, config, scoring, sent) for p in prompts]
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
                       else self._generate_key(prompts[i], config, scoring, g.sent)): g.to_json()
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

    def score_labels(self, requests: Sequence[RenderedMessages], scoring: LabelScoring
                     ) -> list[dict[str, float | None]]:
        """Label log-probabilities at the prompt boundary, one mapping per request, in order."""
        prompts = [self.backend.render_prompt(r) for r in requests]
        keys = [self._key("score_labels", p, scoring=scoring.key()) for p in prompts]
        found = self.cache.get_many(list(dict.fromkeys(keys)))
        results: list[dict[str, float | None] | None] = [found[k]["label_logprobs"] if k in found else None
                                                         for k in keys]
        missing = [i for i, r in enumerate(results) if r is None]

        def call(indices: list[int]) -> list[dict[str, float | None]]:
            return self.backend.score_labels([requests[i] for i in indices], scoring)

        def store(indices: list[int], scores: list[dict[str, float | None]]) -> None:
            self.cache.put_many({keys[i]: {"label_logprobs": s} for i, s in zip(indices, scores, strict=True)})
            for i, s in zip(indices, scores, strict=True):
                results[i] = s

        self._dispatch(missing, [len(p) for p in prompts], call, store)
        return [r for r in results if r is not None]

    def _dispatch(self, missing: list[int], lengths: list[int], call: Callable[[list[int]], list[Any]],
                  store: Callable[[list[int], list[Any]], None]) -> None:
        """Run `call` on batches of `missing`, with up to max_in_flight batches at once; `store` each
        result as it arrives. On a failure, stop sending, keep what finished, re-raise."""
        if not missing:
            return
        ordered = sorted(missing, key=lambda i: lengths[i])
        size = max(1, self.backend.batch_size)
        batches = [ordered[i:i + size] for i in range(0, len(ordered), size)]
        in_flight_limit = max(1, self.backend.max_in_flight)

        def timed(batch: list[int]) -> list[Any]:
            start = time.perf_counter()
            try:
                return call(batch)
            finally:
                with self._lock:
                    self.stats.model_seconds += time.perf_counter() - start
                    self.stats.model_calls += 1

        if in_flight_limit == 1:
            for batch in batches:
                store(batch, timed(batch))
            self.stats.max_in_flight_seen = max(self.stats.max_in_flight_seen, 1)
            return
        with ThreadPoolExecutor(max_workers=in_flight_limit, thread_name_prefix="persona-eval") as pool:
            pending: dict[Future[list[Any]], list[int]] = {}
            queue = list(reversed(batches))
            failure: BaseException | None = None
            while queue or pending:
                while queue and failure is None and len(pending) < in_flight_limit:
                    batch = queue.pop()
                    pending[pool.submit(timed, batch)] = batch
                self.stats.max_in_flight_seen = max(self.stats.max_in_flight_seen, len(pending))
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    batch = pending.pop(future)
                    error = future.exception()
                    if error is not None:
                        failure = failure or error
                    else:
                        store(batch, future.result())
                if failure is not None:
                    queue.clear()
            if failure is not None:
                raise failure



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
