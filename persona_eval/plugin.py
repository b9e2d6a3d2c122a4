"""The persona-eval pytest plugin: options, parametrization, fixtures, and the reporter.

Each (task, model, persona) is one pytest case. Its fixture evaluates the condition
(persona_eval.session: inference through the cached runner, the case's part of cases.jsonl, its metrics
and the thresholds' bounds), puts the results on the case's test report (an attribute of plain JSON
types, which pytest-xdist carries to the controller; nothing goes into JUnit properties), and the case
asserts the ``fail`` bounds. The controls (no_persona, helpful_assistant) stay in the run whatever ``-k``
selects, since every comparison is made against them. The reporter, registered on the controller only,
finishes the run (persona_eval.session.finish_run: cases.jsonl, the paired comparisons, the regression
rules and the approved baseline, summary.json, summary.md, report.html), reports the verdict as a test
case of its own (``persona-eval::deployment-gate``, in JUnit XML and pytest-html too) and prints the
verdict and the tables. A crossed ``fail`` bound or rule, or one that could not be checked, fails the
session (exit status 1) although every persona case passed. The options and their checks are in
persona_eval.settings.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest

from persona_eval.backends import ModelSpec
from persona_eval.comparisons import CONTROLS
from persona_eval.data import DatasetReport, load_safety_queries, load_triage_cases
from persona_eval.errors import ConfigError, DataError, PersonaEvalError
from persona_eval.redaction import mask
from persona_eval.report import html as html_report
from persona_eval.report.terminal import render_run_notes, render_terminal_summary, render_verdict
from persona_eval.results import new_run_id
from persona_eval.runner import Runner
from persona_eval.session import (
    Condition,
    ConditionResult,
    WorkerState,
    evaluate_safety_condition,
    evaluate_triage_condition,
    finish_run,
    judge_triage_condition,
    runner_for,
)
from persona_eval.settings import (
    OPTIONS,
    TASKS,
    Settings,
    check_approved_dataset,
    check_datasets,
    limit_cases,
    limit_queries,
    parse_settings,
)
from persona_eval.tasks import triage
from persona_eval.tasks.safety import SafetyQuery

PROPERTY = "persona_eval"  # the test report attribute that carries a case's results to the controller
GATE_NODEID = "persona-eval::deployment-gate"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("persona-eval", "persona-eval: persona x model x task evaluations")
    for flag, options in OPTIONS:
        group.addoption(flag, **options)


settings_key = pytest.StashKey[Settings]()
state_key = pytest.StashKey[WorkerState]()
dataset_reports_key = pytest.StashKey[dict[str, DatasetReport]]()
datasets_key = pytest.StashKey[dict[str, list[Any]]]()


def pytest_configure(config: pytest.Config) -> None:
    workerinput = getattr(config, "workerinput", None)
    try:
        settings = parse_settings(config.option, Path(config.rootpath), controller=workerinput is None)
        if workerinput is None:
            given = {entry.partition("=")[0] for entry in config.option.pe_dataset}
            loaded, dataset_reports = check_datasets(settings, given)
            check_approved_dataset(settings, loaded.get("triage"))
            config.stash[dataset_reports_key] = dataset_reports
            # Without workers the fixtures use these; a worker loads its own copy.
            config.stash[datasets_key] = loaded
    except PersonaEvalError as exc:
        raise pytest.UsageError(f"persona-eval: {exc}") from None
    if workerinput is None and getattr(config.option, "numprocesses", None) and config.option.dist == "load":
        # One model's cases on one worker: no model loads twice (see pytest_xdist_make_scheduler). xdist
        # reads the mode when its session starts, after this, so it holds whichever cmdline hook ran first.
        config.option.dist = "loadgroup"
    config.stash[settings_key] = settings
    run_id = workerinput["pe_run_id"] if workerinput and "pe_run_id" in workerinput else new_run_id()
    config.stash[state_key] = WorkerState(run_id=run_id, run_dir=settings.reports_dir / run_id)
    if workerinput is None:
        # The reporter lives on the controller only (with or without pytest-xdist).
        config.pluginmanager.register(Reporter(config), "persona_eval_reporter")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist: every worker writes into the controller's run."""
    node.workerinput["pe_run_id"] = node.config.stash[state_key].run_id


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """pytest-xdist's scheduler for ``--dist loadgroup`` (the mode set above for ``-n``), grouping the
    cases of one model on one worker.

    xdist's own loadgroup scheduler groups by an "@group" suffix that its workers add to each node id of
    a case marked ``xdist_group``; with pytest 9 that suffix is never added (node ids are no longer the
    attribute xdist writes), so each case became a group of its own and every worker loaded every model.
    This one finds a case's model from the case's id instead, which the controller knows without
    collecting, and keeps xdist's behaviour for every other test."""
    if config.getvalue("dist") != "loadgroup" or settings_key not in config.stash:
        return None
    from xdist.scheduler import LoadGroupScheduling

    settings = config.stash[settings_key]
    model_of = {Condition(task, model, persona).id: model.name
                for task in TASKS for model in settings.models for persona in settings.registry}

    class ModelGroupScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            param = nodeid.rpartition("[")[2]
            model = model_of.get(param[:-1]) if param.endswith("]") else None
            return f"persona-eval model {model}" if model is not None else str(super()._split_scope(nodeid))

    return ModelGroupScheduling(config, log)


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(state_key, None)
    if state is not None:
        state.close()


