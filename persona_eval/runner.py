"""Batching, concurrency, caching and progress: the only place that calls a backend.

Requests are looked up in the cache first; the misses are sorted by prompt length (less padding), cut
into batches of ``backend.batch_size`` and sent with up to ``backend.max_in_flight`` batches in
flight. Each finished batch is written to the cache at once, so an interrupted or failed run keeps
everything it finished, and a rerun asks the model only for what is missing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from persona_eval.backends.base import Backend, Generation, GenerationConfig, LabelScoring
from persona_eval.cache import NullCache, ResultCache, cache_key
from persona_eval.prompts import RenderedMessages

__all__ = ["CachedGeneration", "Progress", "Runner", "RunnerStats"]


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
    """Sends requests for one backend through the cache."""

    def __init__(self, backend: Backend, cache: ResultCache | NullCache, *,
                 extra_key: dict[str, Any] | None = None) -> None:
        self.backend = backend
        self.cache = cache
        self.extra_key = extra_key or {}
        self.stats = RunnerStats()
        self._lock = threading.Lock()

    def _key(self, kind: str, prompt: str, **parts: Any) -> str:
        return cache_key({"kind": kind, "identity": self.backend.identity(), "prompt": prompt,
                          **self.extra_key, **parts})

    def generate(self, requests: Sequence[RenderedMessages], config: GenerationConfig,
                 scoring: LabelScoring | None, *, progress: Progress | None = None) -> list[CachedGeneration]:
        """One generation per request, in order."""
        started = time.perf_counter()
        prompts = [self.backend.render_prompt(r) for r in requests]
        keys = [self._key("generate", p, decoding=config.key(),
                          scoring=scoring.key() if scoring else None) for p in prompts]
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
            self.cache.put_many({keys[i]: g.to_json() for i, g in zip(indices, generations, strict=True)})
            for i, g in zip(indices, generations, strict=True):
                results[i] = CachedGeneration(g, prompts[i], False)
                self.stats.completion_tokens += int(g.usage.get("completion_tokens", 0))
            if progress is not None:
                progress.advance(len(indices))

        self._dispatch(missing, [len(p) for p in prompts], call, store)
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

