"""The persona-eval pytest plugin: options, parametrization over the registered tasks, the fixtures.

Each (task, model, persona) is one pytest case: a test that asks for ``<task>_result`` (the generic
``pe_result``, for that task) runs once per condition. The fixture evaluates the condition through the
task (persona_eval.session: inference through the cached runner, the case's part of cases.jsonl, its
metrics and the thresholds' bounds), puts the results on the case's test report (an attribute of plain
JSON types, which pytest-xdist carries to the controller; nothing goes into JUnit properties), and the
case asserts the ``fail`` bounds. ``--pe-task`` imports a task of your own before the options are
checked. Which cases run where (the controls kept whatever ``-k`` selects, one model per xdist worker) is
persona_eval.scheduling; the controller's reporter, which finishes the run, reports the gate as a test
case of its own and sets the exit status, is persona_eval.reporter; the options are persona_eval.settings.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pytest

from persona_eval.backends import ModelSpec
from persona_eval.errors import ConfigError, DataError, PersonaEvalError
from persona_eval.redaction import mask
from persona_eval.reporter import FATAL, PROPERTY, Reporter
from persona_eval.results import new_run_id
from persona_eval.runner import Runner
from persona_eval.scheduling import (  # noqa: F401 (hooks: pytest finds them in this module)
    kept_control_key,
    pytest_collection_finish,
    pytest_collection_modifyitems,
    pytest_configure_node,
    pytest_deselected,
    pytest_xdist_make_scheduler,
    settings_key,
    state_key,
)
from persona_eval.session import Condition, ConditionResult, TaskRun, WorkerState, runner_for
from persona_eval.settings import OPTIONS, Settings, check_approved_dataset, check_datasets, parse_settings
from persona_eval.tasks import registered, task_named


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("persona-eval", "persona-eval: persona x model x task evaluations")
    for flag, options in OPTIONS:
        group.addoption(flag, **options)


datasets_key = pytest.StashKey[dict[str, list[Any]]]()


def _import_tasks(config: pytest.Config) -> None:
    """--pe-task: import each task module before the options are checked. A file is imported as pytest
    imports a test module, so a test file that holds its task (and its test) is imported once."""
    from _pytest.pathlib import import_path

    for entry in config.option.pe_task:
        path = Path(entry)
        try:
            if entry.endswith(".py") or path.exists():
                if not path.is_file():
                    raise ConfigError(f"--pe-task {entry}: no such file")
                import_path(path.resolve(), mode=config.option.importmode, root=Path(config.rootpath),
                            consider_namespace_packages=bool(config.getini("consider_namespace_packages")))
            else:
                importlib.import_module(entry)
        except PersonaEvalError:
            raise
        except Exception as exc:
            raise ConfigError(f"--pe-task {entry}: cannot import it ({type(exc).__name__}: {exc})") from None


def _register_task_fixtures(config: pytest.Config) -> None:
    """The fixture ``<task>_result`` of every registered task: pe_result, parametrized over that task's
    conditions (pytest_generate_tests)."""
    def alias(name: str) -> Any:
        @pytest.fixture(name=f"{name}_result")
        def result(pe_result: ConditionResult) -> ConditionResult:
            return pe_result
        result.__doc__ = f"The results of one {name} condition (model x persona); see pe_result."
        return result
    fixtures = {f"{name}_result": alias(name) for name in registered()}
    # A class, not an instance: pytest reads a plugin's fixtures from its type's namespace.
    config.pluginmanager.register(type("PersonaEvalTaskFixtures", (), fixtures), "persona_eval_task_fixtures")


def pytest_configure(config: pytest.Config) -> None:
    workerinput = getattr(config, "workerinput", None)
    try:
        _import_tasks(config)
        settings = parse_settings(config.option, Path(config.rootpath), controller=workerinput is None)
        if workerinput is None:
            given = {entry.partition("=")[0] for entry in config.option.pe_dataset}
            loaded, dataset_reports = check_datasets(settings, given)
            check_approved_dataset(settings, loaded)
            # Without workers the fixtures use these; a worker loads its own copy.
            config.stash[datasets_key] = loaded
    except PersonaEvalError as exc:
        raise pytest.UsageError(f"persona-eval: {exc}") from None
    _register_task_fixtures(config)
    if workerinput is None and getattr(config.option, "numprocesses", None) and config.option.dist == "load":
        # One model's cases on one worker: no model loads twice (see pytest_xdist_make_scheduler). xdist
        # reads the mode when its session starts, after this, so it holds whichever cmdline hook ran first.
        config.option.dist = "loadgroup"
    config.stash[settings_key] = settings
    run_id = workerinput["pe_run_id"] if workerinput and "pe_run_id" in workerinput else new_run_id()
    config.stash[state_key] = WorkerState(run_id=run_id, run_dir=settings.reports_dir / run_id)
    if workerinput is None:
        # The reporter lives on the controller only (with or without pytest-xdist).
        config.pluginmanager.register(Reporter(config, settings, config.stash[state_key], dataset_reports),
                                      "persona_eval_reporter")


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(state_key, None)
    if state is not None:
        state.close()


# -- collection -------------------------------------------------------------------------------------
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that asks for ``<task>_result`` runs once per (model, persona) of that task."""
    if "pe_result" not in metafunc.fixturenames:
        return
    tasks = [name for name in registered() if f"{name}_result" in metafunc.fixturenames]
    if len(tasks) != 1:
        raise pytest.UsageError(f"persona-eval: {metafunc.definition.nodeid}: ask for the results of one task "
                                f"(one of {', '.join(f'{name}_result' for name in registered())}), got "
                                f"{', '.join(tasks) or 'pe_result alone'}")
    settings = metafunc.config.stash[settings_key]
    params = []
    for model in settings.models:
        for persona in settings.personas_of(tasks[0]):
            condition = Condition(tasks[0], model, persona)
            # Under -n, one model's cases stay on one worker (pytest_xdist_make_scheduler groups them by
            # this id): no model loads twice.
            params.append(pytest.param(condition, id=condition.id))
    metafunc.parametrize("pe_condition", params)


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


items_key = pytest.StashKey[dict[str, list[Any]]]()


def _items(request: pytest.FixtureRequest, task: str) -> list[Any]:
    """A task's dataset (first --pe-limit items of each stratum), loaded once per process."""
    items = request.config.stash.setdefault(items_key, {})
    if task not in items:
        settings = request.config.stash[settings_key]
        try:
            if task not in settings.datasets:
                raise ConfigError(f"task {task!r} has no default dataset; give one with --pe-dataset {task}=PATH")
            loaded = request.config.stash.get(datasets_key, {}).get(task)
            items[task] = task_named(task).limit(
                loaded if loaded is not None else settings.load_dataset(task), settings.limit)
        except PersonaEvalError as exc:
            _stop_run(request, f"persona-eval: {exc}", pytest.ExitCode.USAGE_ERROR)
    return items[task]


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
def pe_result(request: pytest.FixtureRequest, pe_condition: Condition, pe_settings: Settings,
              pe_runner_for: Callable[[ModelSpec], Runner]) -> ConditionResult:
    """Run one condition (task, model, persona): its records, its metrics and its checks against the
    thresholds' bounds (see the task's ``evaluate``). Asked for as ``<task>_result``."""
    condition = pe_condition
    run = TaskRun(request.config.stash[state_key], pe_settings, pe_runner_for, _write_progress(request.config))
    items = _items(request, condition.task)
    result: ConditionResult = _run(request, condition, lambda: task_named(condition.task).evaluate(
        run, condition, items))
    return _attach(request, result)
