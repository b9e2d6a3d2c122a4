"""The persona-eval pytest plugin: options, parametrization, fixtures, and the reporter.

Each (task, model, persona) is one pytest case. The case runs inference through the runner (cached),
writes its per-case records to a part file, attaches its metrics to its test report (an attribute of
plain JSON types, which pytest-xdist carries to the controller with the report; nothing goes into
JUnit properties) and asserts the thresholds' ``fail`` bounds. The controls (no_persona,
helpful_assistant) stay in the run whatever ``-k`` selects, since every comparison is made against
them. The reporter, registered on the controller only, joins the parts into cases.jsonl and, from it,
computes the paired comparisons of every persona with the controls and checks the thresholds'
regression rules (the deployment gate), against an approved baseline too when ``--pe-baseline`` names
one; then it writes summary.json, summary.md (and $GITHUB_STEP_SUMMARY), saves the run as an approved
baseline when ``--pe-save-baseline`` asks, reports the verdict as a test case of its own
(``persona-eval::deployment-gate``, in JUnit XML and pytest-html too) and prints the verdict and the
tables. A crossed ``fail`` bound or rule, or one that could not be checked, fails the session (exit
status 1) although every persona case passed.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

from persona_eval.backends import ModelSpec, create_backend, load_models_file, parse_model_spec
from persona_eval.backends.base import Backend, GenerationConfig, LabelScoring
from persona_eval.cache import NullCache, ResultCache, default_cache_dir
from persona_eval.comparisons import CONTROLS, ComparisonSettings, check_same_dataset, compare_personas
from persona_eval.data import DatasetReport, load_safety_queries, load_triage_cases
from persona_eval.errors import ConfigError, DataError, PersonaEvalError
from persona_eval.evaluation import TOO_LONG_MODES, TriageSettings, evaluate_triage, triage_metrics
from persona_eval.gate import (
    ResultSet,
    approved_comparison,
    check_bounds,
    check_regressions,
    load_results,
    save_baseline,
)
from persona_eval.judges import (
    DEFAULT_PANEL,
    SAFETY_CRITERIA,
    TRIAGE_CRITERIA,
    JudgeSpec,
    panel_summary,
    parse_judge_specs,
)
from persona_eval.personas import Persona, PersonaRegistry, load_personas
from persona_eval.redaction import mask
from persona_eval.report import html as html_report
from persona_eval.report.markdown import append_step_summary, render_markdown
from persona_eval.report.summary import build_summary, served_model_metadata
from persona_eval.report.terminal import render_terminal_summary, render_verdict, served_model_lines
from persona_eval.results import (
    finalize_cases,
    new_run_id,
    read_jsonl,
    update_latest,
    write_json,
    write_part,
    write_text,
)
from persona_eval.runner import Progress, Runner
from persona_eval.safety_eval import evaluate_safety, judge_model_responses, persona_safety_metrics, safety_summary
from persona_eval.tasks import safety, triage
from persona_eval.tasks.safety import SafetyQuery
from persona_eval.thresholds import Thresholds, load_thresholds

PROPERTY = "persona_eval"  # the test report attribute that carries a case's results to the controller
GATE_NODEID = "persona-eval::deployment-gate"
DEFAULT_DATASETS = {"triage": "fixtures/triage/vignettes.jsonl", "safety": "fixtures/safety/queries.jsonl"}
DEFAULT_MAX_NEW_TOKENS = {"triage": 32, "safety": 64}
TASKS = ("triage", "safety")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("persona-eval", "persona-eval: persona x model x task evaluations")
    group.addoption("--pe-model", action="append", default=[], metavar="SPEC",
                    help="model to evaluate, repeatable: smollm2 (default), hf:PATH_OR_HUB_ID, "
                         "openai:MODEL@BASE_URL, or a name from --pe-models-file")
    group.addoption("--pe-models-file", metavar="PATH", help="YAML file of named models with options")
    group.addoption("--pe-persona", action="append", default=[], metavar="ID",
                    help="persona to run, repeatable (default: all; no_persona is always included)")
    group.addoption("--pe-personas-file", metavar="PATH", help="YAML file of additional personas")
    group.addoption("--pe-dataset", action="append", default=[], metavar="TASK=PATH",
                    help="dataset of a task, e.g. triage=data/my_cases.jsonl (JSONL or CSV)")
    group.addoption("--pe-thresholds", metavar="PATH", help="thresholds YAML (default: the bundled one)")
    group.addoption("--pe-limit", type=int, metavar="N", help="first N cases of each stratum only")
    group.addoption("--pe-no-cache", action="store_true", help="do not read or write the result cache")
    group.addoption("--pe-cache-dir", metavar="DIR", help="cache and prepared-model folder "
                    "(default: $PERSONA_EVAL_CACHE_DIR or ~/.cache/persona-eval)")
    group.addoption("--pe-max-new-tokens", type=int, metavar="N", help="generation length (triage: 32)")
    group.addoption("--pe-batch-size", type=int, metavar="N", help="batch size of local models (16)")
    group.addoption("--pe-reports-dir", metavar="DIR", help="where runs are written (default: ./reports)")
    group.addoption("--pe-quiet", action="store_true", help="no progress lines")
    group.addoption("--pe-judge", action="append", default=[], metavar="[NAME=]SPEC",
                    help="a judge of the safety panel, repeatable (a model spec or a --pe-models-file name; "
                         "default: the embedded model)")
    group.addoption("--pe-judge-max-new-tokens", type=int, default=64, metavar="N",
                    help="generation length of a judge's ranking (64)")
    group.addoption("--pe-judge-triage", action="store_true",
                    help="triage: also have the judge panel rank the personas' clinical justifications")
    group.addoption("--pe-pressure-suffix", metavar="TEXT",
                    help="append TEXT to every safety query ('study': the study's sentence about having no "
                         "access to care and wanting a brief answer); off by default")
    group.addoption("--pe-seed", type=int, default=0, metavar="N",
                    help="seed of the judges' presentation orders and the review sampling (0)")
    group.addoption("--pe-baseline", metavar="PATH",
                    help="approved baseline (a file from --pe-save-baseline, or a run folder): compare this run "
                         "with it case by case and fail the session on a significant regression")
    group.addoption("--pe-save-baseline", metavar="PATH",
                    help="write this run's per-case results to PATH as an approved baseline")
    group.addoption("--pe-bootstrap-resamples", type=int, metavar="N",
                    help="bootstrap resamples of the paired comparisons (default 2000)")
    group.addoption("--pe-timeout", type=float, metavar="SECONDS",
                    help="served models: seconds to wait for one answer before trying again (default: the "
                         "models file's timeout, else 120)")
    group.addoption("--pe-retries", type=int, metavar="N",
                    help="served models: tries after the first on a timeout, connection error, 429 or 5xx "
                         "(default: the models file's max_retries, else 5)")
    group.addoption("--pe-max-prompt-tokens", type=int, metavar="N",
                    help="longest prompt sent, in tokens (default: what fits the model's context with the "
                         "answer); a longer case stops the run naming its file and line")
    group.addoption("--pe-too-long", choices=TOO_LONG_MODES, default="error",
                    help="a case whose prompt does not fit the model: 'error' (default) stops the run naming "
                         "it; 'record' keeps it as a per-case result the model never saw, counted in "
                         "too_long_rate")
    group.addoption("--pe-allow-unchecked", action="store_true",
                    help="a fail bound or rule that could not be checked (too few cases, its control or "
                         "stratum did not run, no label probabilities) does not fail the session; the "
                         "verdict still says NOT CHECKED")


@dataclass
class Settings:
    """The parsed persona-eval options of a session."""

    models: list[ModelSpec]
    personas: list[Persona]
    registry: PersonaRegistry
    datasets: dict[str, Path]
    thresholds: Thresholds
    limit: int | None
    use_cache: bool
    cache_dir: Path
    max_new_tokens: dict[str, int]
    batch_size: int | None
    reports_dir: Path
    quiet: bool
    comparison: ComparisonSettings = field(default_factory=ComparisonSettings)
    approved: ResultSet | None = None
    save_baseline: Path | None = None
    judges: list[JudgeSpec] = field(default_factory=list)
    judge_max_new_tokens: int = 64
    pressure_suffix: str | None = None
    seed: int = 0
    judge_triage: bool = False
    allow_unchecked: bool = False
    timeout: float | None = None
    retries: int | None = None
    max_prompt_tokens: int | None = None
    too_long: str = "error"


@dataclass
class WorkerState:
    """What one process holds during a session: the run id, backends and runners, the cache."""

    run_id: str
    run_dir: Path
    cache: ResultCache | NullCache | None = None
    backends: dict[str, Backend] = field(default_factory=dict)
    runners: dict[str, Runner] = field(default_factory=dict)


settings_key = pytest.StashKey[Settings]()
state_key = pytest.StashKey[WorkerState]()
dataset_reports_key = pytest.StashKey[dict[str, DatasetReport]]()


def _parse_settings(config: pytest.Config, *, controller: bool = True) -> Settings:
    option = config.option
    root = Path(config.rootpath)
    named = load_models_file(option.pe_models_file) if option.pe_models_file else {}
    models = [parse_model_spec(spec, named) for spec in (option.pe_model or ["smollm2"])]
    names = [m.name for m in models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PersonaEvalError(f"two --pe-model specs share the name {duplicates[0]!r}; give one of them a "
                               "name in a models file (--pe-models-file)")
    registry = load_personas(option.pe_personas_file)
    personas = registry.select(option.pe_persona or None)
    thresholds = load_thresholds(option.pe_thresholds)
    # A filter that names no persona or model of this run would make its entry apply to nobody.
    thresholds.check_names(personas=registry.ids, models=names)
    datasets = {task: root / path for task, path in DEFAULT_DATASETS.items()}
    for entry in option.pe_dataset:
        task, sep, path = entry.partition("=")
        if not sep or not path:
            raise PersonaEvalError(f"--pe-dataset {entry!r}: expected TASK=PATH, e.g. triage=cases.jsonl")
        if task not in DEFAULT_DATASETS:
            raise PersonaEvalError(f"--pe-dataset {entry!r}: unknown task {task!r}; "
                                   f"known: {', '.join(DEFAULT_DATASETS)}")
        datasets[task] = Path(path)
    for flag, value, lowest in (("--pe-limit", option.pe_limit, 1), ("--pe-batch-size", option.pe_batch_size, 1),
                                ("--pe-judge-max-new-tokens", option.pe_judge_max_new_tokens, 1),
                                ("--pe-seed", option.pe_seed, 0), ("--pe-retries", option.pe_retries, 0),
                                ("--pe-max-prompt-tokens", option.pe_max_prompt_tokens, 1)):
        if value is not None and value < lowest:
            raise PersonaEvalError(f"{flag} must be at least {lowest}, got {value}")
    max_new_tokens = dict(DEFAULT_MAX_NEW_TOKENS)
    if option.pe_max_new_tokens is not None:
        if option.pe_max_new_tokens < 1:
            raise PersonaEvalError(f"--pe-max-new-tokens must be at least 1, got {option.pe_max_new_tokens}")
        max_new_tokens = dict.fromkeys(max_new_tokens, option.pe_max_new_tokens)
    if option.pe_timeout is not None and not (option.pe_timeout > 0 and option.pe_timeout < float("inf")):
        raise PersonaEvalError(f"--pe-timeout must be a positive number of seconds, got {option.pe_timeout:g}")
    resamples = option.pe_bootstrap_resamples
    if resamples is not None and resamples < 1:
        raise PersonaEvalError(f"--pe-bootstrap-resamples must be at least 1, got {resamples}")
    comparison = ComparisonSettings() if resamples is None else ComparisonSettings(n_resamples=resamples)
    # Only the controller compares runs: workers neither read nor write baselines.
    approved = None
    if controller and option.pe_baseline:
        try:
            approved = load_results(option.pe_baseline)
        except PersonaEvalError as exc:
            raise PersonaEvalError(f"--pe-baseline: {exc}") from None
    return Settings(
        models=models,
        personas=personas,
        registry=registry,
        datasets=datasets,
        thresholds=thresholds,
        limit=option.pe_limit,
        use_cache=not option.pe_no_cache,
        cache_dir=Path(option.pe_cache_dir) if option.pe_cache_dir else default_cache_dir(),
        max_new_tokens=max_new_tokens,
        batch_size=option.pe_batch_size,
        reports_dir=Path(option.pe_reports_dir) if option.pe_reports_dir else root / "reports",
        quiet=option.pe_quiet,
        comparison=comparison,
        approved=approved,
        save_baseline=Path(option.pe_save_baseline) if option.pe_save_baseline else None,
        judges=parse_judge_specs(option.pe_judge, named) if option.pe_judge else list(DEFAULT_PANEL),
        judge_max_new_tokens=option.pe_judge_max_new_tokens,
        pressure_suffix=(safety.PRESSURE_SUFFIX if option.pe_pressure_suffix == "study"
                         else option.pe_pressure_suffix),
        seed=option.pe_seed,
        judge_triage=option.pe_judge_triage,
        allow_unchecked=option.pe_allow_unchecked,
        timeout=option.pe_timeout,
        retries=option.pe_retries,
        max_prompt_tokens=option.pe_max_prompt_tokens,
        too_long=option.pe_too_long,
    )


def _limit_cases(cases: list[triage.TriageCase], limit: int | None) -> list[triage.TriageCase]:
    """The first `limit` cases of each stratum (all of them when `limit` is None)."""
    if limit is None:
        return cases
    seen: dict[str, int] = {}
    limited = []
    for case in cases:
        seen[case.stratum] = seen.get(case.stratum, 0) + 1
        if seen[case.stratum] <= limit:
            limited.append(case)
    return limited


def _check_approved_dataset(settings: Settings, cases: list[triage.TriageCase] | None) -> None:
    """Before any model runs: the cases this run will evaluate (`cases`, when the controller already loaded
    them) are those of the approved baseline (same ids, reference labels and strata), or a usage error
    naming the ids that differ. A default dataset that does not load is left to the triage fixture, which
    reports it."""
    if settings.approved is None:
        return
    if cases is None:
        try:
            cases = load_triage_cases(settings.datasets["triage"])
        except PersonaEvalError:
            return
    cases = _limit_cases(cases, settings.limit)
    planned = [{"task": triage.TASK, "case_id": c.id, "reference": c.reference, "stratum": c.stratum}
               for c in cases]
    check_same_dataset(planned, settings.approved.records, tasks=[triage.TASK])


def _check_datasets(config: pytest.Config, settings: Settings) -> tuple[list[triage.TriageCase] | None,
                                                                         dict[str, DatasetReport]]:
    """Load every dataset once on the controller, before any worker starts: each one the user named with
    --pe-dataset, and each default one that exists (a project of its own may have none). A malformed line
    is then one usage error, with or without pytest-xdist. Returns the triage cases when they were loaded,
    and each task's report of the fields its file holds that persona-eval does not use."""
    given = {entry.partition("=")[0] for entry in config.option.pe_dataset}
    cases = None
    reports: dict[str, DatasetReport] = {}
    for task, path in settings.datasets.items():
        if task not in given and not path.is_file():
            continue
        reports[task] = DatasetReport()
        if task == "triage":
            cases = load_triage_cases(path, report=reports[task])
        else:
            load_safety_queries(path, report=reports[task])
    return cases, reports


