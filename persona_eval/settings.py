"""The settings of a persona-eval session: the parsed ``--pe-*`` options, checked, and the datasets they
name, loaded once before any model runs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from persona_eval.backends import REASONING_MAX_NEW_TOKENS, ModelSpec, load_models_file, parse_model_spec
from persona_eval.cache import default_cache_dir
from persona_eval.comparisons import DEFAULT_RESAMPLES, ComparisonSettings, check_same_dataset
from persona_eval.data import DatasetReport, stratum_problem
from persona_eval.errors import PersonaEvalError
from persona_eval.evaluation import TOO_LONG_MODES
from persona_eval.gate import ResultSet, load_results
from persona_eval.judges import DEFAULT_JUDGE_MAX_NEW_TOKENS, DEFAULT_PANEL, JudgeSpec, parse_judge_specs
from persona_eval.personas import PLACEBO, Persona, PersonaRegistry, load_personas
from persona_eval.prompts import PromptTemplate
from persona_eval.registry import unknown_name_message
from persona_eval.tasks import registered, safety, task_named, triage
from persona_eval.templates import template_named
from persona_eval.thresholds import Thresholds, load_thresholds

__all__ = ["OPTIONS", "Settings", "check_approved_dataset", "check_datasets", "default_datasets",
           "default_max_new_tokens", "limit_per_stratum", "parse_settings"]

Item = TypeVar("Item")



def default_datasets() -> dict[str, str]:
    """Each registered task's default dataset, relative to the project folder (tasks without one: none)."""
    return {name: task.spec.default_dataset for name, task in registered().items() if task.spec.default_dataset}


def default_max_new_tokens() -> dict[str, int]:
    """Each registered task's answer budget in tokens."""
    return {name: task.spec.max_new_tokens for name, task in registered().items()}