# -- collection -------------------------------------------------------------------------------------
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    for task in TASKS:
        name = f"pe_{task}_condition"
        if name not in metafunc.fixturenames:
            continue
        settings = metafunc.config.stash[settings_key]
        params = []
        for model in settings.models:
            for persona in settings.personas:
                condition = Condition(task, model, persona)
                # Under -n, one model's cases stay on one worker (pytest_xdist_make_scheduler groups them
                # by this id): no model loads twice.
                params.append(pytest.param(condition, id=condition.id))
        metafunc.parametrize(name, params)


kept_key = pytest.StashKey[list[pytest.Item]]()
order_key = pytest.StashKey[list[pytest.Item]]()


def _condition_of(item: pytest.Item) -> Condition | None:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    return next((value for value in callspec.params.values() if isinstance(value, Condition)), None)


@pytest.hookimpl(tryfirst=True)
def pytest_deselected(items: list[pytest.Item]) -> None:
    """Keep the controls of every (task, model) that still has a persona selected: the gate compares each
    persona with them, so a -k that leaves them out would leave every regression rule unchecked. A -k
    expression that names a control (``-k "triage and not no_persona"``) is obeyed.

    `items` is the list of deselected items that the other implementations of this hook (the terminal's
    count) see next, so the kept controls are taken out of it here, and put back into the run by
    pytest_collection_modifyitems below."""
    if not items:
        return
    session = items[0].session
    config = session.config
    if settings_key not in config.stash:
        return
    deselected = set(items)
    selected = {(c.task, c.model.name) for item in session.items if item not in deselected
                and (c := _condition_of(item)) is not None and c.persona.id not in CONTROLS}
    # A control that the -k expression names ("not no_persona") was left out on purpose: it stays out, and
    # the rules against it are reported as not checked.
    named = set(re.findall(r"[A-Za-z0-9_]+", config.option.keyword or ""))
    keep = [item for item in items if (c := _condition_of(item)) is not None and c.persona.id in CONTROLS
            and c.persona.id not in named and (c.task, c.model.name) in selected]
    if keep:
        config.stash.setdefault(order_key, list(session.items))
        config.stash.setdefault(kept_key, []).extend(keep)
        kept = set(keep)
        items[:] = [item for item in items if item not in kept]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept = config.stash.get(kept_key, [])
    if not kept:
        return
    for item in kept:
        item.stash[kept_control_key] = True
    present = set(items) | set(kept)
    items[:] = [item for item in config.stash[order_key] if item in present]