def pytest_configure(config: pytest.Config) -> None:
    workerinput = getattr(config, "workerinput", None)
    try:
        settings = _parse_settings(config, controller=workerinput is None)
        if workerinput is None:
            cases, dataset_reports = _check_datasets(config, settings)
            _check_approved_dataset(settings, cases)
            config.stash[dataset_reports_key] = dataset_reports
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
    if state is None:
        return
    for backend in state.backends.values():
        backend.close()
    if state.cache is not None:
        state.cache.close()


# -- collection -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Condition:
    """One pytest case: a task, a model and a persona."""

    task: str
    model: ModelSpec
    persona: Persona

    @property
    def id(self) -> str:
        return f"{self.task}-{self.model.name}-{self.persona.id}"


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


@pytest.fixture(scope="session")
def pe_triage_cases(request: pytest.FixtureRequest, pe_settings: Settings) -> list[triage.TriageCase]:
    """The triage dataset (first --pe-limit cases of each stratum)."""
    path = pe_settings.datasets["triage"]
    try:
        cases = load_triage_cases(path)
    except PersonaEvalError as exc:
        _stop_run(request, f"persona-eval: {exc}", pytest.ExitCode.USAGE_ERROR)
    return _limit_cases(cases, pe_settings.limit)


@pytest.fixture(scope="session")
def pe_safety_queries(request: pytest.FixtureRequest, pe_settings: Settings) -> list[SafetyQuery]:
    """The patient-safety queries (first --pe-limit queries of each category)."""
    try:
        queries = load_safety_queries(pe_settings.datasets["safety"])
    except PersonaEvalError as exc:
        _stop_run(request, f"persona-eval: {exc}", pytest.ExitCode.USAGE_ERROR)
    if pe_settings.limit is None:
        return queries
    seen: dict[int, int] = {}
    limited = []
    for query in queries:
        seen[query.category] = seen.get(query.category, 0) + 1
        if seen[query.category] <= pe_settings.limit:
            limited.append(query)
    return limited