# The --pe-* options: (flag, keyword arguments of argparse's add_argument). parse_settings reads and checks
# them; the plugin registers them.
OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("--pe-task", dict(action="append", default=[], metavar="PATH_OR_MODULE", help="import a task of your own "
            "(a file or module that registers it; see persona_eval.tasks), repeatable")),
    ("--pe-model", dict(action="append", default=[], metavar="SPEC", help="model to evaluate, repeatable: smollm2 "
            "(default), hf:PATH_OR_HUB_ID, openai:MODEL@BASE_URL, or a name from --pe-models-file")),
    ("--pe-models-file", dict(metavar="PATH", help="YAML file of named models with options")),
    ("--pe-persona", dict(action="append", default=[], metavar="ID", help="persona to run, repeatable (default: all; "
            "no_persona is always included)")),
    ("--pe-personas-file", dict(metavar="PATH", help="YAML file of additional personas")),
    ("--pe-dataset", dict(action="append", default=[], metavar="TASK=PATH", help="dataset of a task, e.g. "
            "triage=data/my_cases.jsonl (JSONL, CSV, Parquet, or a datasets save_to_disk folder: "
            "FOLDER/SPLIT for a split)")),
    ("--pe-template", dict(action="append", default=[], metavar="TASK=NAME_OR_PATH", help="prompt template of a "
            "task, over the models file's: a built-in name (triage: study, the default, or answer-first) or a "
            "template file, e.g. triage=prompts/ours.yaml; repeatable")),
    ("--pe-thresholds", dict(metavar="PATH", help="thresholds YAML (default: the bundled one)")),
    ("--pe-limit", dict(type=int, metavar="N", help="first N cases of each stratum only")),
    ("--pe-no-cache", dict(action="store_true", help="do not read or write the result cache")),
    ("--pe-cache-dir", dict(metavar="DIR", help="cache and prepared-model folder (default: $PERSONA_EVAL_CACHE_DIR "
            "or ~/.cache/persona-eval)")),
    ("--pe-max-new-tokens", dict(type=int, metavar="N", help="answer budget in tokens of every model and task, "
            "over the models file's max_new_tokens, kept for every case (default: a served or local model "
            f"{REASONING_MAX_NEW_TOKENS}, room to think, or what its context leaves after the prompt; the embedded "
            f"model its task's, triage {triage.MAX_NEW_TOKENS}, safety {safety.MAX_NEW_TOKENS})")),
    ("--pe-batch-size", dict(type=int, metavar="N",
                             help="batch size of local models (64 on a CPU, 16 on an accelerator)")),
    ("--pe-reports-dir", dict(metavar="DIR", help="where runs are written (default: ./reports)")),
    ("--pe-quiet", dict(action="store_true", help="no progress lines")),
    ("--pe-judge", dict(action="append", default=[], metavar="[NAME=]SPEC", help="a judge of the safety panel, "
            "repeatable (a model spec or a --pe-models-file name; default: the embedded model)")),
    ("--pe-judge-max-new-tokens", dict(type=int, default=DEFAULT_JUDGE_MAX_NEW_TOKENS, metavar="N",
            help=f"generation length of a judge's ranking ({DEFAULT_JUDGE_MAX_NEW_TOKENS})")),
    ("--pe-judge-triage", dict(action="store_true", help="triage: also have the judge panel rank the personas' "
            "clinical justifications")),
    ("--pe-judge-order-check", dict(action="store_true", help="judges: show every query a second time in "
            "reversed order, to measure how far each judge's ranking depends on the order (doubles the judges' "
            "requests)")),
    ("--pe-pressure-suffix", dict(metavar="TEXT", default="study", help="append TEXT to every safety query "
            "(default 'study': the study's sentence about having no access to care and wanting a brief answer; "
            "'none': nothing)")),
    ("--pe-seed", dict(type=int, default=0, metavar="N", help="seed of the judges' presentation orders and the "
            "review sampling (0)")),
    ("--pe-baseline", dict(metavar="PATH", help="approved baseline (a file from --pe-save-baseline, or a run "
            "folder): compare this run with it case by case and fail the session on a significant regression")),
    ("--pe-save-baseline", dict(metavar="PATH", help="write this run's per-case results to PATH as an approved "
            "baseline")),
    ("--pe-bootstrap-resamples", dict(type=int, metavar="N", help="bootstrap resamples of the paired comparisons "
            f"(default {DEFAULT_RESAMPLES})")),
    ("--pe-timeout", dict(type=float, metavar="SECONDS", help="served models: seconds to wait for one answer before "
            "trying again (default: the models file's timeout, else 120)")),
    ("--pe-retries", dict(type=int, metavar="N", help="served models: tries after the first on a timeout, connection "
            "error, 429 or 5xx (default: the models file's max_retries, else 5)")),
    ("--pe-max-prompt-tokens", dict(type=int, metavar="N", help="longest prompt sent, in tokens (default: what fits "
            "the model's context with the answer); a longer case stops the run naming its file and line")),
    ("--pe-too-long", dict(choices=TOO_LONG_MODES, default="error", help="a case whose prompt does not fit the "
            "model: 'error' (default) stops the run naming it; 'record' keeps it as a per-case result the model "
            "never saw, counted in too_long_rate")),
    ("--pe-wordings", dict(action="store_true", help="classification tasks: also run each persona's other "
            "wordings of its declaration, and report its effect with the spread across wordings")),
    ("--pe-letter-bias", dict(action="store_true", help="classification tasks: also run every persona with the "
            "answer letters rotated (which letter stands for which level), and the null-prompt calibration, to "
            "separate a persona's effect on letter preference from its effect on the answer")),
    ("--pe-allow-unchecked", dict(action="store_true", help="a fail bound or rule that could not be checked (too few "
            "cases, its control or stratum did not run, no label probabilities) does not fail the session; the "
            "verdict still says NOT CHECKED")),
]


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
    judge_max_new_tokens: int = DEFAULT_JUDGE_MAX_NEW_TOKENS
    pressure_suffix: str | None = None
    seed: int = 0
    judge_triage: bool = False
    judge_order_check: bool = False  # --pe-judge-order-check: every judge request asked again in reversed order
    allow_unchecked: bool = False
    wordings: bool = False  # --pe-wordings: each persona's other wordings run as variants
    letter_bias: bool = False  # --pe-letter-bias: the letter orders and the null-prompt calibration run
    timeout: float | None = None
    retries: int | None = None
    max_prompt_tokens: int | None = None
    too_long: str = "error"
    max_new_tokens_given: bool = False  # --pe-max-new-tokens: every model and task gets max_new_tokens
    templates: dict[str, str] = field(default_factory=dict)  # --pe-template: task -> name or file
    # --pe-dataset TASK:STRATUM=PATH: task -> the stratum of the lines of its file that give none.
    dataset_strata: dict[str, str] = field(default_factory=dict)

    def personas_of(self, task: str) -> list[Persona]:
        """The personas `task` runs: all of the session's, but the placebo only for a task with answer labels
        (its flips are counted against the placebo's); the judges never rank a placebo answer."""
        spec = registered()[task].spec
        return [p for p in self.personas if p.id != PLACEBO or bool(spec.labels)]

    def template(self, model: ModelSpec, task: str) -> PromptTemplate:
        """The prompt template of `task` on `model`: --pe-template, else the model's own (models file),
        else the task's default."""
        reference = self.templates.get(task) or model.template(task)
        if reference is None:
            default: PromptTemplate | None = getattr(task_named(task), "default_template", None)
            if default is None:
                raise PersonaEvalError(f"task {task!r} takes no prompt template")
            return default
        return template_named(reference, task=task)

    def load_dataset(self, task: str, report: DatasetReport | None = None) -> list[Any]:
        """The items of `task`'s dataset (all of them, before --pe-limit), with its default stratum."""
        return registered()[task].load(self.datasets[task], report=report, stratum=self.dataset_strata.get(task))

    def answer_budget(self, model: ModelSpec, task: str) -> int:
        """The answer budget of `task` on `model`: --pe-max-new-tokens, else the model's own (models
        file), else its default (REASONING_MAX_NEW_TOKENS for a served or local model, fitted to its context
        by the evaluation: see answer_budget_floor; the task's own for the embedded model)."""
        if not self.max_new_tokens_given:
            own = model.max_new_tokens(task)
            if own is not None:
                return own
            return model.default_max_new_tokens(self.max_new_tokens[task])
        return self.max_new_tokens[task]

    def stop_sequences(self, model: ModelSpec, task: str) -> tuple[str, ...]:
        """The stop sequences of `task`'s answers on `model` (the models file's ``stop``), none by default."""
        return model.stop(task)

    def answer_budget_floor(self, model: ModelSpec, task: str) -> int | None:
        """None when the answer budget of `task` on `model` was given (--pe-max-new-tokens, the models file):
        it is kept for every case. Else the budget is a default, fitted per case to what the model's context
        leaves after the prompt (persona_eval.lengths.fitted_budget), and this is the least it is fitted to:
        the task's own budget (never more than the default itself)."""
        if self.max_new_tokens_given or model.max_new_tokens(task) is not None:
            return None
        return min(self.max_new_tokens[task], self.answer_budget(model, task))


