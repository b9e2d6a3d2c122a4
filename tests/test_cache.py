"""Tests of persona_eval.cache: keys, round trips, counters, concurrency, crashes, bad files, secrets."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from persona_eval import cache as cache_module
from persona_eval.cache import (
    CACHE_FILENAME,
    NullCache,
    ResultCache,
    cache_key,
    default_cache_dir,
    default_cache_path,
)
from persona_eval.errors import ConfigError, PersonaEvalError

REPO_ROOT = Path(__file__).resolve().parents[1]


def _parts() -> dict[str, Any]:
    return {
        "kind": "generate",
        "backend": "hf",
        "model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "main",
                  "weights": "sha256:0123abcd", "dtype": "float32"},
        "prompt": "<|im_start|>system\nYou are a triage nurse.<|im_end|>\n<|im_start|>user\nCase 1",
        "decoding": {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 64, "seed": 7},
        "scoring": {"labels": ["emergency", "urgent", "non-urgent"]},
        "template": "triage-v1",
    }


# --- cache_key ---------------------------------------------------------------------------------------


def test_cache_key_is_a_sha256_hex_digest_and_stable() -> None:
    key = cache_key(_parts())
    assert len(key) == 64
    assert set(key) <= set("0123456789abcdef")
    assert cache_key(_parts()) == key


def test_cache_key_ignores_mapping_order() -> None:
    parts = _parts()
    reordered = {name: parts[name] for name in reversed(list(parts))}
    reordered["model"] = dict(reversed(list(parts["model"].items())))
    assert cache_key(reordered) == cache_key(parts)


def test_cache_key_encodes_tuples_as_lists_and_integral_floats_as_integers() -> None:
    parts = _parts()
    variant = _parts()
    variant["scoring"]["labels"] = tuple(parts["scoring"]["labels"])
    variant["decoding"]["temperature"] = 0
    variant["decoding"]["max_new_tokens"] = 64.0
    assert cache_key(variant) == cache_key(parts)
    assert cache_key({"x": -0.0}) == cache_key({"x": 0})


def test_cache_key_keeps_bools_apart_from_integers() -> None:
    assert cache_key({"x": True}) != cache_key({"x": 1})
    assert cache_key({"x": None}) != cache_key({"x": "None"})


@pytest.mark.parametrize(("path", "new_value"), [
    (("kind",), "score"),
    (("backend",), "openai_compat"),
    (("model", "name"), "Qwen/Qwen2.5-0.5B-Instruct"),
    (("model", "revision"), "v2"),
    (("model", "weights"), "sha256:0123abce"),
    (("model", "dtype"), "bfloat16"),
    (("prompt",), "<|im_start|>user\nCase 1"),
    (("decoding", "temperature"), 0.7),
    (("decoding", "top_p"), 0.95),
    (("decoding", "max_new_tokens"), 65),
    (("decoding", "seed"), 8),
    (("scoring", "labels"), ["urgent", "emergency", "non-urgent"]),
    (("template",), "triage-v2"),
])
def test_cache_key_changes_with_every_part(path: tuple[str, ...], new_value: Any) -> None:
    parts = _parts()
    changed = _parts()
    target = changed
    for name in path[:-1]:
        target = target[name]
    target[path[-1]] = new_value
    assert cache_key(changed) != cache_key(parts)


def test_cache_key_changes_when_a_part_is_added_or_removed() -> None:
    parts = _parts()
    assert cache_key({**parts, "extra": None}) != cache_key(parts)
    del parts["template"]
    assert cache_key(parts) != cache_key(_parts())


def test_cache_key_float_encoding_is_round_trip_exact() -> None:
    assert cache_key({"x": 0.1 + 0.2}) != cache_key({"x": 0.3})
    assert cache_key({"x": 1e-300}) == cache_key({"x": float("1e-300")})


def test_cache_key_names_the_path_of_an_unserializable_value() -> None:
    parts = _parts()
    parts["model"]["extra"] = [1, {"path": Path("/models/x")}]
    with pytest.raises(TypeError, match=r"model\.extra\[1\]\.path is a \w*Path"):
        cache_key(parts)
    with pytest.raises(TypeError, match=r"decoding\.stop is a set"):
        cache_key({"decoding": {"stop": {"a", "b"}}})


def test_cache_key_rejects_non_string_mapping_keys_and_non_finite_floats() -> None:
    # {1: x} and {"1": x} would collide if keys were stringified silently.
    with pytest.raises(TypeError, match=r"scoring has a key 1"):
        cache_key({"scoring": {1: "emergency"}})
    with pytest.raises(ValueError, match=r"decoding\.temperature is nan"):
        cache_key({"decoding": {"temperature": float("nan")}})
    with pytest.raises(TypeError, match="mapping"):
        cache_key([("kind", "generate")])  # type: ignore[arg-type]


# --- ResultCache: basics -----------------------------------------------------------------------------


@pytest.fixture
def cache_path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "dir" / CACHE_FILENAME


def test_round_trip_creates_parent_directories(cache_path: Path) -> None:
    value = {"text": "Urgent — see a doctor today ✓", "logprobs": [-0.1, -2.5], "label": None,
             "nested": {"ok": True}}
    with ResultCache(cache_path) as cache:
        assert len(cache) == 0
        assert cache  # an empty cache is still truthy
        cache.put("k1", value)
        assert cache.get("k1") == value
        assert cache.get("missing") is None
        assert len(cache) == 1
    assert cache_path.is_file()
    with ResultCache(str(cache_path)) as reopened:
        assert reopened.get("k1") == value


def test_put_many_replaces_existing_values(cache_path: Path) -> None:
    with ResultCache(cache_path) as cache:
        cache.put_many({"a": {"n": 1}, "b": {"n": 2}})
        cache.put_many({"a": {"n": 3}})
        assert cache.get_many(["a", "b"]) == {"a": {"n": 3}, "b": {"n": 2}}
        assert len(cache) == 2


def test_non_finite_floats_in_values_round_trip(cache_path: Path) -> None:
    with ResultCache(cache_path) as cache:
        cache.put("k", {"logprob": float("-inf")})
        assert cache.get("k") == {"logprob": float("-inf")}


def test_hits_and_misses_count_distinct_keys(cache_path: Path) -> None:
    with ResultCache(cache_path) as cache:
        cache.put_many({"a": {"n": 1}, "b": {"n": 2}})
        assert cache.get_many(["a", "b", "c", "a"]) == {"a": {"n": 1}, "b": {"n": 2}}
        assert (cache.hits, cache.misses) == (2, 1)
        cache.get("c")
        cache.get("a")
        assert (cache.hits, cache.misses) == (3, 2)
        assert cache.get_many([]) == {}
        assert (cache.hits, cache.misses) == (3, 2)


def test_get_many_of_2000_keys_is_chunked(cache_path: Path) -> None:
    items = {cache_key({"case": index}): {"index": index} for index in range(2000)}
    with ResultCache(cache_path) as cache:
        cache.put_many(items)
        asked = [*items, *(f"absent-{index}" for index in range(10))]
        found = cache.get_many(asked)
        assert found == items
        assert (cache.hits, cache.misses) == (2000, 10)
        assert len(cache) == 2000


def test_bad_keys_and_values_are_rejected_before_anything_is_written(cache_path: Path) -> None:
    with ResultCache(cache_path) as cache:
        with pytest.raises(TypeError, match="not JSON-serializable"):
            cache.put_many({"good": {"n": 1}, "bad": {"path": Path("/x")}})
        with pytest.raises(TypeError, match="must be a mapping"):
            cache.put_many({"good": {"n": 1}, "bad": ["not", "a", "dict"]})  # type: ignore[dict-item]
        with pytest.raises(TypeError, match="cache keys are strings"):
            cache.put_many({1: {"n": 1}})  # type: ignore[dict-item]
        with pytest.raises(TypeError, match="single string"):
            cache.get_many("abc")
        assert len(cache) == 0


def test_close_is_idempotent_and_a_closed_cache_refuses_work(cache_path: Path) -> None:
    cache = ResultCache(cache_path)
    cache.close()
    cache.close()
    with pytest.raises(ValueError, match="is closed"):
        cache.get("k")


def test_file_is_in_wal_mode_and_marked_as_a_persona_eval_cache(cache_path: Path) -> None:
    ResultCache(cache_path).close()
    connection = sqlite3.connect(cache_path)
    try:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert connection.execute("PRAGMA application_id").fetchone() == (cache_module._APPLICATION_ID,)
        columns = [row[1] for row in connection.execute("PRAGMA table_info(results)")]
        assert columns == ["key", "value", "created_at"]
    finally:
        connection.close()


# --- concurrency -------------------------------------------------------------------------------------


def _write_from_process(path: str, worker: int, start: Any) -> None:
    """One pytest-xdist-like worker: opens the cache itself and writes 200 keys in batches of 20."""
    start.wait(30)
    with ResultCache(path) as cache:
        for batch in range(10):
            keys = [f"w{worker}-k{batch * 20 + offset}" for offset in range(20)]
            cache.get_many(keys)
            cache.put_many({key: {"worker": worker, "key": key} for key in keys})


def test_four_processes_write_concurrently(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    # spawn, as pytest-xdist workers are separate interpreters; they also race to create the file.
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    workers = [context.Process(target=_write_from_process, args=(str(path), worker, start))
               for worker in range(4)]
    for process in workers:
        process.start()
    start.set()
    for process in workers:
        process.join(60)
    assert [process.exitcode for process in workers] == [0, 0, 0, 0]
    with ResultCache(path) as cache:
        expected = {f"w{worker}-k{index}": {"worker": worker, "key": f"w{worker}-k{index}"}
                    for worker in range(4) for index in range(200)}
        assert len(cache) == 800
        assert cache.get_many(list(expected)) == expected


def test_threads_share_one_cache(cache_path: Path) -> None:
    errors: list[BaseException] = []
    with ResultCache(cache_path) as cache:
        def write(thread: int) -> None:
            try:
                for batch in range(10):
                    items = {f"t{thread}-{batch}-{offset}": {"thread": thread} for offset in range(10)}
                    cache.put_many(items)
                    assert cache.get_many(list(items)) == items
            except BaseException as error:  # surfaced in the main thread below
                errors.append(error)

        threads = [threading.Thread(target=write, args=(thread,)) for thread in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        assert len(cache) == 800
        assert (cache.hits, cache.misses) == (800, 0)


def test_connections_racing_to_create_the_file_all_succeed(tmp_path: Path) -> None:
    # Each ResultCache has its own connection, so threads race on creation as processes would.
    for attempt in range(5):
        path = tmp_path / f"race-{attempt}.sqlite3"
        barrier = threading.Barrier(6)
        errors: list[BaseException] = []

        def open_and_write(opener: int, path: Path = path, barrier: threading.Barrier = barrier,
                           errors: list[BaseException] = errors) -> None:
            try:
                barrier.wait(10)
                with ResultCache(path) as cache:
                    cache.put(f"opener-{opener}", {"n": opener})
            except BaseException as error:  # surfaced in the main thread below
                errors.append(error)

        threads = [threading.Thread(target=open_and_write, args=(opener,)) for opener in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        with ResultCache(path) as cache:
            assert len(cache) == 6


def test_two_connections_in_one_process_do_not_conflict(cache_path: Path) -> None:
    with ResultCache(cache_path) as first, ResultCache(cache_path) as second:
        first.put("a", {"n": 1})
        second.put("b", {"n": 2})
        assert first.get_many(["a", "b"]) == second.get_many(["a", "b"]) == {"a": {"n": 1}, "b": {"n": 2}}


def _write_with_inherited_cache(cache: ResultCache) -> None:
    cache.put("from-child", {"pid": os.getpid()})


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork()")
def test_a_forked_child_opens_its_own_connection(cache_path: Path) -> None:
    with ResultCache(cache_path) as cache:
        cache.put("from-parent", {"n": 1})
        child = multiprocessing.get_context("fork").Process(target=_write_with_inherited_cache, args=(cache,))
        child.start()
        child.join(30)
        assert child.exitcode == 0
        assert set(cache.get_many(["from-parent", "from-child"])) == {"from-parent", "from-child"}
        cache.put("after-fork", {"n": 2})  # the parent's connection is untouched
        assert len(cache) == 3


def _hold_write_lock(path: Path, seconds: float, held: threading.Event) -> None:
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        held.set()
        time.sleep(seconds)
        connection.execute("ROLLBACK")
    finally:
        connection.close()


def test_a_locked_database_is_retried_until_it_is_free(cache_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # A short busy timeout makes SQLite give up at once, so the retry loop does the waiting.
    monkeypatch.setattr(cache_module, "_BUSY_TIMEOUT_S", 0.01)
    with ResultCache(cache_path) as cache:
        held = threading.Event()
        holder = threading.Thread(target=_hold_write_lock, args=(cache_path, 0.2, held))
        holder.start()
        held.wait(10)
        cache.put("k", {"n": 1})
        holder.join()
        assert cache.get("k") == {"n": 1}


def test_a_database_that_stays_locked_is_a_config_error(cache_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "_BUSY_TIMEOUT_S", 0.01)
    monkeypatch.setattr(cache_module, "_LOCKED_RETRIES", 1)
    with ResultCache(cache_path) as cache:
        held = threading.Event()
        holder = threading.Thread(target=_hold_write_lock, args=(cache_path, 0.5, held))
        holder.start()
        held.wait(10)
        with pytest.raises(ConfigError, match=r"stayed locked.*--pe-no-cache"):
            cache.put("k", {"n": 1})
        holder.join()
        cache.put("k", {"n": 1})  # usable again once the other writer is done
        assert len(cache) == 1


# --- interruption ------------------------------------------------------------------------------------

_BATCH_SIZE = 50
_WRITER = """
import sys
from persona_eval.cache import ResultCache