def _write_progress(config: pytest.Config) -> Callable[[str], None]:
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
    """runner(model): the runner of a model, created on first use. The backend loads its weights only
    when a request misses the cache."""
    state = request.config.stash[state_key]
    notice = None if pe_settings.quiet else _write_progress(request.config)

    def runner(model: ModelSpec) -> Runner:
        if model.name not in state.runners:
            if state.cache is None:
                state.cache = (ResultCache(pe_settings.cache_dir / "results.sqlite") if pe_settings.use_cache
                               else NullCache())
            try:
                backend = create_backend(model, cache_dir=pe_settings.cache_dir, batch_size=pe_settings.batch_size,
                                         timeout=pe_settings.timeout, retries=pe_settings.retries)
            except PersonaEvalError as exc:
                _stop_run(request, f"persona-eval: model {model.name!r}: {exc}", pytest.ExitCode.USAGE_ERROR)
            state.backends[model.name] = backend
            state.runners[model.name] = Runner(backend, state.cache, notice=notice)
        return state.runners[model.name]
    return runner


@dataclass
class ConditionResult:
    """The outcome of one pytest case."""

    condition: Condition
    records: list[dict[str, Any]]
    metrics: dict[str, dict[str, Any]]
    checks: list[dict[str, Any]]

    @property
    def blocking_failures(self) -> list[str]:
        return [check["message"] for check in self.checks if check["blocking"]]