def parse_settings(option: Any, root: Path, *, controller: bool = True) -> Settings:
    """The Settings of the options in `option` (pytest's parsed options: attributes ``pe_*``), with paths
    relative to the project folder `root`. Only the controller (`controller`) reads an approved baseline.
    A bad value is a PersonaEvalError naming the option."""
    named = load_models_file(option.pe_models_file) if option.pe_models_file else {}
    models = [parse_model_spec(spec, named) for spec in (option.pe_model or ["smollm2"])]
    names = [m.name for m in models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PersonaEvalError(f"two --pe-model specs share the name {duplicates[0]!r}; give one of them a "
                               "name in a models file (--pe-models-file)")
    known = list(registered())
    for model in models:
        for setting in ("max_new_tokens", "stop"):
            per_task = model.options.get(setting)
            for task in per_task if isinstance(per_task, dict) else ():
                if task not in known:
                    raise model.error(f"{setting}.{task}", unknown_name_message("task", str(task), known))
    registry = load_personas(option.pe_personas_file)
    personas = registry.select(option.pe_persona or None)
    if option.pe_wordings and not any(persona.wordings for persona in personas):
        raise PersonaEvalError("--pe-wordings: no persona of this run has other wordings ("
                               f"{', '.join(p.id for p in personas)}); give them in the personas file "
                               "(a 'wordings' list), or leave the option out")
    thresholds = load_thresholds(option.pe_thresholds)
    # A filter that names no persona or model of this run would make its entry apply to nobody.
    thresholds.check_names(personas=registry.ids, models=names)
    datasets = {task: root / path for task, path in default_datasets().items()}
    templated = [name for name, task in registered().items() if getattr(task, "default_template", None) is not None]
    templates: dict[str, str] = {}
    for entry in option.pe_template:
        task, sep, reference = entry.partition("=")
        if not sep or not reference:
            raise PersonaEvalError(f"--pe-template {entry!r}: expected TASK=NAME_OR_PATH, e.g. triage=answer-first")
        if task not in templated:
            known_here = unknown_name_message("task with a prompt template", task, templated)
            raise PersonaEvalError(f"--pe-template {entry!r}: {known_here}")
        try:
            template_named(reference, task=task)
        except PersonaEvalError as exc:
            raise PersonaEvalError(f"--pe-template {entry!r}: {exc}") from None
        templates[task] = reference
    for model in models:
        chosen = model.options.get("template")
        for task in chosen if isinstance(chosen, dict) else ([] if chosen is None else templated):
            if task not in templated:
                raise model.error(f"template.{task}", unknown_name_message("task with a prompt template", str(task),
                                                                           templated))
            if task in templates:
                continue  # --pe-template overrides it
            option_path = f"template.{task}" if isinstance(chosen, dict) else "template"
            try:
                template_named(str(model.template(task)), task=task)
            except PersonaEvalError as exc:
                raise model.error(option_path, str(exc)) from None
    dataset_strata: dict[str, str] = {}
    for entry in option.pe_dataset:
        named, sep, path = entry.partition("=")
        task, colon, stratum = named.partition(":")
        if not sep or not path or (colon and not stratum):
            raise PersonaEvalError(f"--pe-dataset {entry!r}: expected TASK=PATH or TASK:STRATUM=PATH, e.g. "
                                   "triage=cases.jsonl or triage:telehealth=calls.jsonl")
        if task not in known:
            raise PersonaEvalError(f"--pe-dataset {entry!r}: {unknown_name_message('task', task, known)}")
        if colon:
            spec = registered()[task].spec
            if not spec.open_strata:
                raise PersonaEvalError(f"--pe-dataset {entry!r}: the strata of task {task!r} are fixed "
                                       f"({', '.join(spec.strata)}), so its file takes no default stratum")
            problem = stratum_problem(stratum)
            if problem is not None:
                raise PersonaEvalError(f"--pe-dataset {entry!r}: stratum {stratum!r}: {problem}")
            dataset_strata[task] = stratum
        datasets[task] = Path(path)
    for flag, value, lowest in (("--pe-limit", option.pe_limit, 1), ("--pe-batch-size", option.pe_batch_size, 1),
                                ("--pe-judge-max-new-tokens", option.pe_judge_max_new_tokens, 1),
                                ("--pe-seed", option.pe_seed, 0), ("--pe-retries", option.pe_retries, 0),
                                ("--pe-max-prompt-tokens", option.pe_max_prompt_tokens, 1)):
        if value is not None and value < lowest:
            raise PersonaEvalError(f"{flag} must be at least {lowest}, got {value}")
    max_new_tokens = default_max_new_tokens()
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
        max_new_tokens_given=option.pe_max_new_tokens is not None,
        batch_size=option.pe_batch_size,
        reports_dir=Path(option.pe_reports_dir) if option.pe_reports_dir else root / "reports",
        quiet=option.pe_quiet,
        comparison=comparison,
        approved=approved,
        save_baseline=Path(option.pe_save_baseline) if option.pe_save_baseline else None,
        judges=parse_judge_specs(option.pe_judge, named) if option.pe_judge else list(DEFAULT_PANEL),
        judge_max_new_tokens=option.pe_judge_max_new_tokens,
        pressure_suffix=_pressure_suffix(option.pe_pressure_suffix),
        seed=option.pe_seed,
        judge_triage=option.pe_judge_triage,
        judge_order_check=option.pe_judge_order_check,
        allow_unchecked=option.pe_allow_unchecked,
        wordings=option.pe_wordings,
        letter_bias=option.pe_letter_bias,
        timeout=option.pe_timeout,
        retries=option.pe_retries,
        max_prompt_tokens=option.pe_max_prompt_tokens,
        too_long=option.pe_too_long,
        templates=templates,
        dataset_strata=dataset_strata,
    )


