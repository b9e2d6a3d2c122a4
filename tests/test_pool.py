"""Tests of persona_eval.pool and of what rests on it: one request pool per served model for the whole
session (filled ahead of the pytest cases that need them), the adaptive limit that a rate limit lowers,
replicas behind several servers, and the throughput line that says how busy the server was kept.

Served-model behaviour is tested against the loopback stand-in server (persona_eval.testing.standin).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from persona_eval.backends import ModelSpec, load_models_file
from persona_eval.backends.base import GenerationConfig
from persona_eval.backends.openai_compat import OpenAIBackend
from persona_eval.cache import NullCache, ResultCache
from persona_eval.errors import BackendError, ConfigError
from persona_eval.pool import AdaptiveLimit, InFlightGauge, RequestPool
from persona_eval.prompts import RenderedMessages
from persona_eval.report.summary import _throughput
from persona_eval.report.terminal import throughput_line
from persona_eval.runner import Runner
from persona_eval.testing.standin import StandInServer

REPO = Path(__file__).resolve().parent.parent
CONFIG = GenerationConfig(max_new_tokens=8)


def _requests(count: int, prefix: str = "case") -> list[RenderedMessages]:
    return [RenderedMessages((("user", f"{prefix} {i}"),), None) for i in range(count)]


def _wait_for(condition: Any, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


# -- the pool ---------------------------------------------------------------------------------------------


def test_the_pool_runs_at_most_its_limit_at_once_first_submitted_first_sent() -> None:
    pool = RequestPool(3)
    running, peak, started = [0], [0], []
    lock = threading.Lock()

    def job(number: int) -> int:
        with lock:
            started.append(number)
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return number * 10

    futures = [pool.submit(lambda n=n: job(n)) for n in range(12)]
    assert [f.result(timeout=10) for f in futures] == [n * 10 for n in range(12)]
    assert peak[0] == 3 and pool.peak_running == 3
    assert started[:3] == sorted(started[:3]) and set(started) == set(range(12))
    assert started.index(11) > started.index(0)


def test_a_failing_job_cancels_the_queue_and_the_running_ones_finish() -> None:
    pool = RequestPool(2)
    gate = threading.Event()

    def slow() -> str:
        gate.wait(5)
        return "done"

    fail_now = threading.Event()

    def fail() -> str:
        fail_now.wait(5)
        raise BackendError("the server is down", endpoint="http://h/v1")

    running = pool.submit(slow)
    failing = pool.submit(fail)
    queued = [pool.submit(lambda: "never") for _ in range(5)]
    fail_now.set()
    assert _wait_for(lambda: failing.done())
    assert all(f.cancelled() for f in queued)
    gate.set()
    assert running.result(timeout=5) == "done"
    assert isinstance(pool.failure, BackendError)
    assert pool.submit(lambda: "again").result(timeout=5) == "again"  # a later submit starts again


def test_idle_threads_end_and_a_stopped_pool_starts_nothing() -> None:
    pool = RequestPool(4, thread_name="pool-test-idle", idle_seconds=0.1)
    assert [pool.submit(lambda: 1).result(timeout=5) for _ in range(4)] == [1, 1, 1, 1]
    assert _wait_for(lambda: not any(t.name == "pool-test-idle" for t in threading.enumerate()), 5.0)
    pool.stop()
    assert pool.submit(lambda: 1).cancelled()


def test_the_gauge_reports_the_mean_in_flight_over_the_busy_time() -> None:
    gauge = InFlightGauge()
    assert gauge.snapshot()["mean_in_flight"] is None
    gauge.enter(4)
    time.sleep(0.2)
    gauge.exit(2)
    time.sleep(0.2)
    gauge.exit(2)
    time.sleep(0.2)  # idle time does not count
    snapshot = gauge.snapshot()
    assert snapshot["sent"] == 4 and snapshot["max_in_flight"] == 4
    assert 2.5 <= snapshot["mean_in_flight"] <= 3.5  # (4 x 0.2 + 2 x 0.2) / 0.4, however long the sleeps overrun
    assert 0.38 <= snapshot["busy_seconds"] <= 2.0


def test_the_adaptive_limit_halves_once_per_burst_of_refusals_and_grows_back_by_one() -> None:
    limit = AdaptiveLimit(16)
    slots = []
    for _ in range(8):  # eight requests out at 16, all refused: one cut, not eight
        context = limit.slot()
        slots.append((context, context.__enter__()))
    for context, slot in slots:
        slot.limited()
        context.__exit__(None, None, None)
    assert limit.snapshot() == {"ceiling": 16, "current": 8, "lowest": 8, "cuts": 1}
    with limit.slot() as slot:  # sent at 8 and refused: cut again
        slot.limited()
    assert limit.current == 4
    for _ in range(4):  # as many answers as the limit: one more
        with limit.slot() as slot:
            slot.answered()
    assert limit.current == 5 and limit.lowest == 4
    for _ in range(200):
        with limit.slot() as slot:
            slot.answered()
    assert limit.current == 16  # never above the ceiling


def test_the_adaptive_limit_holds_requests_back_while_it_is_full() -> None:
    limit = AdaptiveLimit(1)
    entered = threading.Event()
    with limit.slot():
        threading.Thread(target=lambda: (limit.slot().__enter__(), entered.set()), daemon=True).start()
        assert not entered.wait(0.3)
    assert entered.wait(2.0)


# -- one pool per served model, filled ahead ---------------------------------------------------------------


def test_prefetched_answers_are_taken_as_fresh_and_sent_once(tmp_path: Path) -> None:
    # Each answer takes a second: long enough for all twenty to be at the server together on a loaded machine.
    with StandInServer(served_name="m", latency=1.0) as server, ResultCache(tmp_path / "r.sqlite") as cache:
        runner = Runner(OpenAIBackend("m", model="m", base_url=server.base_url, max_in_flight=64), cache)
        first, second = _requests(10, "first"), _requests(10, "second")
        assert runner.prefetch(first, CONFIG, None) == 10
        assert runner.prefetch(second, CONFIG, None) == 10
        assert runner.prefetch(second, CONFIG, None) == 0  # queued already
        assert _wait_for(lambda: server.max_in_flight >= 20, 10.0)  # both callers' requests at once
        results = runner.generate(first, CONFIG, None) + runner.generate(second, CONFIG, None)
        assert [r.cached for r in results] == [False] * 20
        assert server.chat_completions == 20
        assert len(cache) == 20
        assert runner.prefetch(first, CONFIG, None) == 0  # cached now: nothing to queue
        again = runner.generate(first, CONFIG, None)
        assert all(r.cached for r in again) and server.chat_completions == 20
        snapshot = runner.pool_snapshot()
    assert snapshot["sent"] == 20 and snapshot["max_in_flight"] >= 20 and snapshot["mean_in_flight"] > 1


def test_a_failed_prefetch_is_sent_again_by_the_case_that_needs_it() -> None:
    with StandInServer(served_name="m", fail_status=500, fail_first=1) as server:
        backend = OpenAIBackend("m", model="m", base_url=server.base_url, max_in_flight=4, max_retries=0)
        runner = Runner(backend, NullCache())
        runner.prefetch(_requests(1), CONFIG, None)
        assert _wait_for(lambda: backend.http_requests == 1)
        time.sleep(0.3)  # the failure reaches the pool: the prefetch is over before its case begins
        (result,) = runner.generate(_requests(1), CONFIG, None)
    assert result.generation.text == "Answer: A" and not result.cached
    assert server.chat_completions == 2


def test_what_is_prefetched_waits_outside_the_pool_beyond_twice_its_limit(make_backend: Any) -> None:
    backend = make_backend(batch_size=1, max_in_flight=3, delay=0.02)
    runner = Runner(backend, NullCache())
    assert runner.prefetch(_requests(60), CONFIG, None) == 60
    pool = runner._pool
    assert pool is not None
    held = []
    while len(backend.calls) < 60:
        held.append(pool.pending)
        time.sleep(0.005)
    assert max(held) <= 6  # queued and running: answers for cases not started yet stay bounded
    results = runner.generate(_requests(60), CONFIG, None)
    assert len(results) == 60 and not any(r.cached for r in results) and len(backend.calls) == 60


def test_a_model_without_a_pool_prefetches_nothing(make_backend: Any) -> None:
    backend = make_backend(max_in_flight=1)
    runner = Runner(backend, NullCache())
    assert not runner.pooled and runner.prefetch(_requests(3), CONFIG, None) == 0
    assert backend.calls == []


# -- rate limits -----------------------------------------------------------------------------------------


def test_a_429_storm_slows_the_pool_down_and_nothing_is_lost() -> None:
    with StandInServer(served_name="m", latency=0.05, capacity=8, retry_after=0.1) as server:
        backend = OpenAIBackend("m", model="m", base_url=server.base_url, max_in_flight=64, max_retries=1)
        backend.retry_base_delay, backend.retry_max_delay = 0.05, 0.5
        server.rate_limit(0.5)  # and everything refused for half a second first
        results = Runner(backend, NullCache()).generate(_requests(120), CONFIG, None)
        answers, faults = server.answers, server.faults
    assert [r.generation.text for r in results] == ["Answer: A"] * 120
    assert len(answers) == 120 and set(answers.values()) == {1}  # each answered once
    assert faults["rate_limit"] > 0
    load = backend.describe_load()
    assert load["limit"]["lowest"] < 64 and load["limit"]["cuts"] >= 1
    assert load["retries"] == faults["rate_limit"]  # a 429 did not use up the single retry allowed


def test_a_rate_limit_that_never_lifts_fails_after_the_patience_naming_it() -> None:
    with StandInServer(served_name="m", capacity=0, retry_after=0.05) as server:
        backend = OpenAIBackend("m", model="m", base_url=server.base_url, max_in_flight=4, max_retries=1)
        backend.retry_base_delay = backend.retry_max_delay = 0.05
        backend.rate_limit_patience = 0.5
        with pytest.raises(BackendError, match=r"rate limited for 0.5 s.*last status: HTTP 429"):
            backend.generate(_requests(1), CONFIG, None)
        assert server.faults["rate_limit"] > 2  # more tries than the single retry: the patience ruled


# -- replicas ----------------------------------------------------------------------------------------------


def test_requests_spread_over_the_replicas_of_a_model() -> None:
    with StandInServer(served_name="m", root="/models/X", latency=0.1) as one, \
            StandInServer(served_name="m", root="/models/X", latency=0.1) as two:
        backend = OpenAIBackend("m", model="m", base_urls=[one.base_url, two.base_url], max_in_flight=16)
        runner = Runner(backend, NullCache())
        results = runner.generate(_requests(32), CONFIG, None)
        identity = backend.identity()
        counts = (one.chat_completions, two.chat_completions)
    assert len(results) == 32 and sum(counts) == 32
    assert min(counts) >= 10  # by load: neither server left idle
    assert identity["root"] == "/models/X" and identity["base_urls"] == [one.base_url, two.base_url]
    assert isinstance(identity["process_started"], list) and len(identity["process_started"]) == 2


def test_replicas_that_serve_different_weights_are_refused() -> None:
    with StandInServer(served_name="m", root="/models/X") as one, \
            StandInServer(served_name="m", root="/models/Y") as two:
        backend = OpenAIBackend("m", model="m", base_urls=[one.base_url, two.base_url])
        with pytest.raises(BackendError, match=r"replicas serve different models: .* reports root /models/X, "
                                               rf"{two.base_url} reports root /models/Y"):
            backend.identity()
        assert one.chat_completions == two.chat_completions == 0


@pytest.mark.parametrize(("entry", "message"), [
    ("base_url: http://a:8000/v1\n    base_urls: [http://b:8000/v1]", "base_url .* or base_urls .*not both"),
    ("base_urls: [http://a:8000/v1, http://a:8000/v1]", "a base URL is given twice"),
    ("base_urls: http://a:8000/v1", "expected a list of the base URLs"),
    ("base_urls: [http://a:8000/v1, gpu-2:8000/v1]", "item 2: the base URL must start with http"),
])
def test_a_models_file_names_what_is_wrong_with_its_replicas(tmp_path: Path, entry: str, message: str) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  m:\n    backend: openai\n    model: m\n    {entry}\n")
    with pytest.raises(ConfigError, match=message) as raised:
        load_models_file(models)
    assert str(models) in str(raised.value)


def test_a_models_file_entry_with_replicas_makes_a_backend_over_all_of_them(tmp_path: Path) -> None:
    from persona_eval.backends import create_backend

    models = tmp_path / "models.yaml"
    models.write_text("models:\n  m:\n    backend: openai\n    model: m\n"
                      "    base_urls: [http://a:8000/v1, http://b:8000/v1/]\n")
    spec: ModelSpec = load_models_file(models)["m"]
    backend = create_backend(spec, cache_dir=tmp_path)
    assert isinstance(backend, OpenAIBackend)
    assert backend.replicas == ["http://a:8000/v1", "http://b:8000/v1"] and backend.max_in_flight == 256


# -- the throughput line -------------------------------------------------------------------------------------


def test_the_summary_keeps_each_worker_s_last_pool_figures() -> None:
    def result(persona: str, worker: str, sent: int, mean: float, busy: float) -> dict[str, Any]:
        return {"model": "m", "persona": persona, "worker": worker, "n_cases": 10, "cached": 0, "model_seconds": 1.0,
                "completion_tokens": 50, "max_in_flight": 1,
                "pool": {"sent": sent, "max_in_flight": 40, "mean_in_flight": mean, "busy_seconds": busy,
                         "limit": {"ceiling": 256, "current": 64, "lowest": 32, "cuts": 3},
                         "prefix_cache_hit_rate": 0.75}}
    table = _throughput([result("a", "gw0", 10, 5.0, 1.0), result("b", "gw0", 20, 10.0, 2.0),
                         result("c", "gw1", 30, 20.0, 2.0)])
    row = table["m"]
    assert row["requests"] == 30 and row["sent"] == 50 and row["max_in_flight"] == 40
    assert row["mean_in_flight"] == 15.0  # (10 x 2 + 20 x 2) / 4: each worker's last snapshot
    assert row["limit_lowest"] == 32 and row["prefix_cache_hit_rate"] == 0.75


def test_the_throughput_line_says_how_busy_the_server_was_kept() -> None:
    row = {"requests": 624, "cached": 0, "sent": 624, "mean_in_flight": 215.6, "max_in_flight": 256,
           "completion_tokens": 1248, "tokens_per_second": 12.5, "model_seconds": 99.8, "limit_ceiling": 256,
           "limit_lowest": 32, "prefix_cache_hit_rate": 0.6739}
    assert throughput_line("served", row) == (
        "served: 624 requests, 0 from the cache; 624 sent, 215.6 in flight on average (up to 256), 1,248 generated "
        "tokens, 12.5 tokens/s of model time (99.8 s in the model); the server's rate limit brought requests at "
        "once down to 32 (of 256); the server's prefix cache held 67% of prompt tokens")
    local = {"requests": 96, "cached": 0, "max_in_flight": 1, "completion_tokens": 0, "tokens_per_second": None,
             "model_seconds": 0.0}
    assert throughput_line("smollm2", local) == ("smollm2: 96 requests, 0 from the cache, up to 1 in flight, "
                                                 "no model calls (0.0 s in the model)")


# -- through the real plugin ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_persona_s_requests_share_one_pool_and_each_case_reports_its_own(pytester: pytest.Pytester) -> None:
    shutil.copytree(REPO / "evals", pytester.path / "evals")
    with StandInServer(served_name="served", latency=0.4, prefix_cache=True,
                       answer=lambda messages: "## Final Response\nC") as server:
        result = pytester.runpytest_subprocess(
            "evals", "-p", "no:cacheprovider", "-k", "triage", "--pe-limit", "4",
            "--pe-model", f"openai:served@{server.base_url}",
            "--pe-dataset", f"triage={REPO / 'fixtures/triage/vignettes.jsonl'}",
            "--pe-cache-dir", str(pytester.path / "cache"), "--pe-reports-dir", str(pytester.path / "reports"),
            timeout=300)
        peak, chats, serving = server.max_in_flight, server.chat_completions, server.serving_seconds
    output = result.stdout.str()
    run_dir = (pytester.path / "reports" / "latest").resolve()
    summary = json.loads((run_dir / "summary.json").read_text())
    cases = [json.loads(line) for line in (run_dir / "cases.jsonl").read_text().splitlines()]
    # 8 cases x 7 personas (the placebo too), each sent once; more than one persona's cases were at the server
    # at once, so the whole run took about one round trip, not one per persona.
    assert chats == 56 and len(cases) == 56
    assert peak > 8, peak
    assert serving < 7 * 0.4, serving
    assert sorted({(r["persona"]) for r in summary["results"]}) == sorted({c["persona"] for c in cases})
    assert all(c["generated_label"] == "C" and not c["cached"] for c in cases)
    row = summary["metadata"]["throughput"]["served"]
    # 56 chat completions and one prompt-scoring probe that found no /tokenize (the other readings waited for it)
    assert row["sent"] == 57 and row["max_in_flight"] > 8 and row["mean_in_flight"] > 1
    assert row["prefix_cache_hit_rate"] is not None and row["prefix_cache_hit_rate"] > 0.5
    assert "57 sent" in output and "in flight on average" in output and "prefix cache held" in output
