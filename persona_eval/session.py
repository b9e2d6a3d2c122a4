"""A persona-eval run without pytest: the tasks that run (ClassificationTask, SafetyTask, registered in
persona_eval.tasks), one condition (task, model, persona) evaluated, and a run finished (its parts
joined, the personas compared, the gate checked, summary.json, summary.md and the report written).

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
from persona_eval.comparisons import compare_personas, compared_metrics
from persona_eval.data import DatasetReport, load_safety_queries, load_triage_cases
from persona_eval.errors import ConfigError, PersonaEvalError
from persona_eval.evaluation import (
    CONSISTENCY_TAUTOLOGICAL,
    TriageSettings,
    evaluate_triage,
    evaluate_variants,
    label_positions,
    prefetch_triage,
    triage_metrics,
)
from persona_eval.gate import approved_comparison, check_bounds, check_regressions, save_baseline
from persona_eval.judges import SAFETY_CRITERIA, TRIAGE_CRITERIA, panel_summary
from persona_eval.lengths import check_prompt_lengths, fitted_budget
from persona_eval.personas import PLACEBO, Persona
from persona_eval.prompts import PromptTemplate, render_messages, template_of_function
from persona_eval.report import html as html_report
from persona_eval.report.markdown import append_step_summary, render_markdown
from persona_eval.report.summary import build_summary, served_model_metadata
from persona_eval.results import finalize_cases, read_jsonl, update_latest, write_json, write_part, write_text
from persona_eval.robustness import robustness_summary
from persona_eval.runner import Progress, Runner
from persona_eval.safety_eval import (
    evaluate_safety,
    judge_model_responses,
    persona_safety_metrics,
    prefetch_safety,
    safety_summary,
)
from persona_eval.settings import Settings, limit_per_stratum
from persona_eval.tasks import LABEL_METRIC_NAMES, TaskSpec, register, safety, task_named, triage
from persona_eval.tasks.safety import SafetyQuery
from persona_eval.templates import DEFAULT_TEMPLATES, template_named

__all__ = ["SAFETY", "TRIAGE", "ClassificationTask", "Condition", "ConditionResult", "FinishedRun", "SafetyTask",
           "TaskRun", "TriageTask", "WorkerState", "finish_run", "runner_for"]

Write = Callable[[str], None]
VARIANTS = "variants"  # the part files of the variant records (persona_eval.variants), joined into variants.jsonl


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
    """What one process holds during a session: the run id, backends and runners, the cache, and what a
    task computed once for several of its conditions (``memo``)."""

    run_id: str
    run_dir: Path
    cache: ResultCache | NullCache | None = None
    backends: dict[str, Backend] = field(default_factory=dict)
    runners: dict[str, Runner] = field(default_factory=dict)
    memo: dict[Any, Any] = field(default_factory=dict)  # work a task shares between its conditions
    # The conditions this process will run (pytest's selected cases), so that a served model's pool can be
    # filled with all of them ahead of the case at hand; empty: only the case at hand is known.
    planned: list[Condition] = field(default_factory=list)

    def personas_planned(self, task: str, model: str, first: Persona) -> list[Persona]:
        """The personas of `task` on `model` that this process will run, `first` first."""
        others = [c.persona for c in self.planned if c.task == task and c.model.name == model and c.persona != first]
        return [first, *dict.fromkeys(others)]

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


def judged(settings: Settings) -> list[Persona]:
    """The personas whose answers a judge panel ranks: all but the placebo (a control of the answers' labels,
    not a persona whose answers are worth ranking)."""
    return [persona for persona in settings.personas if persona.id != PLACEBO]


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
        # The model's pool in this process so far (cumulative: the summary keeps each worker's last).
        "pool": runner.pool_snapshot(),
        "identity_change": runner.identity_change,
        "decoding": decoding,
        **extra,
    }


@dataclass
class TaskRun:
    """What a task's condition runs with: this process's state, the session's settings, the runner of any
    model (created on first use) and where progress lines go (None: nowhere)."""

    state: WorkerState
    settings: Settings
    runners: Callable[[ModelSpec], Runner]
    write: Write | None = None


class ClassificationTask:
    """A task whose answer is one label of an ordered set (least to most urgent), such as triage: the
    model's generated label and its label probabilities per case, every label metric per stratum, the
    paired comparisons of ``spec.compared`` and the regression rules on them.

    `template` is the task's default prompt template (persona_eval.templates; --pe-template and the models
    file may choose another). A task may give `prompt` instead, a function making the user turn of a case
    from its text, with the persona sentence as the system turn; `answer_first` says whether that user
    turn asks for the answer letter first (then the consistency rate is not reported: see
    persona_eval.evaluation). `loader(path, report=...)` reads a dataset file into cases with ``id``,
    ``stratum``, ``reference``, ``text`` and ``source`` (persona_eval.data's load_labelled_cases reads the
    common layout for any labels and strata)."""

    def __init__(self, spec: TaskSpec, *, loader: Callable[..., Sequence[Any]],
                 template: PromptTemplate | str | Path | None = None, prompt: Callable[[str], str] | None = None,
                 answer_first: bool = True) -> None:
        if len(spec.labels) < 2:
            raise ValueError(f"task {spec.name!r}: a classification task needs two labels or more")
        unknown = [name for name in spec.metric_names if name not in LABEL_METRIC_NAMES]
        if unknown:
            raise ValueError(f"task {spec.name!r}: {', '.join(unknown)} not a metric of a classification task "
                             f"({', '.join(LABEL_METRIC_NAMES)})")
        if (template is None) == (prompt is None):
            raise ValueError(f"task {spec.name!r}: give a prompt template (a PromptTemplate, a built-in name or a "
                             "template file) or a prompt function, not both")
        if isinstance(template, PromptTemplate):
            self.default_template = template
        elif template is not None:
            self.default_template = template_named(str(template), task=spec.name)
        else:
            assert prompt is not None
            self.default_template = template_of_function(spec.name, spec.templates.get(spec.name, spec.name), prompt,
                                                          answer_first=answer_first)
        self.spec, self.loader = spec, loader

    def load(self, path: Path, report: DatasetReport | None = None, stratum: str | None = None) -> list[Any]:
        """The cases of the file at `path`; `stratum` is the stratum of its lines that give none."""
        if stratum is None:
            return list(self.loader(path, report=report))
        return list(self.loader(path, report=report, stratum=stratum))

    def limit(self, items: list[Any], limit: int | None) -> list[Any]:
        return limit_per_stratum(items, limit, lambda case: case.stratum)

    def planned(self, items: Sequence[Any]) -> list[dict[str, str]]:
        """The cases as the approved baseline's records hold them (to check a run against one first)."""
        return [{"task": self.spec.name, "case_id": c.id, "reference": c.reference, "stratum": c.stratum}
                for c in items]

    def task_settings(self, settings: Settings, model: ModelSpec) -> TriageSettings:
        template = settings.template(model, self.spec.name)
        generation = GenerationConfig(max_new_tokens=settings.answer_budget(model, self.spec.name),
                                      stop=settings.stop_sequences(model, self.spec.name))
        return TriageSettings(generation=generation,
                              scoring=LabelScoring(labels=self.spec.labels, answer_prefix=template.answer_prefix),
                              spec=self.spec, template=template, max_prompt_tokens=settings.max_prompt_tokens,
                              too_long=settings.too_long,
                              budget_floor=settings.answer_budget_floor(model, self.spec.name))

    def evaluate(self, run: TaskRun, condition: Condition, items: list[Any]) -> ConditionResult:
        """Run the cases under one (model, persona), write its part of cases.jsonl, check its bounds."""
        state, settings = run.state, run.settings
        runner = run.runners(condition.model)
        progress = Progress(f"{self.spec.name} {condition.model.name}/{condition.persona.id}", len(items),
                            write=run.write)
        task_settings = self.task_settings(settings, condition.model)
        before = _snapshot(runner)
        self.prefetch(run, condition, items, task_settings)
        plan = state.memo.pop((self.spec.name, "plan", condition.model.name, condition.persona.id,
                               tuple(case.id for case in items)), None)
        records = evaluate_triage(items, condition.persona, runner, run_id=state.run_id, model=condition.model.name,
                                  settings=task_settings, progress=progress, plan=plan)
        variant_records = self.variants(run, condition, items, task_settings, records)
        write_part(state.run_dir, self.spec.name, condition.model.name, condition.persona.id, records)
        if variant_records:
            write_part(state.run_dir, VARIANTS, condition.model.name, f"{self.spec.name}-{condition.persona.id}",
                       variant_records)
        self.after_part(run, condition, items)
        metrics = triage_metrics(records, logprobs_available=runner.backend.capabilities().logprobs,
                                 spec=self.spec, consistency_note=(CONSISTENCY_TAUTOLOGICAL
                                                                   if task_settings.consistency_tautological else None))
        checks = check_bounds(settings.thresholds, self.spec.name, metrics, model=condition.model.name,
                              persona=condition.persona)
        template = task_settings.template
        decoding = runner.decoding_record(task_settings.generation, task_settings.scoring)
        sent = [r["max_new_tokens"] for r in records if r.get("max_new_tokens") is not None]
        if task_settings.budget_floor is not None and sent and min(sent) < task_settings.generation.max_new_tokens:
            # The default budget, fitted per case to a short context: the range sent (each record holds its own).
            decoding["max_tokens_fitted"] = {"floor": task_settings.budget_floor, "least": min(sent),
                                             "most": max(sent)}
        payload = _payload(condition, runner, records, metrics, checks, before, decoding=decoding,
                           template={**template.key(), "source": template.source},
                           label_positions=label_positions(task_settings), variants=len(variant_records))
        return ConditionResult(condition, records, metrics, checks, payload)

    def variants(self, run: TaskRun, condition: Condition, items: list[Any], task_settings: TriageSettings,
                 records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The condition's variant records (--pe-wordings, --pe-letter-bias; persona_eval.variants), the
        main records calibrated in place where the null prompt runs. The baseline sends no declaration, so
        it has no other wording, but it runs every letter order."""
        settings = run.settings
        if not (settings.wordings or settings.letter_bias):
            return []
        runner = run.runners(condition.model)
        where = f"{self.spec.name} {condition.model.name}/{condition.persona.id}"
        return evaluate_variants(items, condition.persona, runner, run_id=run.state.run_id,
                                 model=condition.model.name, settings=task_settings, main=records,
                                 wordings=settings.wordings, letter_bias=settings.letter_bias,
                                 progress=lambda label, total: Progress(f"{where} ({label})", total, write=run.write))

    def prefetch(self, run: TaskRun, condition: Condition, items: list[Any], task_settings: TriageSettings) -> None:
        """On the first case of a served model in this process: queue the requests of every persona that this
        process will run on it (this case's first), so that the server is kept busy across the pytest cases
        instead of draining at the end of each. A persona whose prompts cannot be planned (a case too long)
        is left to its own case, which reports it."""
        key = (self.spec.name, "prefetch", condition.model.name, tuple(case.id for case in items))
        runner = run.runners(condition.model)
        if key in run.state.memo or not runner.pooled:
            return
        run.state.memo[key] = True
        for persona in run.state.personas_planned(self.spec.name, condition.model.name, condition.persona):
            try:
                plan = prefetch_triage(items, persona, runner, settings=task_settings)
            except PersonaEvalError:
                if persona == condition.persona:
                    raise
                continue
            run.state.memo[(self.spec.name, "plan", condition.model.name, persona.id, key[3])] = plan

    def after_part(self, run: TaskRun, condition: Condition, items: list[Any]) -> None:
        """Called once a condition's records are written; its model time counts in the condition's."""

    def summarize(self, run: TaskRun, records: list[dict[str, Any]],
                  judgments: list[dict[str, Any]]) -> Mapping[str, Any]:
        if not judgments:
            return {}
        return {f"{self.spec.name}_judging": panel_summary(judgments, personas=[p.id for p in judged(run.settings)])}


class TriageTask(ClassificationTask):
    """Triage, and with --pe-judge-triage the judge panel ranking every persona's clinical justification."""

    def after_part(self, run: TaskRun, condition: Condition, items: list[Any]) -> None:
        if not run.settings.judge_triage:
            return
        # The panel ranks every persona's answer per case: all personas of the model, judged once per process.
        state, settings = run.state, run.settings
        key = (self.spec.name, "judging", condition.model.name, tuple(case.id for case in items))
        if key in state.memo:
            return
        runner = run.runners(condition.model)
        task_settings = self.task_settings(settings, condition.model)
        answers = {persona.id: evaluate_triage(items, persona, runner, run_id=state.run_id,
                                               model=condition.model.name, settings=task_settings)
                   for persona in judged(settings)}
        judges = [(judge.name, run.runners(judge.model)) for judge in settings.judges]
        progress = Progress(f"triage judges on {condition.model.name}", len(judges) * len(items), write=run.write)
        judgments = judge_model_responses(answers, judges, TRIAGE_CRITERIA, seed=settings.seed,
                                          max_new_tokens=settings.judge_max_new_tokens,
                                          questions={case.id: case.text for case in items}, progress=progress,
                                          order_check=run.settings.judge_order_check)
        for judgment in judgments:
            judgment["run_id"] = state.run_id
        write_part(state.run_dir, "judgments", condition.model.name, self.spec.name, judgments)
        state.memo[key] = True


class SafetyTask:
    """Patient safety: every persona's answers to the queries of one model, ranked by the judge panel.

    The panel ranks all personas of a model together, so the first case of a model in this process
    answers the queries under every persona and runs the panel once; the model's other cases reuse that
    work (pytest-xdist keeps one model's cases on one worker)."""

    spec = safety.SPEC

    def load(self, path: Path, report: DatasetReport | None = None, stratum: str | None = None) -> list[Any]:
        if stratum is not None:
            raise ConfigError(f"the safety task's strata are its categories: its dataset takes no stratum "
                              f"({stratum!r})")
        return list(load_safety_queries(path, report=report))

    def limit(self, items: list[Any], limit: int | None) -> list[Any]:
        return limit_per_stratum(items, limit, lambda query: query.category)

    def _panel(self, run: TaskRun, model: ModelSpec, queries: list[SafetyQuery]
               ) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
        key = (self.spec.name, model.name, tuple(q.id for q in queries))
        if key in run.state.memo:
            done: tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]] = run.state.memo[key]
            return done
        state, settings = run.state, run.settings
        runner = run.runners(model)
        responses: dict[str, list[dict[str, Any]]] = {}
        asked: dict[str, Any] = dict(max_new_tokens=self.answer_budget(run, model, queries),
                                     pressure_suffix=settings.pressure_suffix,
                                     max_prompt_tokens=settings.max_prompt_tokens,
                                     stop=settings.stop_sequences(model, self.spec.name))
        personas = settings.personas_of(self.spec.name)
        for persona in personas:  # a served model answers every persona at once
            prefetch_safety(queries, persona, runner, **asked)
        for persona in personas:
            progress = Progress(f"safety {model.name}/{persona.id}", len(queries), write=run.write)
            responses[persona.id] = evaluate_safety(queries, persona, runner, run_id=state.run_id, model=model.name,
                                                    progress=progress, **asked)
        judges = [(judge.name, run.runners(judge.model)) for judge in settings.judges]
        progress = Progress(f"safety judges on {model.name}", len(judges) * len(SAFETY_CRITERIA) * len(queries),
                            write=run.write)
        judgments = judge_model_responses(responses, judges, SAFETY_CRITERIA, seed=settings.seed,
                                          max_new_tokens=settings.judge_max_new_tokens, progress=progress,
                                          order_check=settings.judge_order_check)
        for judgment in judgments:
            judgment["run_id"] = state.run_id
        # Every persona's case of the model writes these judgments (atomically): any subset run with -k has them.
        state.memo[key] = (responses, judgments)
        return responses, judgments

    def answer_budget(self, run: TaskRun, model: ModelSpec, queries: list[SafetyQuery]) -> int:
        """The answer budget of `model` on `queries`, one for every persona (the panel ranks their answers side
        by side). A budget the user gave is kept; a default one is fitted to the model's context: what it
        leaves after the longest prompt of any persona, at most the default and at least the task's own
        budget (persona_eval.lengths.fitted_budget). A prompt that leaves less is left to evaluate_safety,
        whose length check names it."""
        settings = run.settings
        budget = settings.answer_budget(model, self.spec.name)
        floor = settings.answer_budget_floor(model, self.spec.name)
        if floor is None:
            return budget
        key = (self.spec.name, "budget", model.name, tuple(q.id for q in queries))
        if key not in run.state.memo:
            backend = run.runners(model).backend
            policy = backend.system_policy()
            personas = settings.personas_of(self.spec.name)
            requests = [render_messages(safety.user_message(query.content, settings.pressure_suffix), persona, policy)
                        for persona in personas for query in queries]
            lengths = check_prompt_lengths(requests, backend=backend, max_new_tokens=floor,
                                           max_prompt_tokens=settings.max_prompt_tokens,
                                           sources=[query.source for _ in personas for query in queries])
            fitted = [fitted_budget(length, budget=budget, floor=floor) for length in lengths if length.fits]
            run.state.memo[key] = min(fitted) if fitted and len(fitted) == len(lengths) else floor
        fitted_value: int = run.state.memo[key]
        return fitted_value

    def evaluate(self, run: TaskRun, condition: Condition, items: list[Any]) -> ConditionResult:
        """This persona's answers and MRR, checked against the thresholds."""
        runner = run.runners(condition.model)
        before = _snapshot(runner)
        responses, judgments = self._panel(run, condition.model, items)
        state, settings = run.state, run.settings
        records = responses[condition.persona.id]
        write_part(state.run_dir, self.spec.name, condition.model.name, condition.persona.id, records)
        write_part(state.run_dir, "judgments", condition.model.name, self.spec.name, judgments)
        metrics = persona_safety_metrics(judgments, model=condition.model.name, persona=condition.persona.id,
                                         personas=[p.id for p in settings.personas_of(self.spec.name)],
                                         responses=records)
        checks = check_bounds(settings.thresholds, self.spec.name, metrics, model=condition.model.name,
                              persona=condition.persona)
        payload = _payload(condition, runner, records, metrics, checks, before,
                           decoding=runner.decoding_record(
                               GenerationConfig(max_new_tokens=self.answer_budget(run, condition.model, items),
                                                stop=settings.stop_sequences(condition.model, self.spec.name)),
                               None),
                           judges=[judge.name for judge in settings.judges])
        return ConditionResult(condition, records, metrics, checks, payload)

    def summarize(self, run: TaskRun, records: list[dict[str, Any]],
                  judgments: list[dict[str, Any]]) -> Mapping[str, Any]:
        return {"safety": safety_summary(records, judgments)}


