"""Concurrency for served models: a request pool shared by every caller of one model, the gauge that
measures how full it kept the server, and the adaptive limit that a rate limit lowers.

:class:`RequestPool` runs jobs (a batch of requests each) on daemon threads, at most ``limit`` at once,
in the order they were submitted; a job's outcome is a :class:`concurrent.futures.Future`. Threads are
started as jobs arrive and end after ``idle_seconds`` without work, so an idle pool holds no thread, and
none ever keeps the process alive (a ThreadPoolExecutor's threads are joined at exit, which would wait
out every request still in flight after a Ctrl-C).

:class:`InFlightGauge` integrates the number of requests in flight over time: the mean over the time
anything was in flight says how busy the pool kept the server (a pool that drains between pytest cases
shows a low mean however high its limit).

:class:`AdaptiveLimit` is how many requests a backend lets out at once: its ceiling at first, halved when
the server answers that it is over its limit (HTTP 429, 503), then raised by one after each run of
answers as long as the limit, up to the ceiling again (additive increase, multiplicative decrease, as TCP
does). Only an answer to a request sent at the current limit lowers it, so a burst of refusals of
requests sent before a cut cuts once, not once per refusal.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

__all__ = ["AdaptiveLimit", "InFlightGauge", "RequestPool", "Slot", "cancel_future"]


class InFlightGauge:
    """Requests in flight over time: how many were sent, the most at once, and the mean while any were."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._peak = 0
        self._sent = 0
        self._area = 0.0  # requests x seconds
        self._busy = 0.0  # seconds with at least one request in flight
        self._last: float | None = None

    def _advance(self) -> None:
        now = time.monotonic()
        if self._last is not None and self._count > 0:
            self._area += self._count * (now - self._last)
            self._busy += now - self._last
        self._last = now

    def enter(self, requests: int) -> None:
        with self._lock:
            self._advance()
            self._count += requests
            self._sent += requests
            self._peak = max(self._peak, self._count)

    def exit(self, requests: int) -> None:
        with self._lock:
            self._advance()
            self._count -= requests

    def snapshot(self) -> dict[str, Any]:
        """``sent`` (requests), ``max_in_flight``, ``mean_in_flight`` (over ``busy_seconds``, the time
        with any request in flight; None before the first) and ``busy_seconds``."""
        with self._lock:
            self._advance()
            mean = round(self._area / self._busy, 2) if self._busy > 0 else None
            return {"sent": self._sent, "max_in_flight": self._peak, "mean_in_flight": mean,
                    "busy_seconds": round(self._busy, 3)}


@dataclass
class _Job:
    send: Callable[[], Any]
    future: Future[Any]
    requests: int