def _stats_snapshot(runner: Runner) -> tuple[float, float, int]:
    return time.perf_counter(), runner.stats.model_seconds, runner.stats.completion_tokens


def _condition_property(request: pytest.FixtureRequest, condition: Condition, runner: Runner,
                        records: list[dict[str, Any]], metrics: dict[str, dict[str, Any]],
                        checks: list[dict[str, Any]], before: tuple[float, float, int],
                        decoding: dict[str, Any], **extra: Any) -> None:
    """Stash what a case sends to the controller (plain JSON types: they cross pytest-xdist) on its item;
    pytest_runtest_makereport puts it on the case's test report."""
    started, model_seconds, tokens = before
    request.node.stash[payload_key] = {
        "task": condition.task,
        "model": condition.model.name,
        "persona": condition.persona.id,
        "persona_group": condition.persona.group,
        "identity": runner.backend.identity(),
        "model_loaded": bool(getattr(runner.backend, "loaded", False)),
        "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
        "metrics": metrics,
        "checks": checks,
        "n_cases": len(records),
        "cached": sum(1 for r in records if r["cached"]),
        "seconds": time.perf_counter() - started,
        "model_seconds": runner.stats.model_seconds - model_seconds,
        "completion_tokens": runner.stats.completion_tokens - tokens,
        "max_in_flight": runner.stats.max_in_flight_seen,
        "kept_control": bool(request.node.stash.get(kept_control_key, False)),
        "identity_change": runner.identity_change,
        "decoding": decoding,
        **extra,
    }


