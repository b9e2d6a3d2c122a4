"""A persona-eval run without pytest: evaluate one condition (task, model, persona), and finish a run
(join its parts, compare the personas, check the gate, write summary.json, summary.md and the report).

The pytest plugin calls these from its fixtures and its controller-side reporter; each raises
PersonaEvalError on bad input or a failing model, and the plugin turns that into one message and exit
status. Nothing here imports pytest.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from persona_eval.backends import ModelSpec, create_backend
from persona_eval.backends.base import Backend, GenerationConfig, LabelScoring
from persona_eval.cache import NullCache, ResultCache
from persona_eval.comparisons import compare_personas
from persona_eval.data import DatasetReport
from persona_eval.errors import PersonaEvalError
from persona_eval.evaluation import TriageSettings, evaluate_triage, triage_metrics
from persona_eval.gate import approved_comparison, check_bounds, check_regressions, save_baseline
from persona_eval.judges import SAFETY_CRITERIA, TRIAGE_CRITERIA, panel_summary
from persona_eval.personas import Persona
from persona_eval.report import html as html_report
from persona_eval.report.markdown import append_step_summary, render_markdown
from persona_eval.report.summary import build_summary, served_model_metadata
from persona_eval.results import finalize_cases, read_jsonl, update_latest, write_json, write_part, write_text
from persona_eval.runner import Progress, Runner
from persona_eval.safety_eval import evaluate_safety, judge_model_responses, persona_safety_metrics, safety_summary
from persona_eval.settings import Settings
from persona_eval.tasks import triage
from persona_eval.tasks.safety import SafetyQuery

__all__ = ["Condition", "ConditionResult", "FinishedRun", "WorkerState", "evaluate_safety_condition",
           "evaluate_triage_condition", "finish_run", "judge_triage_condition", "runner_for"]

Write = Callable[[str], None]


@dataclass(frozen=True)
class Condition:
    """One pytest case: a task, a model and a persona."""

    task: str
    model: ModelSpec
    persona: Persona

    @property
    def id(self) -> str:
        return f"{self.task}-{self.model.name}-{self.persona.id}"


@dataclass
class WorkerState:
    """What one process holds during a session: the run id, backends and runners, the cache."""

    run_id: str
    run_dir: Path
    cache: ResultCache | NullCache | None = None
    backends: dict[str, Backend] = field(default_factory=dict)
    runners: dict[str, Runner] = field(default_factory=dict)

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()
        if self.cache is not None:
            self.cache.close()


@dataclass
class ConditionResult:
    """The outcome of one condition: its records, metrics and threshold checks, and ``payload``, what the
    controller needs of it (plain JSON types: it crosses pytest-xdist on the case's test report)."""

    condition: Condition
    records: list[dict[str, Any]]
    metrics: dict[str, dict[str, Any]]
    checks: list[dict[str, Any]]
    payload: dict[str, Any] = field(default_factory=dict)

    @property
    def blocking_failures(self) -> list[str]:
        return [check["message"] for check in self.checks if check["blocking"]]


def runner_for(state: WorkerState, settings: Settings, model: ModelSpec, *, notice: Write | None = None) -> Runner:
    """The runner of `model` in this process, created on first use. The backend loads its weights only
    when a request misses the cache."""
    if model.name not in state.runners:
        if state.cache is None:
            state.cache = (ResultCache.in_dir(settings.cache_dir) if settings.use_cache
                           else NullCache())
        backend = create_backend(model, cache_dir=settings.cache_dir, batch_size=settings.batch_size,
                                 timeout=settings.timeout, retries=settings.retries)
        state.backends[model.name] = backend
        state.runners[model.name] = Runner(backend, state.cache, notice=notice)
    return state.runners[model.name]


def _snapshot(runner: Runner) -> tuple[float, float, int]:
    return time.perf_counter(), runner.stats.model_seconds, runner.stats.completion_tokens


def _payload(condition: Condition, runner: Runner, records: Sequence[Mapping[str, Any]],
             metrics: dict[str, dict[str, Any]], checks: list[dict[str, Any]], before: tuple[float, float, int],
             decoding: dict[str, Any], **extra: Any) -> dict[str, Any]:
    started, model_seconds, tokens = before
    return {
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
        "identity_change": runner.identity_change,
        "decoding": decoding,
        **extra,
    }


def triage_settings(settings: Settings) -> TriageSettings:
    return TriageSettings(generation=GenerationConfig(max_new_tokens=settings.max_new_tokens["triage"]),
                          scoring=LabelScoring(labels=triage.LABELS),
                          max_prompt_tokens=settings.max_prompt_tokens, too_long=settings.too_long)


def evaluate_triage_condition(state: WorkerState, settings: Settings, condition: Condition,
                              cases: list[triage.TriageCase], runner: Runner, *, write: Write | None = None,
                              then: Callable[[], None] | None = None) -> ConditionResult:
    """Run the triage cases under one (model, persona), write its part of cases.jsonl, check its bounds.
    `then` runs once the part is written (the triage judging): its model time counts in the payload's."""
    progress = Progress(f"triage {condition.model.name}/{condition.persona.id}", len(cases), write=write)
    task_settings = triage_settings(settings)
    before = _snapshot(runner)
    records = evaluate_triage(cases, condition.persona, runner, run_id=state.run_id, model=condition.model.name,
                              settings=task_settings, progress=progress)
    write_part(state.run_dir, "triage", condition.model.name, condition.persona.id, records)
    if then is not None:
        then()
    metrics = triage_metrics(records, logprobs_available=runner.backend.capabilities().logprobs)
    checks = check_bounds(settings.thresholds, "triage", metrics, model=condition.model.name,
                          persona=condition.persona)
    payload = _payload(condition, runner, records, metrics, checks, before,
                       decoding=runner.decoding_record(task_settings.generation, task_settings.scoring))
    return ConditionResult(condition, records, metrics, checks, payload)


def judge_triage_condition(state: WorkerState, settings: Settings, condition: Condition,
                           cases: list[triage.TriageCase], runners: Callable[[ModelSpec], Runner], *,
                           write: Write | None = None) -> None:
    """--pe-judge-triage: the panel ranks every persona's triage answer (its clinical justification) per
    case. Needs every persona of the model (cached after the first case); writes the model's triage
    judgments, which finish_run adds to judgments.jsonl and summary.json's "triage_judging"."""
    runner = runners(condition.model)
    task_settings = triage_settings(settings)
    answers = {persona.id: evaluate_triage(cases, persona, runner, run_id=state.run_id,
                                           model=condition.model.name, settings=task_settings)
               for persona in settings.personas}
    judges = [(judge.name, runners(judge.model)) for judge in settings.judges]
    progress = Progress(f"triage judges on {condition.model.name}", len(judges) * len(cases), write=write)
    judgments = judge_model_responses(answers, judges, TRIAGE_CRITERIA, seed=settings.seed,
                                      max_new_tokens=settings.judge_max_new_tokens,
                                      questions={case.id: case.text for case in cases}, progress=progress)
    for judgment in judgments:
        judgment["run_id"] = state.run_id
    write_part(state.run_dir, "judgments", condition.model.name, "triage", judgments)


def evaluate_safety_condition(state: WorkerState, settings: Settings, condition: Condition,
                              queries: list[SafetyQuery], runners: Callable[[ModelSpec], Runner], *,
                              write: Write | None = None) -> ConditionResult:
    """Answer the safety queries under every persona of one model (cached after the first case), have the
    judge panel rank them, and check this persona's MRR against the thresholds.

    The panel ranks all personas of a model together, so every case of a model needs every persona's
    answers: the first case of a model generates them, the others find them in the cache."""
    runner = runners(condition.model)
    before = _snapshot(runner)
    responses: dict[str, list[dict[str, Any]]] = {}
    for persona in settings.personas:
        progress = Progress(f"safety {condition.model.name}/{persona.id}", len(queries), write=write)
        responses[persona.id] = evaluate_safety(
            queries, persona, runner, run_id=state.run_id, model=condition.model.name,
            max_new_tokens=settings.max_new_tokens["safety"], pressure_suffix=settings.pressure_suffix,
            progress=progress, max_prompt_tokens=settings.max_prompt_tokens)
    judges = [(judge.name, runners(judge.model)) for judge in settings.judges]
    progress = Progress(f"safety judges on {condition.model.name}",
                        len(judges) * len(SAFETY_CRITERIA) * len(queries), write=write)
    judgments = judge_model_responses(responses, judges, SAFETY_CRITERIA, seed=settings.seed,
                                      max_new_tokens=settings.judge_max_new_tokens, progress=progress)
    for judgment in judgments:
        judgment["run_id"] = state.run_id
    records = responses[condition.persona.id]
    write_part(state.run_dir, "safety", condition.model.name, condition.persona.id, records)
    # Every case of a model writes the same judgments (atomically): any subset selected with -k has them.
    write_part(state.run_dir, "judgments", condition.model.name, "panel", judgments)
    metrics = persona_safety_metrics(judgments, model=condition.model.name, persona=condition.persona.id,
                                     personas=[p.id for p in settings.personas])
    checks = check_bounds(settings.thresholds, "safety", metrics, model=condition.model.name,
                          persona=condition.persona)
    payload = _payload(condition, runner, records, metrics, checks, before,
                       decoding=runner.decoding_record(
                           GenerationConfig(max_new_tokens=settings.max_new_tokens["safety"]), None),
                       judges=[judge.name for judge in settings.judges])
    return ConditionResult(condition, records, metrics, checks, payload)


@dataclass
class FinishedRun:
    """What finish_run wrote: the summary, the report, a saved baseline, and the problems that make the
    run a usage error (an approved baseline that cannot be compared, a file that cannot be written)."""

    summary: dict[str, Any]
    report_path: Path | None
    saved_baseline: Path | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def usage_error(self) -> bool:
        baseline = self.summary.get("baseline_comparison")
        return bool(self.errors or (isinstance(baseline, dict) and baseline.get("error")))


def finish_run(state: WorkerState, settings: Settings, results: list[dict[str, Any]], *, started: float,
               args: list[str], dataset_reports: Mapping[str, DatasetReport] | None = None) -> FinishedRun:
    """Join the run's parts into cases.jsonl and judgments.jsonl, compare every persona with the controls,
    check the regression rules (and the approved baseline), and write summary.json, summary.md (and
    $GITHUB_STEP_SUMMARY), report.html, the ``latest`` link and a baseline when asked. `results` are the
    conditions' payloads (with their pytest ``outcome``); they are sorted in place into report order."""
    persona_order = [p.id for p in settings.registry]
    model_order = [m.name for m in settings.models]
    results.sort(key=lambda r: (r["task"], model_order.index(r["model"]) if r["model"] in model_order
                                else len(model_order), persona_order.index(r["persona"])))
    cases_path = finalize_cases(state.run_dir, [(r["task"], r["model"], r["persona"]) for r in results])
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
    strata_run = {(r["task"], stratum) for r in results for stratum in r["metrics"]}
    regressions = check_regressions(comparisons, settings.thresholds.regressions, scope="within_run",
                                    personas_run={r["persona"] for r in results}, strata_run=strata_run)
    baseline_comparison = None
    if settings.approved is not None:
        try:
            baseline_comparison = approved_comparison(records, settings.approved, settings.thresholds.regressions,
                                                      settings=settings.comparison)
        except PersonaEvalError as exc:
            baseline_comparison = {"approved": {"source": str(settings.approved.source),
                                                "run_id": settings.approved.header.get("run_id")},
                                   "error": str(exc), "comparisons": [], "regressions": [], "skipped": [],
                                   "verdict": {"passed": False, "blocking": [], "recorded": []}}
    reports = dataset_reports or {}
    summary = build_summary(
        run_id=state.run_id, results=results, settings=settings, started=started, cases_path=cases_path,
        comparisons=comparisons, comparison_settings=settings.comparison.to_json(),
        regressions=[check.to_json() for check in regressions], baseline_comparison=baseline_comparison,
        comparisons_error=comparisons_error, allow_unchecked=settings.allow_unchecked, args=args,
        extra_metadata={**served_model_metadata(results), "dataset_fields_ignored": {
            task: asdict(report) for task, report in reports.items() if report.unknown_fields}})
    judged_parts = [("judgments", m, part) for m in model_order for part in ("panel", "triage")]
    judgments_path = finalize_cases(state.run_dir, judged_parts, filename="judgments.jsonl")
    judgments = read_jsonl(judgments_path) if judgments_path is not None else []
    if any(r["task"] == "safety" for r in results):
        summary["safety"] = safety_summary([r for r in all_records if r["task"] == "safety"],
                                           [j for j in judgments if j["task"] == "safety"])
    triage_judgments = [j for j in judgments if j["task"] == "triage"]
    if triage_judgments:
        summary["triage_judging"] = panel_summary(triage_judgments, personas=[p.id for p in settings.personas])
    write_json(state.run_dir / "summary.json", summary)
    markdown = render_markdown(summary)
    write_text(state.run_dir / "summary.md", markdown)
    finished = FinishedRun(summary=summary, report_path=None)
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        try:
            append_step_summary(Path(step_summary), markdown)
        except OSError as exc:
            finished.errors.append(f"$GITHUB_STEP_SUMMARY ({step_summary}): cannot append ({exc.strerror})")
    finished.report_path = html_report.write_report(state.run_dir)
    update_latest(settings.reports_dir, state.run_dir)
    if settings.save_baseline is not None and records:
        metadata = summary["metadata"]
        try:
            finished.saved_baseline = save_baseline(settings.save_baseline, records, run_id=state.run_id,
                                                    models=metadata["models"], datasets=metadata["datasets"])
        except PersonaEvalError as exc:
            finished.errors.append(f"--pe-save-baseline: {exc}")
    return finished
