"""The controller's reporter of the persona-eval plugin: it collects each case's results from its test
report, finishes the run (persona_eval.session.finish_run), reports the verdict as a test case of its own
(``persona-eval::deployment-gate``) and sets the session's exit status, and writes the verdict and the
tables to the terminal and to pytest-html."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from persona_eval.data import DatasetReport
from persona_eval.report import html as html_report
from persona_eval.report.terminal import render_run_notes, render_terminal_summary, render_verdict
from persona_eval.scheduling import condition_of
from persona_eval.session import WorkerState, finish_run
from persona_eval.settings import Settings

__all__ = ["FATAL", "GATE_NODEID", "PROPERTY", "Reporter"]

PROPERTY = "persona_eval"  # the test report attribute that carries a case's results to the controller
FATAL = "persona_eval_fatal"  # the test report attribute that carries a worker's stop to the controller
GATE_NODEID = "persona-eval::deployment-gate"


class Reporter:
    """Collects the cases' results from their test reports and writes the run's summary."""

    def __init__(self, config: pytest.Config, settings: Settings, state: WorkerState,
                 dataset_reports: dict[str, DatasetReport]) -> None:
        self.config = config
        self.settings = settings
        self.state = state
        self.results: list[dict[str, Any]] = []
        self.summary: dict[str, Any] | None = None
        self.saved_baseline: Path | None = None
        self.errors: list[str] = []
        self.started = time.time()
        self.interrupted = False
        self.has_cases = False  # a session without persona-eval cases (a test suite) gets no notes of ours
        self.dataset_reports = dataset_reports

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.has_cases = any(condition_of(item) is not None for item in session.items)

    def pytest_keyboard_interrupt(self, excinfo: Any) -> None:
        # Also called for pytest.exit (a run stopped with a message of its own, which says how to resume).
        self.interrupted = excinfo.errisinstance(KeyboardInterrupt)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        fatal = getattr(report, FATAL, None)
        if isinstance(fatal, dict) and getattr(self.config.option, "numprocesses", None):
            # A worker stopped the run (see _stop_run): the same message and exit status as without workers.
            pytest.exit(str(fatal["message"]), returncode=int(fatal["returncode"]))
        if report.when != "call":
            return
        value = getattr(report, PROPERTY, None)
        if isinstance(value, dict):
            self.results.append(dict(value, outcome=report.outcome))

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if not self.results:
            return
        settings = self.settings
        finished = finish_run(self.state, settings, self.results, started=self.started,
                              args=list(self.config.invocation_params.args), dataset_reports=self.dataset_reports)
        self.summary, self.saved_baseline, self.errors = finished.summary, finished.saved_baseline, finished.errors
        _report_gate(self.config, session, self.summary)
        # The session fails exactly when a fail bound or a fail regression rule is crossed, or one could not be
        # checked (unless --pe-allow-unchecked); an approved baseline that cannot be compared is a usage error.
        if finished.usage_error:
            session.exitstatus = pytest.ExitCode.USAGE_ERROR
        elif not self.summary["verdict"]["passed"] and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        settings = self.settings
        if self.interrupted and self.has_cases:
            terminalreporter.section("persona-eval")
            if settings.use_cache:
                terminalreporter.write_line(
                    f"persona-eval: interrupted. Every answer received is in the cache ({settings.cache_dir}); "
                    "rerun the same command to continue: only what is missing is sent.", yellow=True)
            else:
                terminalreporter.write_line("persona-eval: interrupted. With --pe-no-cache nothing is kept for a "
                                            "rerun; run with the cache to resume where a run stopped.", yellow=True)
        if self.summary is None:
            return
        terminalreporter.section("persona-eval")
        for line in render_terminal_summary(self.summary):
            terminalreporter.write_line(line)
        notes = render_run_notes(
            self.summary, errors=self.errors, run_dir=self.state.run_dir,
            dataset_notes=[note for report in self.dataset_reports.values() if (note := report.message())],
            kept_controls=sorted({r["persona"] for r in self.results if r.get("kept_control")}),
            saved_baseline=self.saved_baseline)
        for line, colour in notes:
            terminalreporter.write_line(line, **({colour: True} if colour else {}))

    @pytest.hookimpl(optionalhook=True)
    def pytest_html_results_summary(self, prefix: list[str], summary: list[str], postfix: list[str],
                                    session: pytest.Session) -> None:
        """pytest-html's report (--html) gets the same verdict (escaped HTML snippets)."""
        if self.summary is not None:
            prefix.extend(html_report.pytest_html_summary_lines(self.summary))


def _report_gate(config: pytest.Config, session: pytest.Session, summary: dict[str, Any]) -> None:
    """The verdict as a test case of its own (GATE_NODEID), so that JUnit XML, pytest-html and a CI test
    widget show a red gate on a red job: failed when a fail entry was crossed or not checked, skipped when
    --pe-allow-unchecked let unchecked entries through, passed otherwise. Sent through the same hook as
    every other report, on the controller, before the reporters that write files finish."""
    from _pytest.reports import TestReport

    verdict = summary["verdict"]
    text = "\n".join(render_verdict(verdict, summary.get("checks", [])))
    location = ("persona-eval", None, "deployment-gate")
    outcome: Any
    longrepr: Any
    if verdict["status"] == "passed":
        outcome, longrepr = "passed", None
    elif verdict["passed"]:
        outcome, longrepr = "skipped", ("persona-eval", 0, f"Skipped: {text}")
    else:
        outcome, longrepr = "failed", text
    keywords: Any = {"persona-eval": 1}
    session.testscollected += 1  # the terminal's progress counts the gate as one case more
    terminal = config.pluginmanager.get_plugin("terminalreporter")
    if terminal is not None and terminal.verbosity <= 0:
        # Its own line, after the cases' progress line (the terminal writes the outcome letter after it).
        terminal.write("\n")
        terminal.currentfspath = None
        terminal.write(f"{GATE_NODEID} ")
    hook = config.hook
    # setup, call and teardown, as for any case: pytest-html writes a case when its teardown arrives.
    phases: list[tuple[Any, Any, Any]] = [("setup", "passed", None), ("call", outcome, longrepr),
                                          ("teardown", "passed", None)]
    for when, result, detail in phases:
        hook.pytest_runtest_logreport(report=TestReport(GATE_NODEID, location, keywords, result, detail, when))