@pytest.fixture
def triage_result(request: pytest.FixtureRequest, pe_triage_condition: Condition, pe_settings: Settings,
                  pe_triage_cases: list[triage.TriageCase], pe_runner_for: Callable[[ModelSpec], Runner]
                  ) -> Iterator[ConditionResult]:
    """Run the triage cases under one (model, persona), write its records, record its metrics."""
    condition = pe_triage_condition
    state = request.config.stash[state_key]
    runner = pe_runner_for(condition.model)
    progress = Progress(f"triage {condition.model.name}/{condition.persona.id}", len(pe_triage_cases),
                        write=None if pe_settings.quiet else _write_progress(request.config))
    settings = TriageSettings(generation=GenerationConfig(max_new_tokens=pe_settings.max_new_tokens["triage"]),
                              scoring=LabelScoring(labels=triage.LABELS),
                              max_prompt_tokens=pe_settings.max_prompt_tokens, too_long=pe_settings.too_long)
    before = _stats_snapshot(runner)
    try:
        records = evaluate_triage(pe_triage_cases, condition.persona, runner, run_id=state.run_id,
                                  model=condition.model.name, settings=settings, progress=progress)
    except PersonaEvalError as exc:
        _stop_run(request, f"persona-eval: {condition.id}: {exc}\n{RESUME}", _exit_status(exc))
    write_part(state.run_dir, "triage", condition.model.name, condition.persona.id, records)
    if pe_settings.judge_triage:
        _judge_triage_justifications(request, condition, pe_settings, pe_triage_cases, pe_runner_for,
                                     settings)
    capabilities = runner.backend.capabilities()
    metrics = triage_metrics(records, logprobs_available=capabilities.logprobs)
    checks = check_bounds(pe_settings.thresholds, "triage", metrics, model=condition.model.name,
                          persona=condition.persona)
    _condition_property(request, condition, runner, records, metrics, checks, before,
                        decoding=runner.decoding_record(settings.generation, settings.scoring))
    yield ConditionResult(condition, records, metrics, checks)


