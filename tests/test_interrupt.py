"""One Ctrl-C stops a run against a hung OpenAI-compatible server: the runner returns at once, nothing
more is sent or retried, the request threads never keep the process alive, and what finished before the
interrupt is in the cache for the rerun.

In-process with the runner, in a child Python process (does it exit?), and through the real plugin
(`pytest evals -k triage` in a subprocess, one SIGINT).
"""

from __future__ import annotations

import _thread
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from persona_eval.backends.base import GenerationConfig
from persona_eval.backends.openai_compat import OpenAIBackend
from persona_eval.cache import NullCache, ResultCache
from persona_eval.errors import BackendError
from persona_eval.prompts import RenderedMessages
from persona_eval.runner import Runner
from persona_eval.testing.standin import StandInServer

REPO = Path(__file__).resolve().parent.parent
CONFIG = GenerationConfig(max_new_tokens=8)


def _requests(count: int) -> list[RenderedMessages]:
    return [RenderedMessages((("user", f"case {i:03d}"),), None) for i in range(count)]


def _interrupt_when(ready: Callable[[], bool], *, settle: float = 0.5, limit: float = 60.0) -> list[float]:
    """Ctrl-C in the main thread once `ready()` holds (and `settle` seconds more, for what the runner does
    with the answers it already has), however loaded the machine is. Returns a list that receives the
    time.monotonic() of the interrupt."""
    sent: list[float] = []

    def watch() -> None:
        _wait_for(ready, limit)
        time.sleep(settle)
        sent.append(time.monotonic())
        _thread.interrupt_main()
    threading.Thread(target=watch, daemon=True).start()
    return sent


def test_a_ctrl_c_stops_the_runner_at_once_and_nothing_more_is_sent(tmp_path: Path) -> None:
    with StandInServer(served_name="m") as server, ResultCache(tmp_path / "results.sqlite") as cache:
        server.hang(after=3)
        # The defaults that made a hung server hold a run for minutes: 120 s per try, 5 retries.
        backend = OpenAIBackend("m", model="m", base_url=server.base_url, max_in_flight=4)
        runner = Runner(backend, cache)
        sent = _interrupt_when(lambda: server.answered == 3)
        with pytest.raises(KeyboardInterrupt):
            runner.generate(_requests(12), CONFIG, None)
        assert sent and time.monotonic() - sent[0] < 5.0
        assert backend.cancelled
        assert server.answered == 3 and len(cache) == 3  # what finished before the interrupt is kept
        stuck = [t for t in threading.enumerate() if t.name == "persona-eval-request"]
        assert stuck and all(t.daemon for t in stuck)  # still reading: they must not hold the process
        asked = server.chat_completions
        with pytest.raises(BackendError, match="cancelled"):
            backend.generate(_requests(1), CONFIG, None)
        assert server.chat_completions == asked
    # The server stops: the hung requests end, see the cancellation, and their threads finish.
    deadline = time.monotonic() + 5.0
    while any(t.name == "persona-eval-request" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "persona-eval-request" for t in threading.enumerate())


def test_cancel_ends_a_backoff_and_gives_up_the_retries() -> None:
    with StandInServer(served_name="m", fail_status=503) as server:
        backend = OpenAIBackend("m", model="m", base_url=server.base_url, max_retries=5)
        backend.retry_base_delay = backend.retry_max_delay = 30.0
        cancelled: list[float] = []

        def cancel_in_the_backoff() -> None:
            _wait_for(lambda: server.chat_completions == 1, 60.0)
            time.sleep(0.2)
            cancelled.append(time.monotonic())
            backend.cancel()
        threading.Thread(target=cancel_in_the_backoff, daemon=True).start()
        with pytest.raises(BackendError, match="cancelled"):
            backend.generate(_requests(1), CONFIG, None)
        # The backoff alone is 30 s: returning well within it means the cancel ended it.
        assert cancelled and time.monotonic() - cancelled[0] < 10.0
        assert server.chat_completions == 1  # the first try only: the backoff was cut short, no retry


CHILD = textwrap.dedent("""
    import sys
    from persona_eval.backends.base import GenerationConfig
    from persona_eval.backends.openai_compat import OpenAIBackend
    from persona_eval.cache import NullCache
    from persona_eval.prompts import RenderedMessages
    from persona_eval.runner import Runner

    backend = OpenAIBackend("m", model="m", base_url=sys.argv[1])
    runner = Runner(backend, NullCache())
    requests = [RenderedMessages((("user", f"case {i}"),), None) for i in range(8)]
    try:
        runner.generate(requests, GenerationConfig(max_new_tokens=8), None)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
""")


