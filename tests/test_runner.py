"""Tests of persona_eval.runner: order, cache, batching, concurrency, failures and progress.

The backend is the scripted one of conftest.py: it answers "reply to <prompt>" and records every call.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from persona_eval.backends.base import GenerationConfig, LabelScoring
from persona_eval.cache import NullCache, ResultCache
from persona_eval.errors import BackendError
from persona_eval.prompts import RenderedMessages
from persona_eval.runner import Progress, Runner, RunnerStats

CONFIG = GenerationConfig(max_new_tokens=8)
SCORING = LabelScoring()


def _requests(contents: list[str]) -> list[RenderedMessages]:
    return [RenderedMessages((("user", content),), None) for content in contents]


def _prompt(content: str) -> str:
    return f"<user>{content}</user>"


def _varied_contents(count: int, seed: int = 0) -> list[str]:
    """Distinct contents of shuffled lengths, so length-sorting reorders them."""
    rng = random.Random(seed)
    contents = [f"case {i} " + "x" * rng.randrange(0, 40) for i in range(count)]
    rng.shuffle(contents)
    return contents


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[ResultCache]:
    with ResultCache(tmp_path / "results.sqlite3") as opened:
        yield opened


# --- order and batching ------------------------------------------------------------------------------


# make_backend is stateless (it returns the class), so sharing it across examples is safe.
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(min_value=0, max_value=30), min_size=0, max_size=25),
       batch_size=st.integers(min_value=1, max_value=7), max_in_flight=st.integers(min_value=1, max_value=3))
def test_results_come_back_in_input_order_whatever_the_batching(make_backend: Any, lengths: list[int],
                                                                 batch_size: int, max_in_flight: int) -> None:
    contents = [f"{i}:" + "y" * length for i, length in enumerate(lengths)]
    backend = make_backend(batch_size=batch_size, max_in_flight=max_in_flight)
    results = Runner(backend, NullCache()).generate(_requests(contents), CONFIG, None)
    assert [r.prompt for r in results] == [_prompt(c) for c in contents]
    assert [r.generation.text for r in results] == [f"reply to {_prompt(c)}" for c in contents]
    assert not any(r.cached for r in results)
    # Every request asked exactly once, in batches of at most batch_size.
    assert Counter(backend.prompts_asked()) == Counter(_prompt(c) for c in contents)
    assert all(1 <= len(call) <= batch_size for call in backend.calls_of("generate"))


def test_batches_are_of_batch_size_and_sorted_by_prompt_length(make_backend: Any) -> None:
    contents = _varied_contents(10)
    backend = make_backend(batch_size=3)
    Runner(backend, NullCache()).generate(_requests(contents), CONFIG, None)
    calls = backend.calls_of("generate")
    assert [len(call) for call in calls] == [3, 3, 3, 1]
    asked = [prompt for call in calls for prompt in call]
    assert [len(p) for p in asked] == sorted(len(p) for p in asked)


def test_empty_request_list_calls_nothing(make_backend: Any, cache: ResultCache) -> None:
    backend = make_backend()
    runner = Runner(backend, cache)
    assert runner.generate([], CONFIG, SCORING) == []
    assert runner.score_labels([], SCORING) == []
    assert backend.calls == []


def test_duplicate_requests_each_get_a_result(make_backend: Any) -> None:
    backend = make_backend(batch_size=2)
    results = Runner(backend, NullCache()).generate(_requests(["same", "other", "same"]), CONFIG, None)
    assert [r.prompt for r in results] == [_prompt("same"), _prompt("other"), _prompt("same")]


def test_generation_carries_tokens_only_when_scoring_is_asked(make_backend: Any) -> None:
    backend = make_backend()
    runner = Runner(backend, NullCache())
    with_scoring = runner.generate(_requests(["Answer: B"]), CONFIG, SCORING)[0].generation
    without = runner.generate(_requests(["Answer: B"]), CONFIG, None)[0].generation
    assert with_scoring.tokens is not None
    assert without.tokens is None


# --- the cache ---------------------------------------------------------------------------------------


def test_a_second_run_is_served_from_the_cache_without_calling_the_backend(make_backend: Any,
                                                                           cache: ResultCache) -> None:
    contents = _varied_contents(9)
    first_backend = make_backend(batch_size=4)
    first = Runner(first_backend, cache).generate(_requests(contents), CONFIG, SCORING)
    assert len(first_backend.calls) == 3
    assert not any(r.cached for r in first)

    second_backend = make_backend(batch_size=4)
    runner = Runner(second_backend, cache)
    second = runner.generate(_requests(contents), CONFIG, SCORING)
    assert second_backend.calls == []
    assert all(r.cached for r in second)
    assert [r.prompt for r in second] == [r.prompt for r in first]
    assert [r.generation for r in second] == [r.generation for r in first]
    assert runner.stats.cache_hits == runner.stats.requests == 9
    assert runner.stats.model_calls == 0


def test_cached_flags_are_per_request(make_backend: Any, cache: ResultCache) -> None:
    Runner(make_backend(), cache).generate(_requests(["b", "d"]), CONFIG, None)
    backend = make_backend()
    results = Runner(backend, cache).generate(_requests(["a", "b", "c", "d"]), CONFIG, None)
    assert [r.cached for r in results] == [False, True, False, True]
    assert backend.prompts_asked() == [_prompt("a"), _prompt("c")]


@pytest.mark.parametrize("change", ["config", "scoring", "model", "extra_key"])
def test_the_cache_key_covers_decoding_scoring_model_and_extra_key(make_backend: Any, cache: ResultCache,
                                                                    change: str) -> None:
    Runner(make_backend(), cache, extra_key={"template": "triage-v1"}).generate(
        _requests(["x"]), CONFIG, SCORING)
    backend = make_backend(name="other-model" if change == "model" else "scripted")
    runner = Runner(backend, cache, extra_key={"template": "triage-v2" if change == "extra_key" else "triage-v1"})
    runner.generate(_requests(["x"]), GenerationConfig(max_new_tokens=9) if change == "config" else CONFIG,
                    LabelScoring(labels=("A", "B")) if change == "scoring" else SCORING)
    assert backend.prompts_asked() == [_prompt("x")]


def test_null_cache_never_serves(make_backend: Any) -> None:
    backend = make_backend()
    runner = Runner(backend, NullCache())
    runner.generate(_requests(["x"]), CONFIG, None)
    runner.generate(_requests(["x"]), CONFIG, None)
    assert backend.prompts_asked() == [_prompt("x"), _prompt("x")]


def test_score_labels_is_cached_likewise(make_backend: Any, cache: ResultCache) -> None:
    contents = _varied_contents(5)
    scores = {_prompt(c): {"A": -float(i), "B": -1.0, "C": None} for i, c in enumerate(contents)}
    first_backend = make_backend(batch_size=2, prompt_logprobs=lambda prompt: scores[prompt])
    first = Runner(first_backend, cache).score_labels(_requests(contents), SCORING)
    assert first == [scores[_prompt(c)] for c in contents]
    assert len(first_backend.calls_of("score_labels")) == 3

    second_backend = make_backend(batch_size=2, prompt_logprobs=lambda prompt: pytest.fail("called"))
    second = Runner(second_backend, cache).score_labels(_requests(contents), SCORING)
    assert second == first
    assert second_backend.calls == []
    # Label scores and generations for the same prompt are different entries.
    Runner(second_backend, cache).generate(_requests(contents[:1]), CONFIG, SCORING)
    assert second_backend.prompts_asked() == [_prompt(contents[0])]


# --- concurrency -------------------------------------------------------------------------------------


def test_several_batches_run_at_once_and_order_is_kept(make_backend: Any, cache: ResultCache) -> None:
    contents = _varied_contents(16, seed=3)
    backend = make_backend(batch_size=2, max_in_flight=4, delay=0.05)
    runner = Runner(backend, cache)
    results = runner.generate(_requests(contents), CONFIG, SCORING)
    assert runner.stats.max_in_flight_seen > 1
    assert runner.stats.max_in_flight_seen <= 4
    assert 1 < backend.max_concurrent <= 4
    assert runner.stats.model_calls == 8
    assert [r.prompt for r in results] == [_prompt(c) for c in contents]
    assert [r.generation.text for r in results] == [f"reply to {_prompt(c)}" for c in contents]
    assert len(cache) == 16


def test_max_in_flight_one_runs_batches_one_at_a_time(make_backend: Any) -> None:
    backend = make_backend(batch_size=1, max_in_flight=1, delay=0.01)
    runner = Runner(backend, NullCache())
    runner.generate(_requests(["a", "b", "c"]), CONFIG, None)
    assert backend.max_concurrent == 1
    assert runner.stats.max_in_flight_seen == 1


# --- failures ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_in_flight", [1, 3])
@pytest.mark.parametrize("failing_call", [1, 3, 5])
def test_a_failing_batch_keeps_what_finished_and_a_rerun_asks_only_for_the_rest(
        make_backend: Any, cache: ResultCache, max_in_flight: int, failing_call: int) -> None:
    contents = _varied_contents(10, seed=failing_call)
    requests = _requests(contents)
    failing = make_backend(batch_size=2, max_in_flight=max_in_flight, fail_on_call=failing_call, delay=0.01)
    with pytest.raises(BackendError, match=f"scripted failure on call {failing_call}"):
        Runner(failing, cache).generate(requests, CONFIG, SCORING)

    finished = failing.prompts_answered()
    assert len(finished) == len(set(finished))
    if max_in_flight == 1:
        # Batches are sent one after another: exactly those before the failing one finished.
        assert len(finished) == 2 * (failing_call - 1)
        assert len(failing.calls) == failing_call
    assert len(cache) == len(finished)

    healthy = make_backend(batch_size=2, max_in_flight=max_in_flight)
    results = Runner(healthy, cache).generate(requests, CONFIG, SCORING)
    asked = healthy.prompts_asked()
    assert len(asked) == len(set(asked))
    assert set(asked) == {_prompt(c) for c in contents} - set(finished)
    assert [r.prompt for r in results] == [_prompt(c) for c in contents]
    assert [r.generation.text for r in results] == [f"reply to {_prompt(c)}" for c in contents]
    assert {r.prompt for r in results if r.cached} == set(finished)
    assert len(cache) == 10


def test_score_labels_failure_keeps_finished_batches(make_backend: Any, cache: ResultCache) -> None:
    contents = _varied_contents(6)
    failing = make_backend(batch_size=2, fail_on_call=2)
    with pytest.raises(BackendError):
        Runner(failing, cache).score_labels(_requests(contents), SCORING)
    finished = failing.prompts_answered("score_labels")
    assert len(finished) == 2
    healthy = make_backend(batch_size=2)
    scores = Runner(healthy, cache).score_labels(_requests(contents), SCORING)
    assert len(scores) == 6
    assert set(healthy.prompts_asked("score_labels")) == {_prompt(c) for c in contents} - set(finished)


# --- stats and progress ------------------------------------------------------------------------------


def test_stats_count_requests_hits_calls_and_tokens(make_backend: Any, cache: ResultCache) -> None:
    Runner(make_backend(), cache).generate(_requests(["one two"]), CONFIG, None)
    backend = make_backend(batch_size=2)
    runner = Runner(backend, cache)
    results = runner.generate(_requests(["one two", "three", "four five six"]), CONFIG, None)
    stats = runner.stats
    assert (stats.requests, stats.cache_hits, stats.model_calls) == (3, 1, 1)
    assert stats.completion_tokens == sum(int(r.generation.usage["completion_tokens"])
                                          for r in results if not r.cached)
    assert stats.wall_seconds >= stats.model_seconds >= 0
    assert set(stats.to_json()) == {"requests", "cache_hits", "model_calls", "model_seconds",
                                    "max_in_flight_seen", "completion_tokens", "wall_seconds"}


def test_stats_merge_adds_counters_and_keeps_the_highest_in_flight() -> None:
    total = RunnerStats(requests=2, cache_hits=1, model_calls=1, max_in_flight_seen=3, completion_tokens=5)
    total.merge(RunnerStats(requests=4, cache_hits=0, model_calls=2, max_in_flight_seen=2, completion_tokens=1))
    assert (total.requests, total.cache_hits, total.model_calls, total.max_in_flight_seen,
            total.completion_tokens) == (6, 1, 3, 3, 6)


_PROGRESS_LINE = re.compile(r"^persona-eval (?P<label>\S+): (?P<done>\d+)/(?P<total>\d+) cases "
                            r"\((?P<cached>\d+) cached, \d+ s\)\n$")


def test_progress_writes_done_of_total_lines_up_to_the_total(make_backend: Any, cache: ResultCache) -> None:
    contents = _varied_contents(12)
    Runner(make_backend(), cache).generate(_requests(contents[:3]), CONFIG, None)
    lines: list[str] = []
    progress = Progress("scripted/ed_nurse", len(contents), write=lines.append)
    Runner(make_backend(batch_size=1), cache).generate(_requests(contents), CONFIG, None, progress=progress)
    assert lines
    parsed = [_PROGRESS_LINE.match(line) for line in lines]
    assert all(parsed), lines
    done = [int(m["done"]) for m in parsed if m]
    assert done == sorted(done)
    assert done[-1] == 12
    assert all(m["label"] == "scripted/ed_nurse" and m["total"] == "12" for m in parsed if m)
    assert [int(m["cached"]) for m in parsed if m][-1] == 3
    # About every quarter, not every batch.
    assert len(lines) <= 5
    assert (progress.done, progress.cached) == (12, 3)


def test_progress_without_a_writer_only_counts() -> None:
    progress = Progress("m/p", 4)
    progress.advance(4, cached=1)
    assert (progress.done, progress.cached) == (4, 1)


def test_progress_reports_the_end_even_for_a_tiny_total() -> None:
    lines: list[str] = []
    progress = Progress("m/p", 1, write=lines.append)
    progress.advance(0)
    assert lines == []
    progress.advance(1)
    assert len(lines) == 1 and " 1/1 cases " in lines[0]