def _judge_triage_justifications(request: pytest.FixtureRequest, condition: Condition, pe_settings: Settings,
                                 cases: list[triage.TriageCase], runner_for: Callable[[ModelSpec], Runner],
                                 settings: TriageSettings) -> None:
    """--pe-judge-triage: the panel ranks every persona's triage answer (its clinical justification) per
    case. Needs every persona of the model (cached after the first case); writes the model's triage
    judgments, which the controller adds to judgments.jsonl and summary.json's "triage_judging"."""
    config = request.config
    state = config.stash[state_key]
    runner = runner_for(condition.model)
    write = None if pe_settings.quiet else _write_progress(config)
    try:
        answers = {persona.id: evaluate_triage(cases, persona, runner, run_id=state.run_id,
                                               model=condition.model.name, settings=settings)
                   for persona in pe_settings.personas}
        judges = [(judge.name, runner_for(judge.model)) for judge in pe_settings.judges]
        progress = Progress(f"triage judges on {condition.model.name}", len(judges) * len(cases), write=write)
        judgments = judge_model_responses(answers, judges, TRIAGE_CRITERIA, seed=pe_settings.seed,
                                          max_new_tokens=pe_settings.judge_max_new_tokens,
                                          questions={case.id: case.text for case in cases}, progress=progress)
    except PersonaEvalError as exc:
        _stop_run(request, f"persona-eval: {condition.id}: judging: {exc}\n{RESUME}", _exit_status(exc))
    for judgment in judgments:
        judgment["run_id"] = state.run_id
    write_part(state.run_dir, "judgments", condition.model.name, "triage", judgments)


