"""Tests of persona_eval.runner: order, cache, batching, concurrency, failures and progress, and the
model identity and decoding record that its cache keys hold.

The backend is mostly the scripted one of conftest.py: it answers "reply to <prompt>" and records every
call. Identity and decoding are tested with the OpenAI-compatible backend against the loopback stand-in
server (persona_eval.testing.standin), and with the transformers backend on files that are not loaded.
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
from persona_eval.backends.hf import HFBackend
from persona_eval.backends.openai_compat import OpenAIBackend
from persona_eval.cache import NullCache, ResultCache
from persona_eval.errors import BackendError
from persona_eval.prompts import RenderedMessages
from persona_eval.runner import Progress, Runner, RunnerStats
from persona_eval.testing.standin import TEMPERATURE_REFUSAL, StandInServer

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


def test_a_reading_with_no_label_is_not_cached(make_backend: Any, cache: ResultCache) -> None:
    # A server found to score no prompts answers every label None: asked again next time, not served.
    unscored = make_backend(prompt_logprobs=lambda prompt: {"A": None, "B": None, "C": None})
    assert Runner(unscored, cache).score_labels(_requests(["x"]), SCORING) == [{"A": None, "B": None, "C": None}]
    scored = make_backend(prompt_logprobs=lambda prompt: {"A": -0.5, "B": -1.0, "C": None})
    assert Runner(scored, cache).score_labels(_requests(["x"]), SCORING) == [{"A": -0.5, "B": -1.0, "C": None}]
    assert len(scored.calls_of("score_labels")) == 1


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


# --- the model under test is the model that answered -------------------------------------------------


def _served(server: StandInServer, *, max_in_flight: int = 4) -> OpenAIBackend:
    return OpenAIBackend(server.served_name, model=server.served_name, base_url=server.base_url, max_retries=0,
                         max_in_flight=max_in_flight)


def test_another_model_behind_the_same_name_and_url_misses_the_cache_and_says_why(cache: ResultCache) -> None:
    contents = ["case one", "case two", "case three"]
    with StandInServer(served_name="m", root="/models/X", started=1796119200.0,
                       answer=lambda messages: "Answer: C") as server:
        first = Runner(_served(server), cache)
        assert [r.generation.text for r in first.generate(_requests(contents), CONFIG, SCORING)] == ["Answer: C"] * 3
        assert first.identity_change is None  # nothing was cached at this address before
        server.swap(root="/models/Y", started=1796122800.0, answer=lambda messages: "Answer: A")
        asked_before = server.chat_completions
        second = Runner(_served(server), cache)
        results = second.generate(_requests(contents), CONFIG, SCORING)
        assert server.chat_completions - asked_before == 3
        third = Runner(_served(server), cache)
        again = third.generate(_requests(contents), CONFIG, SCORING)
        assert server.chat_completions - asked_before == 3  # the same model again: all from the cache
    assert [r.generation.text for r in results] == ["Answer: A"] * 3 and not any(r.cached for r in results)
    assert second.identity_change == (
        f"model 'm' at {server.base_url} is not the model cached before (the server now reports root "
        "/models/Y, was /models/X; process started 2026-12-01T11:00:00.000Z, was 2026-12-01T10:00:00.000Z): "
        "its cached answers are not used")
    assert third.identity_change is None and all(r.cached for r in again)
    assert [r.generation.text for r in again] == ["Answer: A"] * 3


def test_a_restart_alone_is_named_as_such(cache: ResultCache) -> None:
    with StandInServer(served_name="m", root="/models/X", started=1796119200.0) as server:
        Runner(_served(server), cache).generate(_requests(["x"]), CONFIG, None)
        server.swap(root="/models/X", started=1796119260.0)
        runner = Runner(_served(server), cache)
        runner.generate(_requests(["x"]), CONFIG, None)
    assert runner.identity_change is not None
    assert "(the server now reports process started 2026-12-01T10:01:00.000Z, was 2026-12-01T10:00:00.000Z)" \
        in runner.identity_change
    assert "root" not in runner.identity_change


def test_the_null_cache_remembers_no_identity(make_backend: Any) -> None:
    with StandInServer(served_name="m", root="/models/X") as server:
        Runner(_served(server), NullCache()).generate(_requests(["x"]), CONFIG, None)
        server.swap(root="/models/Y")
        runner = Runner(_served(server), NullCache())
        runner.generate(_requests(["x"]), CONFIG, None)
    assert runner.identity_change is None


def test_an_identity_change_of_a_local_model_names_its_weights(tmp_path: Path, cache: ResultCache) -> None:
    model = tmp_path / "Tiny-Instruct"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights one")
    first = Runner(HFBackend("tiny", str(model)), cache)
    before = first.identity()["weights"]
    (model / "model.safetensors").write_bytes(b"weights two, longer")
    second = Runner(HFBackend("tiny", str(model)), cache)
    after = second.identity()["weights"]
    assert first.identity_change is None
    assert second.identity_change == (f"model 'tiny' at {model.resolve()} is not the model cached before "
                                      f"(weights {after}, was {before}): its cached answers are not used")


def test_a_refused_temperature_is_recorded_and_keys_follow_what_was_sent(cache: ResultCache) -> None:
    contents = ["case one", "case two"]
    with StandInServer(served_name="m", root="/models/X", reject_temperature=True) as server:
        backend = _served(server, max_in_flight=1)
        runner = Runner(backend, cache)
        first = runner.generate(_requests(contents), CONFIG, SCORING)
        refusals = server.chat_completions - len(contents)
        assert refusals == 1  # one request in flight at a time here: the first taught the backend
        record = runner.decoding_record(CONFIG, SCORING)
        assert record["temperature"] is None and record["max_tokens"] == 8 and record["logprobs"] is True
        assert record["dropped"] == {"temperature": "HTTP 400: " + TEMPERATURE_REFUSAL}
        # No result is stored under the key of a request that sent temperature 0.
        with_temperature = {**record, "temperature": 0.0}
        del with_temperature["dropped"]
        prompts = [r.prompt for r in first]
        assert all(cache.get(runner._generate_key(p, CONFIG, SCORING, with_temperature)) is None for p in prompts)
        assert all(cache.get(runner._generate_key(p, CONFIG, SCORING, first[0].generation.sent)) is not None
                   for p in prompts)

        # Another process, the same model: it knows before sending, and everything comes from the cache.
        asked_before = server.chat_completions
        later_backend = _served(server)
        later = Runner(later_backend, cache)
        assert later.decoding_record(CONFIG, SCORING)["dropped"] == record["dropped"]
        again = later.generate(_requests(contents), CONFIG, SCORING)
        assert all(r.cached for r in again) and server.chat_completions == asked_before
        # And what it does send, it sends without temperature.
        later.generate(_requests(["case three"]), CONFIG, SCORING)
        assert [("temperature" in (r.body or {})) for r in server.requests_to("/v1/chat/completions")][
            asked_before:] == [False]


def test_refused_parameters_belong_to_one_model_identity(cache: ResultCache) -> None:
    with StandInServer(served_name="m", root="/models/X", reject_temperature=True) as server:
        Runner(_served(server), cache).generate(_requests(["x"]), CONFIG, None)
        server.swap(root="/models/Y")
        server.reject_temperature = False
        runner = Runner(_served(server), cache)
        assert runner.decoding_record(CONFIG, None)["dropped"] == {}
        runner.generate(_requests(["x"]), CONFIG, None)
        assert "temperature" in (server.requests_to("/v1/chat/completions")[-1].body or {})


def test_a_backend_without_a_decoding_record_reports_what_was_asked(make_backend: Any, cache: ResultCache) -> None:
    runner = Runner(make_backend(), cache)
    assert runner.decoding_record(GenerationConfig(max_new_tokens=5, constrained_ranking=4), SCORING) == {
        "temperature": 0.0, "top_p": None, "max_tokens": 5, "stop": None, "logprobs": True, "top_logprobs": 20,
        "constrained_ranking": 4, "dropped": {}}
    runner.generate(_requests(["x"]), CONFIG, None)
    assert runner.identity_change is None


def test_the_transformers_backend_reports_greedy_decoding_whatever_was_asked() -> None:
    backend = HFBackend("smol", "HuggingFaceTB/SmolLM2-135M-Instruct")  # a hub id: nothing is loaded
    record = Runner(backend, NullCache()).decoding_record(GenerationConfig(max_new_tokens=12, temperature=0.7),
                                                          SCORING)
    assert record == {"temperature": 0.0, "do_sample": False, "top_p": None, "max_tokens": 12, "stop": None,
                      "logprobs": True, "top_logprobs": None, "constrained_ranking": None, "dropped": {}}
    assert backend.loaded is False


def test_requests_in_flight_when_temperature_is_refused_are_all_stored_as_sent(cache: ResultCache) -> None:
    contents = [f"case {i}" for i in range(8)]
    with StandInServer(served_name="m", reject_temperature=True, latency=0.02) as server:
        Runner(_served(server, max_in_flight=4), cache).generate(_requests(contents), CONFIG, SCORING)
        refusals = server.chat_completions - len(contents)
        assert 1 <= refusals <= 4
        asked_before = server.chat_completions
        again = Runner(_served(server, max_in_flight=4), cache).generate(_requests(contents), CONFIG, SCORING)
        assert all(r.cached for r in again) and server.chat_completions == asked_before


# --- waiting notes ------------------------------------------------------------------------------------
# (Imported here: this section was added apart from the rest of the file.)
import threading  # noqa: E402
import time  # noqa: E402

from persona_eval.errors import ConfigError  # noqa: E402


def test_a_note_says_what_is_waited_on_while_requests_are_slow(cache: ResultCache) -> None:
    notes: list[str] = []
    with StandInServer(served_name="m", latency=0.9) as server:
        backend = OpenAIBackend("m", model="m", base_url=server.base_url, max_in_flight=4, timeout=60, max_retries=2)
        runner = Runner(backend, cache, notice=notes.append, wait_note_after=0.3)
        runner.generate(_requests([f"case {i}" for i in range(4)]), CONFIG, None)
    assert notes, "no note while 4 requests waited 0.9 s"
    pattern = (rf"persona-eval: waiting on {re.escape(server.base_url)}: 4 requests in flight, oldest \d+ s "
               r"\(timeout 60 s, 2 retries\)\n")
    assert all(re.fullmatch(pattern, note) for note in notes), notes
    assert len(notes) <= 3  # about one every wait_note_after seconds, not one per poll


def test_no_note_while_the_answers_come_quickly(cache: ResultCache, make_backend: Any) -> None:
    notes: list[str] = []
    runner = Runner(make_backend(max_in_flight=4, delay=0.01), cache, notice=notes.append, wait_note_after=1.0)
    runner.generate(_requests([f"case {i}" for i in range(40)]), CONFIG, None)
    assert notes == []


def test_a_note_names_a_local_model_whose_batch_runs_long(cache: ResultCache, make_backend: Any) -> None:
    notes: list[str] = []
    backend = make_backend(batch_size=3, max_in_flight=1, delay=0.8)
    Runner(backend, cache, notice=notes.append, wait_note_after=0.3).generate(
        _requests(["a", "b", "c"]), CONFIG, None)
    assert notes and all(re.fullmatch(r"persona-eval: waiting on model scripted: 3 requests in flight, "
                                      r"oldest \d+ s\n", note) for note in notes), notes
    helpers = [t for t in threading.enumerate() if t.name == "persona-eval-wait-notes"]
    assert all(not t.is_alive() or t.daemon for t in helpers)


def test_the_note_says_how_many_tries_failed_in_a_row(cache: ResultCache) -> None:
    notes: list[str] = []
    # 10 failures over 2 requests, at least 0.125 s of backoff after each: the notes come meanwhile.
    with StandInServer(served_name="m", fail_status=503, fail_first=10) as server:
        backend = OpenAIBackend("m", model="m", base_url=server.base_url, max_in_flight=2, max_retries=8)
        backend.retry_base_delay = backend.retry_max_delay = 0.25
        runner = Runner(backend, cache, notice=notes.append, wait_note_after=0.2)
        results = runner.generate(_requests(["a", "b"]), CONFIG, None)
    assert [r.generation.text for r in results] == ["Answer: A", "Answer: A"]
    assert any(re.search(r"; the last \d+ tries failed \(HTTP 503\)\n$", note) for note in notes), notes
    assert backend.describe_wait()["failed_in_a_row"] == 0  # the answers ended the run of failures


@pytest.mark.parametrize("after", [0, -1.0, float("nan"), True, "30"])
def test_wait_note_after_must_be_a_positive_number_of_seconds(after: Any, make_backend: Any) -> None:
    with pytest.raises(ConfigError, match="wait_note_after must be a positive number of seconds"):
        Runner(make_backend(), NullCache(), wait_note_after=after)


def test_a_failing_store_stops_the_run_without_waiting_for_the_requests_in_flight(make_backend: Any) -> None:
    class Broken(NullCache):
        def put_many(self, items: Any) -> None:
            raise OSError("disk full")

    backend = make_backend(batch_size=1, max_in_flight=4, delay=0.3)
    started = time.monotonic()
    with pytest.raises(OSError, match="disk full"):
        Runner(backend, Broken()).generate(_requests([f"case {i}" for i in range(40)]), CONFIG, None)
    assert time.monotonic() - started < 1.0
    assert len(backend.calls) <= 4  # nothing more was sent after the failure