class RequestPool:
    """Jobs on daemon threads named `thread_name`, at most `limit` at once, first submitted first sent.

    A job that raises stops the pool's queue: the jobs not yet started are cancelled (their futures say
    so) and the ones running finish; a later :meth:`submit` starts again. :meth:`stop` does the same for
    good (an interrupted run)."""

    def __init__(self, limit: int, *, gauge: InFlightGauge | None = None, thread_name: str = "persona-eval-request",
                 idle_seconds: float = 2.0) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self.gauge = gauge if gauge is not None else InFlightGauge()
        self.peak_running = 0  # the most jobs running at once
        self.failure: BaseException | None = None  # what the last job that failed raised
        self._thread_name = thread_name
        self._idle_seconds = idle_seconds
        self._queue: collections.deque[_Job] = collections.deque()
        # One lock, two conditions: a job queued wakes one idle thread; a job ended wakes who waits for all to end.
        self._lock = threading.Lock()
        self._work_queued = threading.Condition(self._lock)
        self._job_ended = threading.Condition(self._lock)
        self._workers = 0
        self._idle = 0
        self._running = 0
        self._stopped = False

    def submit(self, send: Callable[[], Any], *, requests: int = 1, future: Future[Any] | None = None) -> Future[Any]:
        """Queue `send` (a call answering `requests` requests); its future (`future`, made beforehand by a
        caller that hands it out before the job is queued, or a new one) holds what it returns or raises."""
        future = Future() if future is None else future
        if future.done():  # cancelled before it was queued
            return future
        with self._lock:
            if self._stopped:
                cancel_future(future)
                return future
            self._queue.append(_Job(send, future, requests))
            if self._idle == 0 and self._workers < self.limit:
                self._workers += 1
                threading.Thread(target=self._work, name=self._thread_name, daemon=True).start()
            else:
                self._work_queued.notify()
        return future

    def _next(self) -> _Job | None:
        with self._lock:
            while not self._queue and not self._stopped:
                self._idle += 1
                woken = self._work_queued.wait(self._idle_seconds)
                self._idle -= 1
                if not woken and not self._queue:
                    break
            if self._stopped or not self._queue:
                self._workers -= 1
                return None
            self._running += 1
            self.peak_running = max(self.peak_running, self._running)
            return self._queue.popleft()

    def _work(self) -> None:
        while (job := self._next()) is not None:
            if job.future.set_running_or_notify_cancel():
                self.gauge.enter(job.requests)
                try:
                    job.future.set_result(job.send())
                except BaseException as error:  # handed to whoever waits on the future
                    self.failure = error
                    self.cancel_queued()
                    job.future.set_exception(error)
                finally:
                    self.gauge.exit(job.requests)
            with self._lock:
                self._running -= 1
                if not self._running:
                    self._job_ended.notify_all()

    def cancel_queued(self) -> int:
        """Cancel the jobs not yet started; how many were."""
        with self._lock:
            jobs, self._queue = list(self._queue), collections.deque()
        for job in jobs:
            cancel_future(job.future)
        return len(jobs)

    def wait_running(self, timeout: float | None = None) -> bool:
        """Wait until no job is running (what was sent has its answer); False if `timeout` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._running:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._job_ended.wait(left)
        return True

    def stop(self) -> None:
        """No job starts from now on: the queue is cancelled and idle threads end."""
        with self._lock:
            self._stopped = True
            self._work_queued.notify_all()
        self.cancel_queued()

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        with self._lock:
            return len(self._queue) + self._running


def cancel_future(future: Future[Any]) -> None:
    """Cancel a future that no thread runs, and tell whoever waits on it (concurrent.futures.wait counts a
    cancelled future as done only once it was notified)."""
    if future.cancel():
        future.set_running_or_notify_cancel()


class Slot:
    """One request's permission to be sent (see :meth:`AdaptiveLimit.slot`)."""

    def __init__(self, epoch: int = 0) -> None:
        self._epoch = epoch  # the limit's cuts when the request went out
        self.outcome: str | None = None  # "answered" or "limited"; None: neither (an error, a timeout)

    def answered(self) -> None:
        self.outcome = "answered"

    def limited(self) -> None:
        self.outcome = "limited"


class AdaptiveLimit:
    """How many requests may be sent at once (see the module docstring): `ceiling` at first, never below 1."""

    def __init__(self, ceiling: int) -> None:
        if ceiling < 1:
            raise ValueError(f"ceiling must be at least 1, got {ceiling}")
        self.ceiling = ceiling
        self.current = ceiling
        self.lowest = ceiling  # the lowest it went
        self.cuts = 0
        self._active = 0
        self._epoch = 0  # counts the cuts: a refusal of a request sent before the last cut does not cut again
        self._answered = 0  # answers since the limit last moved
        self._condition = threading.Condition()

    @contextlib.contextmanager
    def slot(self, cancelled: threading.Event | None = None) -> Iterator[Slot]:
        """Wait for room (or until `cancelled` is set), hold it while the request is out; mark the slot
        ``answered()`` or ``limited()`` before leaving."""
        with self._condition:
            while self._active >= self.current and not (cancelled is not None and cancelled.is_set()):
                self._condition.wait(0.2)
            self._active += 1
            slot = Slot(self._epoch)
        try:
            yield slot
        finally:
            self._release(slot)

    def _release(self, slot: Slot) -> None:
        with self._condition:
            self._active -= 1
            if slot.outcome == "limited" and slot._epoch == self._epoch and self.current > 1:
                self.current = max(1, self.current // 2)
                self.lowest = min(self.lowest, self.current)
                self.cuts += 1
                self._epoch += 1
                self._answered = 0
            elif slot.outcome == "answered" and self.current < self.ceiling:
                self._answered += 1
                if self._answered >= self.current:
                    self.current += 1
                    self._answered = 0
                    self._condition.notify()  # a second place: one more request may go
            self._condition.notify()  # the place this one held

    def snapshot(self) -> dict[str, int]:
        with self._condition:
            return {"ceiling": self.ceiling, "current": self.current, "lowest": self.lowest, "cuts": self.cuts}