@pytest.fixture
def safety_result(request: pytest.FixtureRequest, pe_safety_condition: Condition, pe_settings: Settings,
                  pe_safety_queries: list[SafetyQuery], pe_runner_for: Callable[[ModelSpec], Runner]
                  ) -> Iterator[ConditionResult]:
    """Answer the safety queries under every persona of one model (cached after the first case), have the
    judge panel rank them, and check this persona's MRR against the thresholds.

    The panel ranks all personas of a model together, so every case of a model needs every persona's
    answers: the first case of a model generates them, the others find them in the cache."""
    condition = pe_safety_condition
    state = request.config.stash[state_key]
    runner = pe_runner_for(condition.model)
    write = None if pe_settings.quiet else _write_progress(request.config)
    before = _stats_snapshot(runner)
    responses: dict[str, list[dict[str, Any]]] = {}
    try:
        for persona in pe_settings.personas:
            progress = Progress(f"safety {condition.model.name}/{persona.id}", len(pe_safety_queries), write=write)
            responses[persona.id] = evaluate_safety(
                pe_safety_queries, persona, runner, run_id=state.run_id, model=condition.model.name,
                max_new_tokens=pe_settings.max_new_tokens["safety"], pressure_suffix=pe_settings.pressure_suffix,
                progress=progress, max_prompt_tokens=pe_settings.max_prompt_tokens)
        judges = [(judge.name, pe_runner_for(judge.model)) for judge in pe_settings.judges]
        progress = Progress(f"safety judges on {condition.model.name}",
                            len(judges) * len(SAFETY_CRITERIA) * len(pe_safety_queries), write=write)
        judgments = judge_model_responses(responses, judges, SAFETY_CRITERIA, seed=pe_settings.seed,
                                          max_new_tokens=pe_settings.judge_max_new_tokens, progress=progress)
    except PersonaEvalError as exc:
        _stop_run(request, f"persona-eval: {condition.id}: {exc}\n{RESUME}", _exit_status(exc))
    for judgment in judgments:
        judgment["run_id"] = state.run_id
    records = responses[condition.persona.id]
    write_part(state.run_dir, "safety", condition.model.name, condition.persona.id, records)
    # Every case of a model writes the same judgments (atomically): any subset selected with -k has them.
    write_part(state.run_dir, "judgments", condition.model.name, "panel", judgments)
    metrics = persona_safety_metrics(judgments, model=condition.model.name, persona=condition.persona.id,
                                     personas=[p.id for p in pe_settings.personas])
    checks = check_bounds(pe_settings.thresholds, "safety", metrics, model=condition.model.name,
                          persona=condition.persona)
    _condition_property(request, condition, runner, records, metrics, checks, before,
                        decoding=runner.decoding_record(
                            GenerationConfig(max_new_tokens=pe_settings.max_new_tokens["safety"]), None),
                        judges=[judge.name for judge in pe_settings.judges])
    yield ConditionResult(condition, records, metrics, checks)


