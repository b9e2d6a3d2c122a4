"""The golden run: one fixed command against deterministic stand-in servers gives, byte for byte, the
cases.jsonl, judgments.jsonl, summary.json and report text recorded in tests/golden/ (apart from what
differs between any two runs: the run id, times, durations and the servers' ports).

It pins the behaviour of the whole pipeline (prompts, parsing, metrics, comparisons, the gate, the judge
panel, the summary and the report) while the code under it is rearranged. A change that is meant to alter
the outputs regenerates the files with ``PERSONA_EVAL_UPDATE_GOLDEN=1 pytest tests/test_golden.py`` and
the diff is reviewed with the change.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from persona_eval.testing.standin import Messages, StandInServer

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("PERSONA_EVAL_UPDATE_GOLDEN") == "1"
STARTED = 1796119200.0

pytestmark = pytest.mark.slow


def _digest(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:8], "big")


def _candidate(model: str) -> Any:
    """A candidate model whose answer depends only on the conversation: a triage letter that a persona
    moves (towards C for the ED personas on this model, towards A on the other), a short safety answer."""

    def answer(messages: Messages) -> str:
        system = " ".join(str(m.get("content", "")) for m in messages if m.get("role") == "system")
        user = str(messages[-1].get("content", "")) if messages else ""
        draw = _digest(model, system, user)
        if user.startswith("Patient information:"):  # the triage study template's user turn
            letters = "ABC"
            index = draw % 3
            if "Emergency Department" in system and draw % 4 == 0:
                index = 2 if model == "m1" else 0
            return (f"The findings weigh towards one level of care (draw {draw % 97}).\n\n## Final Response\n"
                    f"{letters[index]}. The findings call for this level of care.")
        return f"Answer {draw % 89}: see your clinician before changing anything; call emergency services if worse."
    return answer


def _judge(name: str) -> Any:
    """A judge whose ranking is a permutation of 1..k drawn from its name and the prompt."""

    def answer(messages: Messages) -> str:
        prompt = str(messages[-1].get("content", "")) if messages else ""
        found = re.search(r"comparing (\d+) anonymous responses", prompt)
        k = int(found.group(1)) if found else 2
        numbers = list(range(1, k + 1))
        numbers.sort(key=lambda n: _digest(name, prompt, str(n)))
        if _digest(name, prompt, "invalid") % 23 == 0:
            return "I prefer the first one."  # now and then an invalid reply, retried
        return json.dumps({"ranking": numbers})
    return answer


class _Text(HTMLParser):
    """The visible text of a page (script and style left out), one line per text node."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("script", "style")

    def handle_data(self, data: str) -> None:
        text = " ".join(data.split())
        if text and not self._skip:
            self.lines.append(text)


def _report_text(html: str, packages: dict[str, str]) -> str:
    parser = _Text()
    parser.feed(html)
    lines = parser.lines
    # The report's metadata lists each key on a line with its value on the next.
    for index in range(1, len(lines)):
        label = lines[index - 1]
        if label in VOLATILE_KEYS or label.replace(" ", "_") in VOLATILE_KEYS or packages.get(label) == lines[index]:
            lines[index] = "<volatile>"
    return "\n".join(lines) + "\n"


# What differs between any two runs of the same command: times, durations and what depends on them, and
# the machine's package versions.
VOLATILE_KEYS = {"packages", "run_id", "started", "finished", "duration_seconds", "seconds", "model_seconds",
                 "inference_seconds", "tokens_per_second", "max_in_flight", "created", "generated_at", "git_revision",
                 "elapsed_seconds", "wall_seconds", "mean_in_flight", "busy_seconds"}


def _normalize(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: ("<volatile>" if key in VOLATILE_KEYS else _normalize(item)) for key, item in value.items()}
    if isinstance(value, list):
        return [_normalize(item) for item in value]
    if isinstance(value, float):
        # Twelve significant digits: the same statistic computed in another order may differ in the last bits.
        return float(f"{value:.12g}")
    return value


def _normalize_text(text: str, run_id: str, ports: dict[int, str], root: Path) -> str:
    text = text.replace(run_id, "<run-id>").replace(str(root), "<project>").replace(str(REPO), "<repository>")
    for port, name in ports.items():
        text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:<{name}>")
    text = re.sub(r"\b20\d\d-\d\d-\d\d[T ]\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:?\d\d| UTC)?", "<time>", text)
    text = re.sub(r"\b\d+(\.\d+)? ?(s|seconds|generated tokens/s|tokens/s)\b", "<duration>", text)
    return text


def _jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _dump(records: Any) -> str:
    return json.dumps(records, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def test_the_golden_run_is_unchanged(pytester: pytest.Pytester):
    shutil.copytree(REPO / "evals", pytester.path / "evals")
    shutil.copytree(REPO / "fixtures", pytester.path / "fixtures")
    servers = {name: StandInServer(served_name=name, root=f"/models/{name}", started=STARTED, created=1,
                                   answer=(_candidate(name) if name.startswith("m") else _judge(name)))
               for name in ("m1", "m2", "j1", "j2")}
    for server in servers.values():
        server.start()
    try:
        models = pytester.path / "models.yaml"
        models.write_text("models:\n" + "".join(
            f"  {name}:\n    backend: openai\n    model: {name}\n    base_url: {server.base_url}\n"
            for name, server in servers.items()))
        result = pytester.runpytest_subprocess(
            "evals", "-p", "no:cacheprovider", "--pe-models-file", str(models), "--pe-model", "m1",
            "--pe-model", "m2", "--pe-judge", "j1", "--pe-judge", "j2", "--pe-judge-triage", "--pe-limit", "4",
            "--pe-bootstrap-resamples", "400", "--pe-allow-unchecked", "--pe-quiet",
            "--pe-cache-dir", str(pytester.path / "cache"), "--pe-reports-dir", str(pytester.path / "reports"))
    finally:
        for server in servers.values():
            server.stop()
    run = (pytester.path / "reports" / "latest").resolve()
    assert (run / "summary.json").is_file(), result.stdout.str() + result.stderr.str()
    summary = json.loads((run / "summary.json").read_text())
    ports = {server.port: name for name, server in servers.items()}
    outputs = {
        "cases.json": _dump(_normalize(_jsonl(run / "cases.jsonl"))),
        "judgments.json": _dump(_normalize(_jsonl(run / "judgments.jsonl"))),
        "summary.json": _dump(_normalize(summary)),
        "report.txt": _report_text((run / "report.html").read_text(), summary["metadata"].get("packages", {})),
        "summary.md": (run / "summary.md").read_text(),
    }
    outputs = {name: _normalize_text(text, summary["run_id"], ports, pytester.path) for name, text in outputs.items()}
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        for name, text in outputs.items():
            (GOLDEN / name).write_text(text)
    for name, text in outputs.items():
        expected = (GOLDEN / name).read_text()
        assert text == expected, f"{name} differs from tests/golden/{name} (see the module docstring)"