@pytest.mark.parametrize("answered", [0, 1], ids=["hung-from-the-start", "hung-after-one-answer"])
def test_the_request_threads_do_not_keep_the_process_alive(answered: int) -> None:
    """Hung from the start, the interrupt finds the calling thread reading the identity's reply; after
    one answer, it finds 7 chat completions in flight on the runner's threads."""
    with StandInServer(served_name="m") as server:
        server.hang(after=answered)
        child = subprocess.Popen([sys.executable, "-c", CHILD, server.base_url], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=REPO)
        in_flight = 8 if answered else 0
        stdout, stderr, took = _sigint_when(
            child, lambda: server.faults["hang"] > 0 and server.answered == answered
            and len(server.requests_to("/v1/chat/completions")) == in_flight, limit=60.0)
        assert child.returncode == 0, stderr
        assert "interrupted" in stdout, stderr
        assert "Traceback" not in stderr, stderr
        assert server.answered == answered
    # A process held by its request threads would wait out the 120 s timeout.
    assert took < 10.0


# -- through the real plugin --------------------------------------------------------------------------
NAME = "candidate"
STARTED = 1796119200.0
LIMIT = 4  # cases per stratum: 8 cases for each of the 7 personas (the placebo too)
BEFORE_HANG = 5


def _plugin_args(tmp: Path, base_url: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "evals", "-p", "no:cacheprovider", "-k", "triage",
            "--pe-limit", str(LIMIT), "--pe-model", f"openai:{NAME}@{base_url}",
            "--pe-dataset", f"triage={REPO / 'fixtures/triage/vignettes.jsonl'}",
            "--pe-cache-dir", str(tmp / "cache"), "--pe-reports-dir", str(tmp / "reports")]


def _sigint_when(process: subprocess.Popen[str], ready: Callable[[], bool], *, limit: float, settle: float = 0.0,
                 exit_within: float = 60.0) -> tuple[str, str, float]:
    """SIGINT to `process` once `ready()` holds (and `settle` seconds more); its stdout, its stderr and the
    seconds from the signal to its exit. The process is killed if it outlives the test."""
    try:
        assert _wait_for(ready, limit)
        time.sleep(settle)
        process.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        stdout, stderr = process.communicate(timeout=exit_within)
        return stdout, stderr, time.monotonic() - interrupted
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def _wait_for(condition, seconds: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_one_sigint_stops_pytest_evals_and_the_rerun_sends_only_what_is_missing(tmp_path: Path) -> None:
    shutil.copytree(REPO / "evals", tmp_path / "evals")
    with StandInServer(served_name=NAME, root="/models/X", started=STARTED,
                       answer=lambda messages: "Answer: B") as hung:
        hung.hang(after=BEFORE_HANG)
        port = hung.port
        run = subprocess.Popen(_plugin_args(tmp_path, hung.base_url), cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        # settle: the answers are stored as they arrive.
        stdout, stderr, took = _sigint_when(run, lambda: hung.answered == BEFORE_HANG and hung.faults["hang"] > 0,
                                            limit=120.0, settle=0.5, exit_within=30.0)
        print(f"SIGINT to exit: {took:.2f} s")
    # Without cancellation the run waits out a 120 s timeout per try; a loaded machine needs a few seconds.
    assert took < 30.0, (stdout, stderr)
    assert run.returncode == pytest.ExitCode.INTERRUPTED, (stdout, stderr)
    assert "Traceback" not in stderr, stderr
    assert "threading" not in stderr, stderr
    assert "KeyboardInterrupt" in stdout
    # How to resume, in the terminal summary.
    assert f"interrupted. Every answer received is in the cache ({tmp_path / 'cache'}); rerun the same command" \
        in stdout

    # A healthy server at the same address, the same model: only the unanswered requests are sent.
    with StandInServer(port=port, served_name=NAME, root="/models/X", started=STARTED,
                       answer=lambda messages: "Answer: B") as healthy:
        rerun = subprocess.run(_plugin_args(tmp_path, healthy.base_url), cwd=tmp_path, capture_output=True,
                               text=True, timeout=300)
        assert rerun.returncode in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), rerun.stdout
        total = 7 * 2 * LIMIT
        assert healthy.chat_completions == total - BEFORE_HANG
        assert all(count == 1 for count in healthy.answers.values())
        assert len(healthy.answers) == total - BEFORE_HANG


def test_a_runner_without_cancel_on_its_backend_still_stops(tmp_path: Path) -> None:
    """A backend without cancel() (a scripted one): the runner stops waiting all the same."""
    release = threading.Event()

    class Blocking:
        name, batch_size, max_in_flight = "blocking", 1, 4

        def render_prompt(self, request: RenderedMessages) -> str:
            return request.messages[-1][1]

        def identity(self) -> dict[str, str]:
            return {"backend": "blocking"}

        def generate(self, requests, config, scoring):  # type: ignore[no-untyped-def]
            release.wait(30)
            return []

    runner = Runner(Blocking(), NullCache())  # type: ignore[arg-type]
    sent = _interrupt_when(lambda: True)
    try:
        with pytest.raises(KeyboardInterrupt):
            runner.generate(_requests(4), CONFIG, None)
    finally:
        release.set()
    # The backend would block for 30 s.
    assert sent and time.monotonic() - sent[0] < 10.0