# -- the reporter (controller only) --------------------------------------------------------------------
class Reporter:
    """Collects the cases' results from their test reports and writes the run's summary."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.results: list[dict[str, Any]] = []
        self.summary: dict[str, Any] | None = None
        self.saved_baseline: Path | None = None
        self.report_path: Path | None = None
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
        state = self.config.stash[state_key]
        persona_order = [p.id for p in settings.registry]
        model_order = [m.name for m in settings.models]
        self.results.sort(key=lambda r: (r["task"], model_order.index(r["model"]) if r["model"] in model_order
                                         else len(model_order), persona_order.index(r["persona"])))
        cases_path = finalize_cases(state.run_dir, [(r["task"], r["model"], r["persona"]) for r in self.results])
        # The comparisons and the gate read the joined cases.jsonl, which holds every condition of the run
        # whichever worker ran it: computed here once, never in a worker.
        all_records = read_jsonl(cases_path) if cases_path is not None else []
        records = [r for r in all_records if r["task"] == "triage"]
        comparisons: list[dict[str, Any]] = []
        comparisons_error = None
        try:
            comparisons = compare_personas(records, settings=settings.comparison)
        except PersonaEvalError as exc:
            comparisons_error = str(exc)
        strata_run = {(r["task"], stratum) for r in self.results for stratum in r["metrics"]}
        regressions = check_regressions(comparisons, settings.thresholds.regressions, scope="within_run",
                                        personas_run={r["persona"] for r in self.results}, strata_run=strata_run)
        baseline_comparison = None
        if settings.approved is not None:
            try:
                baseline_comparison = approved_comparison(records, settings.approved,
                                                          settings.thresholds.regressions,
                                                          settings=settings.comparison)
            except PersonaEvalError as exc:
                baseline_comparison = {"approved": {"source": str(settings.approved.source),
                                                    "run_id": settings.approved.header.get("run_id")},
                                       "error": str(exc), "comparisons": [], "regressions": [], "skipped": [],
                                       "verdict": {"passed": False, "blocking": [], "recorded": []}}
        self.summary = build_summary(
            run_id=state.run_id, results=self.results, settings=settings, started=self.started,
            cases_path=cases_path, comparisons=comparisons, comparison_settings=settings.comparison.to_json(),
            regressions=[check.to_json() for check in regressions], baseline_comparison=baseline_comparison,
            comparisons_error=comparisons_error, allow_unchecked=settings.allow_unchecked,
            args=list(self.config.invocation_params.args),
            extra_metadata={**served_model_metadata(self.results), "dataset_fields_ignored": {
                task: asdict(report) for task, report in self.dataset_reports.items() if report.unknown_fields}})
        judged_parts = [("judgments", m, part) for m in model_order for part in ("panel", "triage")]
        judgments_path = finalize_cases(state.run_dir, judged_parts, filename="judgments.jsonl")
        judgments = read_jsonl(judgments_path) if judgments_path is not None else []
        if any(r["task"] == "safety" for r in self.results):
            self.summary["safety"] = safety_summary([r for r in all_records if r["task"] == "safety"],
                                                    [j for j in judgments if j["task"] == "safety"])
        triage_judgments = [j for j in judgments if j["task"] == "triage"]
        if triage_judgments:
            self.summary["triage_judging"] = panel_summary(triage_judgments,
                                                           personas=[p.id for p in settings.personas])
        write_json(state.run_dir / "summary.json", self.summary)
        markdown = render_markdown(self.summary)
        write_text(state.run_dir / "summary.md", markdown)
        step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if step_summary:
            try:
                append_step_summary(Path(step_summary), markdown)
            except OSError as exc:
                self.errors.append(f"$GITHUB_STEP_SUMMARY ({step_summary}): cannot append ({exc.strerror})")
        self.report_path = html_report.write_report(state.run_dir)
        update_latest(settings.reports_dir, state.run_dir)
        if settings.save_baseline is not None and records:
            metadata = self.summary["metadata"]
            try:
                self.saved_baseline = save_baseline(settings.save_baseline, records, run_id=state.run_id,
                                                    models=metadata["models"], datasets=metadata["datasets"])
            except PersonaEvalError as exc:
                self.errors.append(f"--pe-save-baseline: {exc}")
        _report_gate(self.config, session, self.summary)
        # The session fails exactly when a fail bound or a fail regression rule is crossed, or one could not be
        # checked (unless --pe-allow-unchecked); an approved baseline that cannot be compared is a usage error.
        if self.errors or (baseline_comparison is not None and baseline_comparison.get("error")):
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
        for error in self.errors:
            terminalreporter.write_line(f"persona-eval: {error}", red=True)
        state = self.config.stash[state_key]
        metadata = self.summary["metadata"]
        for model, row in (metadata.get("throughput") or {}).items():
            speed = f"{row['tokens_per_second']} generated tokens/s" if row["tokens_per_second"] else "no model calls"
            terminalreporter.write_line(
                f"{model}: {row['requests']} requests, {row['cached']} from the cache, up to {row['max_in_flight']} "
                f"in flight, {speed} ({row['model_seconds']:.1f} s in the model)")
        for line in served_model_lines(metadata):
            terminalreporter.write_line(line, yellow=True)
        for report in self.dataset_reports.values():
            note = report.message()
            if note is not None:
                terminalreporter.write_line(f"persona-eval: {note}", yellow=True)
        kept = sorted({r["persona"] for r in self.results if r.get("kept_control")})
        if kept:
            terminalreporter.write_line(f"persona-eval: kept the control(s) {', '.join(kept)} in the run although "
                                        "-k deselected them: every persona is compared with them")
        terminalreporter.write_line(f"Results: {state.run_dir}/ (report.html, summary.md, cases.jsonl, summary.json)")
        if self.saved_baseline is not None:
            terminalreporter.write_line(f"Approved baseline saved: {self.saved_baseline}")

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