kept_control_key = pytest.StashKey[bool]()
payload_key = pytest.StashKey[dict[str, Any]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A case's results ride on its test report as a plain attribute: pytest-xdist serializes the
    report's attributes to the controller, and JUnit XML never sees them."""
    report = yield
    if call.when == "call" and payload_key in item.stash:
        setattr(report, PROPERTY, item.stash[payload_key])
    if fatal_key in item.stash:
        setattr(report, FATAL, item.stash[fatal_key])
    _mask_report(report)
    return report


def _mask_report(report: pytest.TestReport) -> None:
    """No secret reaches the terminal, JUnit XML or pytest-html through a failure's text or the output a
    case captured: a report that holds one is rewritten with it masked (as plain text)."""
    if report.longrepr is not None:
        text = str(report.longrepr)
        masked = mask(text)
        if masked != text:
            report.longrepr = masked
    report.sections = [(title, mask(content)) for title, content in report.sections]


# -- stopping the run -------------------------------------------------------------------------------
fatal_key = pytest.StashKey[dict[str, Any]]()
FATAL = "persona_eval_fatal"  # the test report attribute that carries a worker's stop to the controller
RESUME = "Everything finished before this is in the cache; rerun to continue."


def _exit_status(error: PersonaEvalError) -> pytest.ExitCode:
    """A problem of the input (a dataset line, a case too long for the model, a setting) is a usage error;
    a model or server that fails is a failed run."""
    return pytest.ExitCode.USAGE_ERROR if isinstance(error, (DataError, ConfigError)) else pytest.ExitCode.TESTS_FAILED


def _stop_run(request: pytest.FixtureRequest, message: str, returncode: pytest.ExitCode) -> NoReturn:
    """Stop the whole run with one message and exit status, the same with or without pytest-xdist.

    Without workers this is pytest.exit. In a worker, pytest.exit would end in xdist's INTERNALERROR and
    the message would be lost; instead the case fails, its report carries the message to the controller
    (pytest_runtest_makereport), the worker stops taking cases, and the controller's reporter calls
    pytest.exit with the same message and status when that report arrives."""
    message = mask(message)
    if getattr(request.config, "workerinput", None) is None:
        pytest.exit(message, returncode=returncode)
    request.node.stash[fatal_key] = {"message": message, "returncode": int(returncode)}
    request.session.shouldstop = message
    raise pytest.fail.Exception(message, pytrace=False) from None


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def pe_settings(request: pytest.FixtureRequest) -> Settings:
    """The persona-eval options of this session."""
    return request.config.stash[settings_key]


def _run(request: pytest.FixtureRequest, condition: Condition, step: Callable[[], Any], what: str = "") -> Any:
    """step(), or the run stops with its error's message (naming the condition) and exit status."""
    try:
        return step()
    except PersonaEvalError as exc:
        _stop_run(request, f"persona-eval: {condition.id}: {what}{exc}\n{RESUME}", _exit_status(exc))


@pytest.fixture(scope="session")
def pe_triage_cases(request: pytest.FixtureRequest, pe_settings: Settings) -> list[triage.TriageCase]:
    """The triage dataset (first --pe-limit cases of each stratum)."""
    try:
        cases = request.config.stash.get(datasets_key, {}).get("triage") or load_triage_cases(
            pe_settings.datasets["triage"])
    except PersonaEvalError as exc:
        _stop_run(request, f"persona-eval: {exc}", pytest.ExitCode.USAGE_ERROR)
    return limit_cases(cases, pe_settings.limit)


@pytest.fixture(scope="session")
def pe_safety_queries(request: pytest.FixtureRequest, pe_settings: Settings) -> list[SafetyQuery]:
    """The patient-safety queries (first --pe-limit queries of each category)."""
    try:
        queries = request.config.stash.get(datasets_key, {}).get("safety") or load_safety_queries(
            pe_settings.datasets["safety"])
    except PersonaEvalError as exc:
        _stop_run(request, f"persona-eval: {exc}", pytest.ExitCode.USAGE_ERROR)
    return limit_queries(queries, pe_settings.limit)


def _write_progress(config: pytest.Config) -> Callable[[str], None] | None:
    """Where progress lines go (past pytest's capture), or None with --pe-quiet."""
    if config.stash[settings_key].quiet:
        return None
    capture = config.pluginmanager.getplugin("capturemanager")

    def write(text: str) -> None:
        if capture is not None:
            with capture.global_and_fixture_disabled():
                sys.stderr.write(text)
                sys.stderr.flush()
        else:
            sys.stderr.write(text)
    return write


@pytest.fixture(scope="session")
def pe_runner_for(request: pytest.FixtureRequest, pe_settings: Settings) -> Callable[[ModelSpec], Runner]:
    """runner(model): the runner of a model, created on first use (see persona_eval.session.runner_for)."""
    state = request.config.stash[state_key]
    notice = _write_progress(request.config)

    def runner(model: ModelSpec) -> Runner:
        try:
            return runner_for(state, pe_settings, model, notice=notice)
        except PersonaEvalError as exc:
            _stop_run(request, f"persona-eval: model {model.name!r}: {exc}", pytest.ExitCode.USAGE_ERROR)
    return runner


def _attach(request: pytest.FixtureRequest, result: ConditionResult) -> ConditionResult:
    """pytest_runtest_makereport puts the condition's payload on the case's test report."""
    result.payload["kept_control"] = bool(request.node.stash.get(kept_control_key, False))
    request.node.stash[payload_key] = result.payload
    return result


@pytest.fixture
def triage_result(request: pytest.FixtureRequest, pe_triage_condition: Condition, pe_settings: Settings,
                  pe_triage_cases: list[triage.TriageCase], pe_runner_for: Callable[[ModelSpec], Runner]
                  ) -> ConditionResult:
    """Run the triage cases under one (model, persona), write its records, record its metrics."""
    condition, state, write = pe_triage_condition, request.config.stash[state_key], _write_progress(request.config)
    runner = pe_runner_for(condition.model)

    def judge() -> None:
        _run(request, condition, lambda: judge_triage_condition(
            state, pe_settings, condition, pe_triage_cases, pe_runner_for, write=write), "judging: ")
    return _attach(request, _run(request, condition, lambda: evaluate_triage_condition(
        state, pe_settings, condition, pe_triage_cases, runner, write=write,
        then=judge if pe_settings.judge_triage else None)))


@pytest.fixture
def safety_result(request: pytest.FixtureRequest, pe_safety_condition: Condition, pe_settings: Settings,
                  pe_safety_queries: list[SafetyQuery], pe_runner_for: Callable[[ModelSpec], Runner]
                  ) -> ConditionResult:
    """Answer the safety queries under every persona of one model (cached after the first case), have the
    judge panel rank them, and check this persona's MRR against the thresholds."""
    condition, state = pe_safety_condition, request.config.stash[state_key]
    return _attach(request, _run(request, condition, lambda: evaluate_safety_condition(
        state, pe_settings, condition, pe_safety_queries, pe_runner_for, write=_write_progress(request.config))))


# -- the reporter (controller only) --------------------------------------------------------------------
class Reporter:
    """Collects the cases' results from their test reports and writes the run's summary."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.results: list[dict[str, Any]] = []
        self.summary: dict[str, Any] | None = None
        self.saved_baseline: Path | None = None
        self.errors: list[str] = []
        self.started = time.time()
        self.interrupted = False
        self.dataset_reports = config.stash.get(dataset_reports_key, {})

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
        settings = self.config.stash[settings_key]
        finished = finish_run(self.config.stash[state_key], settings, self.results, started=self.started,
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
        settings = self.config.stash[settings_key]
        if self.interrupted:
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
            self.summary, errors=self.errors, run_dir=self.config.stash[state_key].run_dir,
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
