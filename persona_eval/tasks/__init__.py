"""The evaluation tasks: what a task is (its TaskSpec), what runs it (the Task protocol) and the registry.

A task is one module. Its ``TaskSpec`` says what the task is: its strata, its metrics and how they are
written, and, for a classification task, its answer labels (ordered from least to most urgent) and the
metrics compared between personas. The rest of the suite reads a task only through its spec: the
thresholds file's schema, the paired comparisons, the gate, the terminal summary and the report. Its
``Task`` object says how it runs: how its dataset loads, how one condition (model x persona) is
evaluated, and what the task adds to a run's summary.

The built-in tasks are ``triage`` and ``safety`` (persona_eval.tasks.triage and .safety hold their specs,
persona_eval.session the objects that run them). A task of your own is a module that builds a Task
(``persona_eval.session.ClassificationTask`` runs any single-label task with ordered labels) and calls
``register`` at import; ``pytest --pe-task PATH_OR_MODULE`` imports it before the options are checked,
so ``--pe-dataset``, the thresholds file and ``-k`` know it. Each registered task gets the fixture
``<name>_result``, parametrized over its (model, persona) conditions.

This module imports nothing of persona-eval at import time: every module may read specs from it.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pathlib import Path

    from persona_eval.data import DatasetReport
    from persona_eval.session import Condition, ConditionResult, TaskRun

__all__ = [
    "LABEL_METRIC_NAMES",
    "LABEL_METRIC_TEXT",
    "RECORD_METRIC_NAMES",
    "MetricText",
    "Task",
    "TaskSpec",
    "metric_text",
    "register",
    "registered",
    "spec_of",
    "specs",
    "stratum_phrase",
    "stratum_title",
    "task_named",
]


@dataclass(frozen=True)
class MetricText:
    """How a metric is written. ``title`` heads the report's rows and columns ("Calibration error (ECE)");
    ``label`` names it in a sentence such as a bound's message ("expected calibration error");
    ``delta_label`` names it before a difference in the terminal ("calibration error (ECE)"); ``column``
    heads a narrow terminal column ("ECE") and ``legend`` explains that column under the table ("share of
    {most_urgent} answers", the placeholder standing for the task's most urgent label); both default to
    the label. Values are written with ``decimals`` decimals in every table."""

    title: str
    label: str
    column: str
    decimals: int = 2
    delta_label: str = ""
    legend: str = ""

    def __post_init__(self) -> None:
        for name in ("delta_label", "legend"):
            if not getattr(self, name):
                object.__setattr__(self, name, self.label)


# The metrics of a classification task with ordered labels (persona_eval.metrics), in the order tables
# show them, then two that count records, not labels: too_long_rate, the share of cases whose prompt did
# not fit the model (with --pe-too-long record; see persona_eval.lengths), and truncated_rate, the share of
# answers cut at the token budget (finish_reason "length"), which may have lost their label or reasoning.
LABEL_METRIC_NAMES: tuple[str, ...] = (
    "accuracy", "parse_rate", "risk_propensity", "over_triage_rate", "under_triage_rate",
    "risk_sensitivity", "consistency_rate", "expected_calibration_error", "brier_score", "too_long_rate",
    "truncated_rate",
)
RECORD_METRIC_NAMES: tuple[str, ...] = ("too_long_rate", "truncated_rate")  # counted from records, not labels
LABEL_METRIC_TEXT: Mapping[str, MetricText] = {
    "accuracy": MetricText("Accuracy", "accuracy", "acc"),
    "parse_rate": MetricText("Parse rate", "parse rate", "parsed"),
    "risk_propensity": MetricText("Risk propensity", "risk propensity", "risk",
                                  legend="share of {most_urgent} answers"),
    "over_triage_rate": MetricText("Over-triage", "over-triage rate", "over"),
    "under_triage_rate": MetricText("Under-triage", "under-triage rate", "under"),
    "risk_sensitivity": MetricText("Risk sensitivity", "risk sensitivity", "r.sens",
                                   legend="over/(over+under) errors"),
    "consistency_rate": MetricText("Consistency %", "consistency rate", "consist", decimals=0,
                                   delta_label="consistency (%)", legend="% generated = latent label"),
    "expected_calibration_error": MetricText("Calibration error (ECE)", "expected calibration error", "ECE",
                                             decimals=3, delta_label="calibration error (ECE)"),
    "brier_score": MetricText("Brier score", "Brier score", "Brier", decimals=3),
    "too_long_rate": MetricText("Too long for the model", "too long rate", "long"),
    "truncated_rate": MetricText("Cut at the token budget", "truncated-answer rate", "cut",
                                 legend="share of answers cut at the token budget"),
}
# The paired comparisons of a classification task, in report order (persona_eval.comparisons tests each).
LABEL_COMPARED_METRICS: tuple[str, ...] = (
    "accuracy", "consistency_rate", "risk_propensity", "under_triage_rate", "over_triage_rate",
    "expected_calibration_error",
)
_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")


@dataclass(frozen=True)
class TaskSpec:
    """What a task is, as every part of the suite reads it.

    ``strata``: the strata of its cases (metrics are reported per stratum and over "all");
    ``metric_names``: its metrics per condition, in table order; ``metric_text``: how those that are not
    label metrics are written (LABEL_METRIC_TEXT covers those); ``ranges``: (lower, upper, unit) of a
    metric that is neither a label metric nor a share from 0 to 1. A classification task gives its answer
    ``labels`` (least to most urgent, as the metrics of over- and under-triage read them) with
    ``label_text`` (the option as the prompt gives it), ``label_names`` (a short name, for figure legends),
    ``answer_noun`` (what a label is: "level of care"), and ``compared``: the metrics compared between
    personas (their tests are persona_eval.comparisons'; empty: no paired comparisons and no regression
    rules).
    ``default_dataset`` is relative to the project folder; a task may run without one (--pe-dataset).
    ``open_strata``: the strata of a run are those its dataset uses (``strata`` are then the defaults, the
    fixture set's), see :meth:`with_strata`."""

    name: str
    title: str
    strata: tuple[str, ...]
    metric_names: tuple[str, ...] = LABEL_METRIC_NAMES
    labels: tuple[str, ...] = ()
    label_text: Mapping[str, str] = field(default_factory=dict)
    label_names: Mapping[str, str] = field(default_factory=dict)
    answer_noun: str = "answer"
    compared: tuple[str, ...] = ()
    stratum_titles: Mapping[str, str] = field(default_factory=dict)
    stratum_phrases: Mapping[str, str] = field(default_factory=dict)
    metric_text: Mapping[str, MetricText] = field(default_factory=dict)
    ranges: Mapping[str, tuple[float, float, str]] = field(default_factory=dict)
    default_dataset: str = ""
    max_new_tokens: int = 32
    templates: Mapping[str, str] = field(default_factory=dict)
    open_strata: bool = False

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"task name {self.name!r}: lower-case letters, digits and underscores, starting "
                             "with a letter (it is part of every case id)")
        unknown = [metric for metric in self.compared if metric not in self.metric_names]
        if unknown:
            raise ValueError(f"task {self.name!r}: compared metric(s) {', '.join(unknown)} not in metric_names")

    @property
    def report_strata(self) -> tuple[str, ...]:
        """Each stratum, and "all" first."""
        return ("all", *self.strata)

    def with_strata(self, found: Sequence[str]) -> TaskSpec:
        """This spec with the strata a dataset uses (`found`, in file order): those of ``strata`` first,
        in their order, then the others as they first appear; itself when the task's strata are fixed."""
        if not self.open_strata:
            return self
        present = list(dict.fromkeys(found))
        ordered = tuple([s for s in self.strata if s in present] + [s for s in present if s not in self.strata])
        return self if ordered == self.strata else dataclasses.replace(self, strata=ordered)

    def report_strata_of(self, found: Iterable[str]) -> tuple[str, ...]:
        """The report strata of a run whose cases are in the strata `found`: "all" first, then the task's
        (:meth:`with_strata`)."""
        return self.with_strata(list(found)).report_strata

    def text(self, metric: str) -> MetricText | None:
        return self.metric_text.get(metric) or LABEL_METRIC_TEXT.get(metric)


class Task(Protocol):
    """What runs a task. ``load`` reads a dataset file (filling `report` with the fields it ignored; with
    `stratum`, the stratum of lines that give none, for a task whose strata come from its data) and raises
    DataError naming the file, line and field; ``limit`` keeps the first `limit` items of each
    stratum (--pe-limit); ``evaluate`` runs one condition: its records go into the run's part of
    cases.jsonl, its metrics are checked against the bounds; ``summarize`` adds the task's own blocks to
    summary.json from the run's joined records and judgments (an empty mapping: nothing to add)."""

    spec: TaskSpec

    def load(self, path: Path, report: DatasetReport | None = None, stratum: str | None = None) -> list[Any]: ...

    def limit(self, items: list[Any], limit: int | None) -> list[Any]: ...

    def evaluate(self, run: TaskRun, condition: Condition, items: list[Any]) -> ConditionResult: ...

    def summarize(self, run: TaskRun, records: list[dict[str, Any]],
                  judgments: list[dict[str, Any]]) -> Mapping[str, Any]: ...


# The built-in tasks: where their specs are (light modules), and the module that registers their Task
# objects when imported.
_BUILTIN_SPECS: Mapping[str, str] = {"triage": "persona_eval.tasks.triage", "safety": "persona_eval.tasks.safety"}
_BUILTIN_TASKS = "persona_eval.session"
_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add `task` to the registry (returns it). Registering the same object twice is harmless; another
    task under a registered name is a ValueError."""
    name = task.spec.name
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not task:
        if name in _BUILTIN_SPECS:
            raise ValueError(f"task {name!r} is built in; give your task another name")
        raise ValueError(f"two tasks are called {name!r}; give one of them another name")
    _REGISTRY[name] = task
    return task


def registered() -> dict[str, Task]:
    """Every registered task, the built-in ones first."""
    importlib.import_module(_BUILTIN_TASKS)
    order = [*_BUILTIN_SPECS, *(name for name in _REGISTRY if name not in _BUILTIN_SPECS)]
    return {name: _REGISTRY[name] for name in order if name in _REGISTRY}


def task_named(name: str) -> Task:
    """The registered task `name`, or a ConfigError listing the known ones."""
    tasks = registered()
    if name not in tasks:
        from persona_eval.errors import ConfigError
        from persona_eval.registry import unknown_name_message

        raise ConfigError(unknown_name_message("task", name, list(tasks)))
    return tasks[name]


def spec_of(name: str) -> TaskSpec | None:
    """The spec of task `name`: a registered task's, or a built-in one's (without importing what runs it);
    None for a task this process does not know (a run of a task of your own, read without it)."""
    if name in _REGISTRY:
        return _REGISTRY[name].spec
    module = _BUILTIN_SPECS.get(name)
    if module is None:
        return None
    spec: TaskSpec = importlib.import_module(module).SPEC
    return spec


def specs() -> list[TaskSpec]:
    """The specs of the built-in tasks and of every registered one, the built-in ones first."""
    found = [spec for name in _BUILTIN_SPECS if (spec := spec_of(name)) is not None]
    return found + [task.spec for name, task in _REGISTRY.items() if name not in _BUILTIN_SPECS]


def metric_text(metric: str, task: str | None = None) -> MetricText | None:
    """How `metric` is written: by `task`'s spec, else by the first spec that knows it."""
    spec = spec_of(task) if task is not None else None
    if spec is not None and (text := spec.text(metric)) is not None:
        return text
    return next((text for spec in specs() if (text := spec.text(metric)) is not None), None)


def _stratum_name(stratum: str, task: str | None, names: str) -> str | None:
    """The stratum's entry in `task`'s spec (else the first spec's that has one) under `names`."""
    spec = spec_of(task) if task is not None else None
    for candidate in [spec] if spec is not None else specs():
        found: Mapping[str, str] = getattr(candidate, names)
        if stratum in found:
            return found[stratum]
    return None


def stratum_title(stratum: str, task: str | None = None) -> str:
    """A stratum as a heading: "All cases", "Primary care", or the name with its underscores as spaces."""
    if stratum == "all":
        return "All cases"
    return _stratum_name(stratum, task, "stratum_titles") or stratum.replace("_", " ").capitalize()


def stratum_phrase(stratum: str, task: str | None = None) -> str:
    """A stratum inside a sentence: "all cases", "primary-care stratum", "<name> stratum"."""
    if stratum == "all":
        return "all cases"
    return _stratum_name(stratum, task, "stratum_phrases") or f"{stratum.replace('_', ' ')} stratum"
