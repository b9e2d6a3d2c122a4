"""The HTML report in a real browser: headless Debian chromium, driven over the DevTools protocol on a
pipe (standard library only). It renders the verdict and tables, its script filters the cases, the
console stays free of errors, no request leaves file: and data:, and the screenshot is a real picture.

CI installs chromium (.ci/run); without it this test fails, it is never skipped.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from test_report_html import (
    HOSTILE,
    HOSTILE_ANNOTATOR,
    HOSTILE_JUDGE,
    expected_disagreements,
    safety_records,
    sample_run,
    sample_safety,
    write_review,
)

from persona_eval.report.html import write_report
from persona_eval.results import write_json, write_jsonl

CHROMIUM = "/usr/bin/chromium"
BASH = shutil.which("bash") or "/bin/bash"
TIMEOUT = 60.0
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
    "--disable-default-apps", "--mute-audio", "--hide-scrollbars", "--no-default-browser-check",
    "--disable-dev-shm-usage",
    # Nothing resolves: a request to another host could not succeed even if the page tried one.
    "--host-resolver-rules=MAP * ~NOTFOUND",
)


class DevToolsError(RuntimeError):
    pass


def _high_pipe() -> tuple[int, int]:
    """A pipe whose two ends are numbered 10 or above (close-on-exec, like os.pipe's)."""
    ends = []
    for end in os.pipe():
        ends.append(fcntl.fcntl(end, fcntl.F_DUPFD_CLOEXEC, 10))
        os.close(end)
    return ends[0], ends[1]


class Browser:
    """Headless chromium with --remote-debugging-pipe: commands on fd 3, replies and events on fd 4,
    each message one JSON document ended by a NUL byte."""

    def __init__(self, user_data_dir: Path, log_path: Path) -> None:
        to_browser_read, self._to_browser = _high_pipe()
        self._from_browser, from_browser_write = _high_pipe()
        self._log = log_path.open("wb")
        # bash moves the browser's two pipe ends to fds 3 and 4, where chromium expects them (they were
        # put at 10 or above, so that neither move overwrites the other).
        script = (f'exec "$@" 3<&{to_browser_read} 4>&{from_browser_write} '
                  f"{to_browser_read}<&- {from_browser_write}>&-")
        self.process = subprocess.Popen(
            [BASH, "-c", script, "bash", CHROMIUM, *FLAGS, f"--user-data-dir={user_data_dir}",
             "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            pass_fds=(to_browser_read, from_browser_write))
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None) -> Any:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise DevToolsError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, method: str, *, session: str | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT
        for event in self.events:
            if event["method"] == method and event.get("sessionId") == session:
                return event
        while True:
            event = self._read(deadline)
            if "method" in event:
                self.events.append(event)
                if event["method"] == method and event.get("sessionId") == session:
                    return event

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DevToolsError(f"chromium did not answer within {TIMEOUT:.0f} s")
            ready, _, _ = select.select([self._from_browser], [], [], remaining)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise DevToolsError(f"chromium closed the pipe (exit status {self.process.poll()})")
                self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def close(self) -> None:
        with contextlib.suppress(DevToolsError, OSError):
            self.send("Browser.close")
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)
        os.close(self._to_browser)
        os.close(self._from_browser)
        self._log.close()


class Page:
    """One tab with the domains that report errors and requests switched on."""

    def __init__(self, browser: Browser) -> None:
        self.browser = browser
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False})

    def send(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return self.browser.send(method, params, session=self.session)

    def open(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})
        self.browser.wait_for("Page.loadEventFired", session=self.session)

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise DevToolsError(f"{expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def own_events(self) -> list[dict[str, Any]]:
        return [e for e in self.browser.events if e.get("sessionId") == self.session]

    def problems(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions, failed loads, dialogs."""
        found = []
        for event in self.own_events():
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(f"uncaught: {params['exceptionDetails'].get('text')} "
                             f"{params['exceptionDetails'].get('exception', {}).get('description', '')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
                found.append(f"console.{params['type']}: {[a.get('value') for a in params.get('args', [])]}")
            elif method == "Log.entryAdded" and params["entry"].get("level") in ("error", "warning"):
                found.append(f"log {params['entry']['level']}: {params['entry'].get('text')}")
            elif method == "Network.loadingFailed":
                found.append(f"load failed: {params.get('errorText')}")
            elif method == "Page.javascriptDialogOpening":
                found.append(f"dialog: {params.get('message')}")
        return found

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.own_events() if e["method"] == "Network.requestWillBeSent"]

    def screenshot(self) -> bytes:
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": 1280, "height": min(int(size["height"]), 8000), "scale": 1}
        data = self.send("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True})
        return base64.b64decode(data["data"])


def png_facts(data: bytes) -> tuple[int, int, int]:
    """(width, height, distinct scanlines) of a PNG, checking its structure on the way."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, chunks = 8, []
    while position < len(data):
        (length,) = struct.unpack(">I", data[position:position + 4])
        kind = data[position + 4:position + 8]
        body = data[position + 8:position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length:position + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        position += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, colour = struct.unpack(">IIBB", chunks[0][1][:10])
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = 1 + width * channels * depth // 8
    assert len(raw) == stride * height, "pixel data does not match the header"
    # One colour would give a handful of distinct filtered scanlines; a page of text gives hundreds.
    return width, height, len({raw[i:i + stride] for i in range(0, len(raw), stride)})


class Dom(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: the report's browser test needs Debian's chromium. Install it with "
                    "`apt-get update && apt-get install -y chromium` (.ci/run does this in CI).", pytrace=False)
    folder = Path(tempfile.mkdtemp(prefix="pe-chromium-"))
    session = Browser(folder / "profile", folder / "chromium.log")
    try:
        session.send("Browser.getVersion")
        yield session
    finally:
        session.close()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], list[dict[str, Any]]]:
    run_dir = tmp_path_factory.mktemp("run")
    summary, cases = sample_run()
    summary["safety"] = sample_safety()
    write_json(run_dir / "summary.json", summary)
    # The safety task's response records share the cases file; the triage drill-down leaves them out.
    write_jsonl(run_dir / "cases.jsonl", [*cases, *safety_records()[0]])
    write_review(run_dir)
    return write_report(run_dir), summary, cases


def test_the_harness_sees_errors_and_outside_requests(browser: Browser, tmp_path: Path) -> None:
    """A control: a page that misbehaves is caught, so a clean report means something."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><img src="http://example.com/pixel.png">'
                   '<script>console.error("boom"); undefinedFunction();</script></body></html>')
    page = Page(browser)
    page.open(bad.as_uri())
    problems = " | ".join(page.problems())
    assert "boom" in problems and "undefinedFunction" in problems
    assert "http://example.com/pixel.png" in page.requests()


def test_the_report_renders_in_chromium(browser: Browser, report: tuple[Path, dict[str, Any], list[dict[str, Any]]],
                                        tmp_path: Path) -> None:
    path, _, cases = report
    page = Page(browser)
    page.open(path.as_uri())

    # The verdict and the tables rendered.
    assert page.evaluate("document.querySelector('#verdict .badge').textContent") == "FAILED"
    assert "under-triage rate (emergency) for ed_physician" in page.evaluate(
        "document.getElementById('verdict').innerText")
    assert page.evaluate("document.querySelectorAll('#tables table.metrics').length") == 6
    assert page.evaluate("document.querySelectorAll('#tables table.metrics tbody tr').length") == 6 * 3
    assert page.evaluate("document.querySelectorAll('svg.fig').length") > 30
    assert page.evaluate("document.querySelector('#figures svg.fig').getBoundingClientRect().width") > 300

    # The script ran: its count, then filtering by persona, stratum and disagreement.
    total = len(cases)
    count = "document.getElementById('case-count').textContent"
    assert page.evaluate(count) == f"Showing {total} of {total} answers"
    choose = ("(function (id, value) {{ var c = document.getElementById(id); "
              "if (c.type === 'checkbox') {{ c.checked = value; }} else {{ c.value = value; }} "
              "c.dispatchEvent(new Event('change')); }})({!r}, {})")
    page.evaluate(choose.format("f-persona", json.dumps("ed_physician")))
    ed = sum(c["persona"] == "ed_physician" for c in cases)
    assert page.evaluate(count) == f"Showing {ed} of {total} answers"
    page.evaluate(choose.format("f-stratum", json.dumps("emergency")))
    ed_emergency = sum(c["persona"] == "ed_physician" and c["stratum"] == "emergency" for c in cases)
    assert page.evaluate(count) == f"Showing {ed_emergency} of {total} answers"
    page.evaluate(choose.format("f-persona", json.dumps("")))
    page.evaluate(choose.format("f-stratum", json.dumps("")))
    page.evaluate(choose.format("f-disagree", "true"))
    assert page.evaluate(count) == f"Showing {expected_disagreements(cases)} of {total} answers"
    visible = page.evaluate("Array.prototype.filter.call(document.querySelectorAll('#case-table tbody tr'), "
                            "function (r) { return r.offsetParent !== null; }).length")
    assert visible == expected_disagreements(cases)
    page.evaluate(choose.format("f-disagree", "false"))

    # The baseline switch shows the differences against helpful_assistant instead.
    shown = ("Array.prototype.filter.call(document.querySelectorAll('.d[data-b={}]'), "
             "function (s) {{ return s.offsetParent !== null; }}).length")
    assert page.evaluate(shown.format("helpful_assistant")) == 0
    assert page.evaluate(shown.format("no_persona")) > 0
    in_safety = shown.replace("'.d[", "'#safety .d[")
    assert page.evaluate(in_safety.format("helpful_assistant")) == 0
    assert page.evaluate(in_safety.format("no_persona")) == 2 * 4 * 4  # criteria x (pooled + 3 judges) x personas
    page.evaluate(choose.format("baseline-select", json.dumps("helpful_assistant")))
    assert page.evaluate(shown.format("no_persona")) == 0
    assert page.evaluate(shown.format("helpful_assistant")) > 0
    assert page.evaluate(in_safety.format("helpful_assistant")) == 2 * 4 * 4
    page.evaluate(choose.format("baseline-select", json.dumps("no_persona")))

    # The patient-safety section: bars and a heatmap per criterion, reversals outlined, the review tables.
    assert page.evaluate("document.querySelectorAll('#safety svg.fig').length") == 2
    assert page.evaluate("document.querySelector('#safety svg.fig').getBoundingClientRect().width") > 500
    assert page.evaluate("document.querySelectorAll('#safety table.heat tbody tr').length") == 2 * 6
    assert page.evaluate("document.querySelectorAll('#safety table.heat td.rev').length") == 2 * 2
    assert page.evaluate("getComputedStyle(document.querySelector('#safety td.rev')).outlineStyle") == "solid"
    safety_text = page.evaluate("document.getElementById('safety').textContent")
    assert HOSTILE_JUDGE in safety_text and HOSTILE in safety_text and "Reversals (2):" in safety_text
    assert page.evaluate("document.querySelectorAll('#review table').length") == 3
    assert HOSTILE_ANNOTATOR in page.evaluate("document.getElementById('review').textContent")

    # Hostile text from the dataset and the model is text, not markup; nothing of it ran.
    assert page.evaluate("document.querySelectorAll('script').length") == 1
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    assert HOSTILE in page.evaluate("document.getElementById('prompts').textContent")
    assert HOSTILE in page.evaluate("document.getElementById('case-table').textContent")

    # The DOM after the script ran.
    dom = Dom()
    dom.feed(page.evaluate("document.documentElement.outerHTML"))
    assert sum(1 for tag, attrs in dom.tags if tag == "tr" and "data-persona" in attrs) == total
    assert not any(name.startswith("on") for _, attrs in dom.tags for name in attrs)

    # A screenshot that is a real picture of the page.
    png = page.screenshot()
    shot_dir = os.environ.get("PE_REPORT_SCREENSHOT_DIR")
    (Path(shot_dir) if shot_dir else tmp_path).joinpath("report.png").write_bytes(png)
    width, height, distinct_rows = png_facts(png)
    assert width == 1280 and height > 2000
    assert len(png) > 50_000 and distinct_rows > 200

    # No errors, no request beyond the file itself.
    assert page.problems() == []
    assert page.requests() and all(url.startswith(("file:", "data:")) for url in page.requests()), page.requests()