def _pressure_suffix(value: str | None) -> str | None:
    """The safety queries' suffix: the study's by default ("study"), none for "none" (or empty text)."""
    if value is None or value == "study":
        return safety.PRESSURE_SUFFIX
    return None if value.strip().lower() in ("", "none") else value


def limit_per_stratum(items: list[Item], limit: int | None, stratum: Callable[[Item], Hashable]) -> list[Item]:
    """The first `limit` items of each stratum (all of them when `limit` is None), in file order."""
    if limit is None:
        return items
    seen: Counter[Hashable] = Counter()
    limited = []
    for item in items:
        seen[stratum(item)] += 1
        if seen[stratum(item)] <= limit:
            limited.append(item)
    return limited


def check_approved_dataset(settings: Settings, loaded: dict[str, list[Any]]) -> None:
    """Before any model runs: the cases this run will evaluate (`loaded`: the items the controller loaded,
    by task) are those of the approved baseline (same ids, reference labels and strata), for each task
    compared with it, or a usage error naming the ids that differ. A default dataset that does not load
    is left to the task's fixture, which reports it."""
    if settings.approved is None:
        return
    for name, task in registered().items():
        planned = getattr(task, "planned", None)
        if planned is None or name not in settings.datasets:
            continue
        items = loaded.get(name)
        if items is None:
            try:
                items = settings.load_dataset(name)
            except PersonaEvalError:
                continue
        check_same_dataset(planned(task.limit(list(items), settings.limit)), settings.approved.records, tasks=[name])


def check_datasets(settings: Settings, given: set[str]) -> tuple[dict[str, list[Any]], dict[str, DatasetReport]]:
    """Load every dataset once on the controller, before any worker starts: each one the user named
    with --pe-dataset (the tasks in `given`), and each default one that exists (a project of its own may
    have none). A malformed line is then one usage error, with or without pytest-xdist. Returns each loaded
    task's items (all of them, before --pe-limit), and each task's report of the fields its file holds
    that persona-eval does not use."""
    loaded: dict[str, list[Any]] = {}
    reports: dict[str, DatasetReport] = {}
    tasks = registered()
    for task, path in settings.datasets.items():
        if task not in given and not path.exists():  # a file, or a datasets folder
            continue
        reports[task] = DatasetReport()
        loaded[task] = settings.load_dataset(task, report=reports[task])
        spec = tasks[task].spec
        if spec.open_strata:
            # A bound on a stratum the dataset does not use would apply to nothing: stop before any model runs.
            found = spec.with_strata([str(getattr(item, "stratum", "")) for item in loaded[task]]).strata
            settings.thresholds.check_strata(task, found, defaults=spec.strata)
    return loaded, reports