cache = ResultCache(sys.argv[1])
batch_size = int(sys.argv[2])
batch = 0
while True:
    cache.put_many({f"{batch}:{item}": {"batch": batch, "item": item, "padding": "x" * 2000}
                    for item in range(batch_size)})
    print(batch, flush=True)
    batch += 1
"""


@pytest.mark.parametrize("signal_number", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_an_interrupted_writer_keeps_every_committed_batch(tmp_path: Path, signal_number: int) -> None:
    path = tmp_path / "interrupted.sqlite3"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(_BATCH_SIZE)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert writer.stdout is not None
    committed: list[int] = []
    try:
        while len(committed) < 5:
            line = writer.stdout.readline()
            assert line, "the writer exited before committing five batches"
            committed.append(int(line))
        writer.send_signal(signal_number)
        rest, _ = writer.communicate(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    committed.extend(int(line) for line in rest.split())

    connection = sqlite3.connect(path)
    try:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        connection.close()
    with ResultCache(path) as cache:
        stored = cache.get_many([f"{batch}:{item}" for batch in range(max(committed) + 2)
                                 for item in range(_BATCH_SIZE)])
    per_batch = Counter(value["batch"] for value in stored.values())
    assert all(per_batch[batch] == _BATCH_SIZE for batch in committed)
    # A batch is there whole or not at all; at most the one in flight, after the last reported, is extra.
    assert all(count == _BATCH_SIZE for count in per_batch.values())
    assert set(per_batch) - set(committed) <= {max(committed) + 1}


# --- files that cannot be a cache --------------------------------------------------------------------


def _assert_helpful(error: pytest.ExceptionInfo[ConfigError], path: Path) -> None:
    message = str(error.value)
    assert str(path) in message
    assert "Delete it" in message
    assert "--pe-no-cache" in message


def test_a_directory_is_not_a_cache(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        ResultCache(tmp_path)
    _assert_helpful(error, tmp_path)
    assert "is a directory" in str(error.value)


def test_a_file_that_is_not_sqlite_is_not_a_cache(tmp_path: Path) -> None:
    path = tmp_path / CACHE_FILENAME
    path.write_text("this is not a database, " * 100)
    with pytest.raises(ConfigError) as error:
        ResultCache(path)
    _assert_helpful(error, path)
    assert "not a SQLite database" in str(error.value)
    assert path.read_text().startswith("this is not a database")


def test_another_programs_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE results (id INTEGER, score REAL)")
    connection.commit()
    connection.close()
    with pytest.raises(ConfigError) as error:
        ResultCache(path)
    _assert_helpful(error, path)
    assert "another program" in str(error.value)
    connection = sqlite3.connect(path)
    try:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    finally:
        connection.close()


def test_a_parent_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    path = blocker / CACHE_FILENAME
    with pytest.raises(ConfigError) as error:
        ResultCache(path)
    _assert_helpful(error, path)
    assert issubclass(ConfigError, PersonaEvalError)


# --- NullCache ---------------------------------------------------------------------------------------


def test_null_cache_stores_nothing_and_counts_misses() -> None:
    with NullCache() as cache:
        cache.put_many({"a": {"n": 1}})
        cache.put("b", {"n": 2})
        assert cache.get_many(["a", "b", "a"]) == {}
        assert cache.get("a") is None
        assert len(cache) == 0
        assert cache
        assert (cache.hits, cache.misses) == (0, 3)
    cache.close()


# --- the secret guard --------------------------------------------------------------------------------


def _cache_file_bytes(cache_path: Path) -> bytes:
    """The cache file and its WAL and shared-memory companions, as the disk holds them."""
    return b"".join(path.read_bytes() for path in sorted(cache_path.parent.glob(cache_path.name + "*")))


def test_put_many_stores_a_value_containing_an_api_key_with_the_key_masked(
        cache_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0123456789abcdef")
    monkeypatch.setenv("VENDOR_API_KEY", "vendor-secret-42")
    with ResultCache(cache_path) as cache:
        cache.put_many({"ok": {"n": 1},
                        "leak": {"request": {"headers": "Bearer sk-test-0123456789abcdef"}}})
        cache.put("vendor", {"text": "vendor-secret-42", "vendor-secret-42": ["vendor-secret-42", 3]})
        assert len(cache) == 3  # the batch with a secret in it is kept whole
        assert cache.get("ok") == {"n": 1}
        assert cache.get("leak") == {"request": {"headers": "Bearer [secret $OPENAI_API_KEY masked]"}}
        masked = "[secret $VENDOR_API_KEY masked]"
        assert cache.get("vendor") == {"text": masked, masked: [masked, 3]}
    stored = _cache_file_bytes(cache_path)
    assert b"sk-test-0123456789abcdef" not in stored and b"vendor-secret-42" not in stored


def test_a_secret_that_json_escapes_is_masked_and_the_value_stays_json(
        cache_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = 'pa"ss\\word-1234'
    monkeypatch.setenv("PROXY_PASSWORD", secret)
    with ResultCache(cache_path) as cache:
        cache.put("k", {"text": f"user:{secret}@proxy"})
        assert cache.get("k") == {"text": "user:[secret $PROXY_PASSWORD masked]@proxy"}
    assert b"word-1234" not in _cache_file_bytes(cache_path)


def test_secret_guard_ignores_short_values_and_other_variables(cache_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHORT_API_KEY", "abc1234")  # under 8 characters: too common to look for
    monkeypatch.setenv("EMPTY_API_KEY", "")
    monkeypatch.setenv("API_KEY_HINT", "emergency-department")  # name does not end in _API_KEY
    with ResultCache(cache_path) as cache:
        cache.put("k", {"text": "abc1234 emergency-department"})
        assert len(cache) == 1


# --- default location --------------------------------------------------------------------------------


def test_default_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PERSONA_EVAL_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "persona-eval"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # ignored, as the XDG spec asks
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "persona-eval"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "persona-eval"
    monkeypatch.setenv("PERSONA_EVAL_CACHE_DIR", "~/pe-cache")
    assert default_cache_dir() == tmp_path / "home" / "pe-cache"
    assert default_cache_path() == tmp_path / "home" / "pe-cache" / "results.sqlite"
    monkeypatch.setenv("PERSONA_EVAL_CACHE_DIR", "")
    assert default_cache_dir() == tmp_path / "xdg" / "persona-eval"


def test_in_dir_opens_the_cache_file_existing_cache_directories_hold(tmp_path: Path) -> None:
    # Written under the name caches on disk already have, then found again through in_dir.
    with ResultCache(tmp_path / "cache" / "results.sqlite") as cache:
        cache.put("k", {"text": "kept"})
    with ResultCache.in_dir(tmp_path / "cache") as cache:
        assert cache.path == tmp_path / "cache" / "results.sqlite"
        assert cache.get("k") == {"text": "kept"}


# --- notes -------------------------------------------------------------------------------------------


def test_notes_round_trip_across_opens_apart_from_the_results(cache_path: Path) -> None:
    with ResultCache(cache_path) as cache:
        assert cache.get_note("identity/abc") is None
        cache.put_note("identity/abc", {"identity": {"root": "/models/X"}})
        cache.put_note("identity/abc", {"identity": {"root": "/models/Y"}})
        cache.put("k", {"n": 1})
    with ResultCache(cache_path) as cache:
        assert cache.get_note("identity/abc") == {"identity": {"root": "/models/Y"}}
        assert len(cache) == 1  # notes are not results
        assert cache.get_many(["identity/abc"]) == {}
        assert (cache.hits, cache.misses) == (0, 1)


def test_a_cache_file_from_before_the_notes_gets_them_and_keeps_its_results(cache_path: Path) -> None:
    with ResultCache(cache_path) as cache:
        cache.put("k", {"n": 1})
    connection = sqlite3.connect(cache_path)
    connection.execute("DROP TABLE notes")
    connection.commit()
    connection.close()
    with ResultCache(cache_path) as cache:
        assert cache.get("k") == {"n": 1}
        cache.put_note("dropped/x", {"dropped": {"temperature": "HTTP 400: refused"}})
        assert cache.get_note("dropped/x") == {"dropped": {"temperature": "HTTP 400: refused"}}


def test_notes_mask_secrets_like_results_and_null_cache_keeps_none(cache_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_0123456789abcdefghij")
    with ResultCache(cache_path) as cache:
        cache.put_note("dropped/x", {"dropped": {"temperature": "token hf_0123456789abcdefghij"}})
        assert cache.get_note("dropped/x") == {"dropped": {"temperature": "token [secret $HF_TOKEN masked]"}}
        with pytest.raises(TypeError, match="must be a mapping"):
            cache.put_note("n", ["not", "a", "mapping"])  # type: ignore[arg-type]
    assert b"hf_0123456789abcdefghij" not in _cache_file_bytes(cache_path)
    null = NullCache()
    null.put_note("n", {"a": 1})
    assert null.get_note("n") is None