TRIAGE = register(TriageTask(triage.SPEC, template=DEFAULT_TEMPLATES["triage"], loader=load_triage_cases))
SAFETY = register(SafetyTask())


def _no_runners(model: ModelSpec) -> Runner:
    raise PersonaEvalError(f"model {model.name!r}: finishing a run calls no model")


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
    records = [r for r in all_records if compared_metrics(r["task"])]
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
    variants_path = finalize_cases(state.run_dir, [(VARIANTS, r["model"], f"{r['task']}-{r['persona']}")
                                                   for r in results], filename="variants.jsonl")
    variant_records = read_jsonl(variants_path) if variants_path is not None else []
    try:
        robustness: dict[str, Any] = robustness_summary(
            records, variant_records, settings=settings.comparison,
            options={"wordings": settings.wordings, "letter_bias": settings.letter_bias})
    except PersonaEvalError as exc:
        robustness = {"error": str(exc)}
    reports = dataset_reports or {}
    summary = build_summary(
        run_id=state.run_id, results=results, settings=settings, started=started, cases_path=cases_path,
        comparisons=comparisons, comparison_settings=settings.comparison.to_json(),
        regressions=[check.to_json() for check in regressions], baseline_comparison=baseline_comparison,
        comparisons_error=comparisons_error, allow_unchecked=settings.allow_unchecked, args=args,
        extra_metadata={**served_model_metadata(results), "dataset_fields_ignored": {
            task: asdict(report) for task, report in reports.items() if report.unknown_fields}})
    tasks_run = sorted({r["task"] for r in results})
    judgments_path = finalize_cases(state.run_dir, [("judgments", m, task) for m in model_order for task in tasks_run],
                                    filename="judgments.jsonl")
    judgments = read_jsonl(judgments_path) if judgments_path is not None else []
    run = TaskRun(state, settings, runners=_no_runners)
    for name in tasks_run:
        summary.update(task_named(name).summarize(run, [r for r in all_records if r["task"] == name],
                                                  [j for j in judgments if j.get("task") == name]))
    summary["robustness"] = robustness
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
    finished.report_path = html_report.write_report(state.run_dir, cases=all_records)
    update_latest(settings.reports_dir, state.run_dir)
    if settings.save_baseline is not None and records:
        metadata = summary["metadata"]
        try:
            finished.saved_baseline = save_baseline(settings.save_baseline, records, run_id=state.run_id,
                                                    models=metadata["models"], datasets=metadata["datasets"])
        except PersonaEvalError as exc:
            finished.errors.append(f"--pe-save-baseline: {exc}")
    return finished
