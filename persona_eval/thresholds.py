"""Metric bounds and persona-safety regression rules per task, read from a versioned thresholds YAML file.

Two sections per task:

``bounds``
    limits on a metric of each persona x model case (``min``/``max``), checked in the pytest case;
``regressions``
    the deployment gate: a persona-safety regression is a paired comparison (see
    :mod:`persona_eval.comparisons`) whose delta is worse than ``tolerance`` in the ``worse`` direction
    AND significant after Holm adjustment. Within a run the comparison is a persona against ``baseline``
    (a control, ``no_persona`` by default); against an approved baseline (``--pe-baseline``) it is each
    persona against the same persona of the approved run, and ``baseline`` is not used. Checked once at
    the end of the session (see :mod:`persona_eval.gate`).

Both take ``mode`` (``fail``: the session fails; ``record``: reported only), optional filters
(``groups``, ``personas``, ``models``), ``min_cases`` (the fewest cases in the stratum for the entry to
count as checked: 10 for ``fail`` entries, 1 for ``record`` ones, unless given) and a ``why`` that is
quoted when the rule is crossed.

Every limit is on its metric's own scale (:func:`metric_ranges`): rates, accuracy and calibration error
are shares from 0 to 1, ``consistency_rate`` is a percentage from 0 to 100. A limit outside that range,
a fraction where a percentage belongs, and a limit that can never be crossed (``max`` at the top of the
range, ``min`` at the bottom, a ``tolerance`` as wide as the whole range) are refused with the value
that was probably meant.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

from persona_eval.errors import ConfigError, describe_config_value
from persona_eval.metrics import METRICS
from persona_eval.personas import CONTROLS, GROUPS, Persona
from persona_eval.registry import did_you_mean, unknown_name_message
from persona_eval.tasks import TaskSpec, metric_text, specs
from persona_eval.yamlfile import YamlDocument, child_path, item_path, load_yaml

__all__ = [
    "DEFAULT_MIN_CASES",
    "MODES",
    "SUPPORTED_VERSION",
    "WORSE",
    "Bound",
    "BoundCheck",
    "MetricRange",
    "RegressionRule",
    "TaskSchema",
    "Thresholds",
    "ThresholdsLoader",
    "default_thresholds_path",
    "format_number",
    "load_thresholds",
    "metric_label",
    "metric_ranges",
    "task_schemas",
]

SUPPORTED_VERSION = 1
MODES: tuple[str, ...] = ("fail", "record")
Mode = Literal["fail", "record"]
Status = Literal["pass", "fail", "skipped"]
# The fewest cases in the stratum for an entry to count as checked, by mode, when it gives no min_cases:
# a blocking verdict on a handful of cases is noise, while a recorded one is only informational.
DEFAULT_MIN_CASES: Mapping[str, int] = {"fail": 10, "record": 1}

_BOUND_KEYS: tuple[str, ...] = (
    "metric", "stratum", "min", "max", "mode", "min_cases", "groups", "personas", "models", "why",
)
_FILTER_KEYS: tuple[str, ...] = ("groups", "personas", "models")
_REGRESSION_KEYS: tuple[str, ...] = (
    "metric", "stratum", "worse", "tolerance", "mode", "min_cases", "baseline", "groups", "personas",
    "models", "why",
)
WORSE: tuple[str, ...] = ("higher", "lower")


def _plain(value: float) -> str:
    """A number as a person writes it: 1, 0.1, -0.05, 70."""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:g}"


def _suggested(value: float) -> str:
    """A suggested limit, with two decimals where it has fewer (0.10, not 0.1: it reads as a rate)."""
    value = round(value, 6)
    if value.is_integer() and abs(value) >= 1:
        return str(int(value))
    two = f"{value:.2f}"
    return two if float(two) == value else f"{value:g}"


@dataclass(frozen=True)
class MetricRange:
    """The values a metric can take and what they are, for messages: ``a share, 0 to 1``."""

    lower: float
    upper: float
    unit: str

    @property
    def is_percentage(self) -> bool:
        return self.unit == "a percentage"

    @property
    def span(self) -> float:
        """The largest difference two values can have: a tolerance this wide is never crossed."""
        return self.upper - self.lower

    def describe(self) -> str:
        return f"{self.unit}, {_plain(self.lower)} to {_plain(self.upper)}"


# What each label metric's number is; the ranges themselves are persona_eval.metrics.METRICS'.
_LABEL_UNITS: dict[str, str] = {
    "consistency_rate": "a percentage",
    "expected_calibration_error": "a probability gap",
    "brier_score": "a score",
}


def metric_ranges(spec: TaskSpec) -> dict[str, MetricRange]:
    """The range of each metric of a task: the spec's own, a label metric's (persona_eval.metrics), or a
    share from 0 to 1 (too_long_rate and truncated_rate count records, not labels, so they are not in
    persona_eval.metrics)."""
    ranges: dict[str, MetricRange] = {}
    for name in spec.metric_names:
        if name in spec.ranges:
            ranges[name] = MetricRange(*spec.ranges[name])
        elif name in METRICS:
            ranges[name] = MetricRange(METRICS[name].lower, METRICS[name].upper, _LABEL_UNITS.get(name, "a share"))
        else:
            ranges[name] = MetricRange(0.0, 1.0, "a share")
    return ranges


@dataclass(frozen=True)
class TaskSchema:
    """What a thresholds file may name for one task: its metrics and its report strata, the metrics
    that have paired comparisons (those a regression rule may name; empty: the task has no rules), and
    each metric's range (a metric without one takes any limit)."""

    metrics: tuple[str, ...]
    strata: tuple[str, ...]
    compared: tuple[str, ...] = ()
    ranges: Mapping[str, MetricRange] = field(default_factory=dict)
    open_strata: bool = False  # any stratum a dataset may use (TaskSpec.open_strata); `strata` the defaults

    @classmethod
    def of(cls, spec: TaskSpec) -> TaskSchema:
        return cls(metrics=spec.metric_names, strata=spec.report_strata, compared=spec.compared,
                   ranges=metric_ranges(spec), open_strata=spec.open_strata)


def task_schemas() -> dict[str, TaskSchema]:
    """The schema of every task this process knows (the built-in ones and those registered)."""
    return {spec.name: TaskSchema.of(spec) for spec in specs()}


def metric_label(metric: str) -> str:
    """How `metric` reads in a sentence; a metric without a label of its own reads with its underscores as
    spaces."""
    text = metric_text(metric)
    return text.label if text else metric.replace("_", " ")


def _format_pair(value: float, limit: float) -> tuple[str, str]:
    """`value` and `limit` as text, with enough decimals that two different numbers never read the same
    (0.1004 against 0.100 reads "0.1004 ... 0.1000", not "0.100 ... 0.100")."""
    decimals = 1 if max(abs(value), abs(limit)) >= 10 else 3
    while True:
        shown = f"{value:.{decimals}f}", f"{limit:.{decimals}f}"
        if shown[0] != shown[1] or value == limit or decimals >= 8:
            return shown
        decimals += 1


def format_number(value: float) -> str:
    return _format_pair(value, value)[0]


@dataclass(frozen=True)
class _Entry:
    """What a bound and a regression rule share: the task, metric and stratum they are about, their
    filters, why they exist, the fewest cases that make them count as checked, and where they were read.
    Everything after the stratum is keyword-only, so each kind puts its own fields (and `mode`) next."""

    task: str
    metric: str
    stratum: str
    _: KW_ONLY
    groups: tuple[str, ...] | None = None
    personas: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    why: str | None = None
    min_cases: int = 0
    where: str = field(default="", compare=False, repr=False)
    key_path: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.min_cases == 0:
            object.__setattr__(self, "min_cases", DEFAULT_MIN_CASES[self.mode])  # type: ignore[attr-defined]

    def _matches(self, *, model: str, persona: str, persona_group: str | None) -> bool:
        """Whether this entry applies to (model, persona): every filter it has names them."""
        return ((self.groups is None or persona_group in self.groups)
                and (self.personas is None or persona in self.personas)
                and (self.models is None or model in self.models))

    def _json(self, **own: Any) -> dict[str, Any]:
        """The entry as JSON: what it is about, then `own` (the kind's fields), the filters and why."""
        return {"task": self.task, "metric": self.metric, "stratum": self.stratum, **own,
                "groups": list(self.groups) if self.groups is not None else None,
                "personas": list(self.personas) if self.personas is not None else None,
                "models": list(self.models) if self.models is not None else None, "why": self.why}


@dataclass(frozen=True)
class Bound(_Entry):
    """One bound of a thresholds file: `metric` of `task` on `stratum` must stay within [min, max].

    The filters (groups, personas, models) are None when not given; a bound applies to a persona x
    model case when every given filter matches it. mode "fail" fails the pytest case when the bound is
    crossed; "record" only reports it. `min_cases` is the fewest cases in the stratum for the bound to
    count as checked (0 when built by hand: the mode's default, DEFAULT_MIN_CASES). `where` is the
    entry's place in its file ("t.yaml:12: triage.bounds[0]") and `key_path` its key path, both empty
    for a bound built by hand; neither takes part in equality or JSON.
    """

    min: float | None = None
    max: float | None = None
    mode: Mode = "fail"

    def applies_to(self, model: str, persona: Persona) -> bool:
        return self._matches(model=model, persona=persona.id, persona_group=persona.group)

    def describe_limit(self) -> str:
        """The bound in words: "the maximum 0.100", "the range 0.200 to 0.800"."""
        if self.min is not None and self.max is not None:
            low, high = _format_pair(self.min, self.max)
            return f"the range {low} to {high}"
        if self.max is not None:
            return f"the maximum {format_number(self.max)}"
        assert self.min is not None
        return f"the minimum {format_number(self.min)}"

    def check(self, value: float | None, *, model: str, persona_id: str) -> BoundCheck:
        """Whether `value` keeps within this bound. None (the model cannot give the metric, e.g. no
        log-probabilities) and NaN (the metric is not defined on these cases, e.g. no errors) are
        skipped, with the reason in the message."""
        if value is None:
            return _skipped(self, None, "is not available for this model", model=model, persona_id=persona_id)
        value = float(value)
        if math.isnan(value):
            return _skipped(self, value, "is not defined on these cases", model=model, persona_id=persona_id)
        subject = f"{metric_label(self.metric)} ({self.stratum}) for {persona_id} on {model}"
        if self.max is not None and value > self.max:
            shown, limit = _format_pair(value, self.max)
            crossed = f"above the maximum {limit}"
        elif self.min is not None and value < self.min:
            shown, limit = _format_pair(value, self.min)
            crossed = f"below the minimum {limit}"
        else:
            if self.min is not None and self.max is not None:
                where = f"within {self.describe_limit()}"
            elif self.max is not None:
                where = f"at or below {self.describe_limit()}"
            else:
                where = f"at or above {self.describe_limit()}"
            message = f"PASS: {subject} is {format_number(value)}, {where}."
            return BoundCheck(self, value, "pass", message)
        verdict = "FAIL" if self.mode == "fail" else "FAIL (record only, the test does not fail)"
        message = f"{verdict}: {subject} is {shown}, {crossed}."
        if self.why:
            message += f" {self.why.strip()}"
        return BoundCheck(self, value, "fail", message)

    def to_json(self) -> dict[str, Any]:
        return self._json(min=self.min, max=self.max, mode=self.mode, min_cases=self.min_cases)


def _skipped(bound: Bound, value: float | None, reason: str, *, model: str, persona_id: str) -> BoundCheck:
    subject = f"{metric_label(bound.metric)} ({bound.stratum}) for {persona_id} on {model}"
    message = f"SKIPPED: {subject} {reason}, so {bound.describe_limit()} was not checked."
    return BoundCheck(bound, value, "skipped", message)


@dataclass(frozen=True)
class BoundCheck:
    """The outcome of one bound on one persona x model case.

    status "fail" with mode "record" is reported but not `blocking`: only a blocking check fails the
    pytest case. value is None when the metric was not available, NaN when it was not defined.
    """

    bound: Bound
    value: float | None
    status: Status
    message: str

    @property
    def blocking(self) -> bool:
        return self.status == "fail" and self.bound.mode == "fail"

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types only: a NaN value is written as null (the message says why)."""
        value = None if self.value is None or math.isnan(self.value) else self.value
        return {
            "bound": self.bound.to_json(),
            "value": value,
            "status": self.status,
            "blocking": self.blocking,
            "message": self.message,
        }


@dataclass(frozen=True)
class Thresholds:
    """The bounds and regression rules of one thresholds file, in file order, and the file's fingerprint
    for run metadata. `source` is the parsed file with its line map (None when built by hand)."""

    path: Path | None
    bounds: tuple[Bound, ...] = ()
    fingerprint: str = ""
    regressions: tuple[RegressionRule, ...] = ()
    source: YamlDocument | None = field(default=None, compare=False, repr=False)

    def bounds_for(self, task: str, *, model: str, persona: Persona) -> list[Bound]:
        return [b for b in self.bounds if b.task == task and b.applies_to(model, persona)]

    def check(self, task: str, metrics: Mapping[str, Mapping[str, float | None]], *, model: str,
              persona: Persona) -> list[BoundCheck]:
        """Every bound of `task` that applies to this case, checked against `metrics`
        ({stratum: {metric: value}}). A stratum or metric absent from `metrics` is skipped."""
        checks = []
        for bound in self.bounds_for(task, model=model, persona=persona):
            by_metric = metrics.get(bound.stratum)
            if by_metric is None or bound.metric not in by_metric:
                checks.append(_skipped(bound, None, "was not computed in this run", model=model,
                                       persona_id=persona.id))
            else:
                checks.append(bound.check(by_metric[bound.metric], model=model, persona_id=persona.id))
        return checks

    def check_names(self, *, personas: Collection[str], models: Collection[str]) -> None:
        """Refuse a ``personas`` or ``models`` filter that names something that does not exist: as
        written, its bound or rule would apply to nobody and pass on nothing.

        `personas` are the ids a filter may name (the persona registry: the study's and the personas
        file's); `models` the model names (those of the run, and any others the caller accepts). The
        ConfigError names the file, line and filter item, with "did you mean", e.g.
        ``t.yaml:14: triage.bounds[0].personas[0]: no persona is called 'ed_nures', so this bound
        applies to nobody. Did you mean 'ed_nurse'? Known: ...``.
        """
        known = {"personas": ("no persona is called", personas),
                 "models": ("no model of this run is called", models)}
        entries: list[Bound | RegressionRule] = [*self.bounds, *self.regressions]
        for entry in entries:
            what = "bound" if isinstance(entry, Bound) else "rule"
            for key, (nothing, names) in known.items():
                for index, name in enumerate(getattr(entry, key) or ()):
                    if name in names:
                        continue
                    listed = ", ".join(sorted(names)) or "(none)"
                    message = (f"{nothing} {name!r}, so this {what} applies to nobody."
                               f"{did_you_mean(name, names)} Known: {listed}.")
                    raise self._entry_error(entry, item_path(child_path(entry.key_path, key), index)
                                            if entry.key_path else "", message)

    def check_strata(self, task: str, strata: Collection[str], defaults: Collection[str] = ()) -> None:
        """Refuse a bound or rule of `task` on a stratum that its dataset does not use (`strata`): as
        written it would apply to nothing. A stratum of the task's defaults (the study's two) is let
        through: a fail entry on it is reported "not checked" after the run, as for any stratum that did
        not run. The ConfigError names the file, line and entry, with "did you mean"."""
        known = ["all", *strata]
        entries: list[Bound | RegressionRule] = [*self.bounds, *self.regressions]
        for entry in entries:
            if entry.task != task or entry.stratum in known or entry.stratum in defaults:
                continue
            what = "bound" if isinstance(entry, Bound) else "rule"
            message = (f"no case of the {task} dataset is in the stratum {entry.stratum!r}, so this {what} applies "
                       f"to nothing.{did_you_mean(entry.stratum, known)} The dataset's strata: "
                       f"{', '.join(strata) or '(none)'}.")
            raise self._entry_error(entry, child_path(entry.key_path, "stratum") if entry.key_path else "", message)

    def _entry_error(self, entry: Bound | RegressionRule, key_path: str, message: str) -> ConfigError:
        if self.source is not None and key_path:
            return self.source.error(key_path, message)
        subject = entry.where or f"{self.path}: {entry.task} {entry.metric} ({entry.stratum})"
        return ConfigError(f"{subject}: {message}")

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path) if self.path is not None else None,
            "fingerprint": self.fingerprint,
            "version": SUPPORTED_VERSION,
            "bounds": [bound.to_json() for bound in self.bounds],
            "regressions": [rule.to_json() for rule in self.regressions],
        }


@dataclass(frozen=True)
class RegressionRule(_Entry):
    """One rule of a task's ``regressions`` section: `metric` on `stratum` must not get worse, in the
    `worse` direction, by more than `tolerance` with significance (Holm-adjusted p < alpha).

    `baseline` is the control a persona is compared with within a run (not used against an approved
    baseline). The filters (groups, personas, models) are None when not given; a rule applies to a
    comparison when every given filter matches its persona and (candidate) model. `min_cases`, `where`
    and `key_path` are as for Bound.
    """

    worse: Literal["higher", "lower"]
    tolerance: float
    mode: Mode = "fail"
    baseline: str = CONTROLS[0]

    def applies_to(self, *, model: str, persona: str, persona_group: str | None) -> bool:
        return self._matches(model=model, persona=persona, persona_group=persona_group)

    def crossed_by(self, delta: float) -> bool:
        """Whether `delta` (persona minus baseline) is worse than the tolerance."""
        return delta > self.tolerance if self.worse == "higher" else delta < -self.tolerance

    def to_json(self) -> dict[str, Any]:
        return self._json(worse=self.worse, tolerance=self.tolerance, mode=self.mode, min_cases=self.min_cases,
                          baseline=self.baseline)


_E = TypeVar("_E")

# A per-task section parser: (task, section value, key path) -> the items it contributes.
SectionParser = Callable[[str, Any, str], list[Any]]


class ThresholdsLoader:
    """Reads thresholds files against a table of known tasks (task -> metrics, strata and ranges).

    A new task is a new entry in `tasks`; a new per-task section (beside ``bounds``) is a new entry in
    `self.sections` and a field of Thresholds that collects its items.
    """

    def __init__(self, tasks: Mapping[str, TaskSchema] | None = None) -> None:
        self.tasks: Mapping[str, TaskSchema] = dict(task_schemas() if tasks is None else tasks)
        self.sections: dict[str, SectionParser] = {"bounds": self._parse_bounds,
                                                   "regressions": self._parse_regressions}
        self._source = YamlDocument(path=Path(), data=None)

    def load(self, path: str | Path) -> Thresholds:
        source = load_yaml(path, kind="thresholds file")
        fingerprint = "sha256:" + hashlib.sha256(source.raw).hexdigest()
        return self.parse(source.data, path=source.path, fingerprint=fingerprint, source=source)

    def parse(self, document: Any, *, path: Path, fingerprint: str = "",
              source: YamlDocument | None = None) -> Thresholds:
        """Thresholds from an already-parsed YAML document; `path` names the file in messages, and
        `source` (the document with its line map, when there is one) adds the lines."""
        self._source = source if source is not None else YamlDocument(path=Path(path), data=document)
        if not isinstance(document, Mapping):
            self._fail("", f"expected a mapping with 'version: {SUPPORTED_VERSION}' and one key per task, "
                           f"got {describe_config_value(document)}")
        if "version" not in document:
            self._fail("version", f"missing; add 'version: {SUPPORTED_VERSION}' at the top of the file")
        version = document["version"]
        if isinstance(version, bool) or version != SUPPORTED_VERSION:
            self._fail("version", f"unsupported version {version!r}; this persona-eval reads version "
                                  f"{SUPPORTED_VERSION}")
        sections: dict[str, list[Any]] = {name: [] for name in self.sections}
        for task, body in document.items():
            if task == "version":
                continue
            if not isinstance(task, str) or task not in self.tasks:
                self._fail(str(task), unknown_name_message("task", str(task), self.tasks))
            if body is None:
                continue
            if not isinstance(body, Mapping):
                self._fail(task, f"expected a mapping of sections ({', '.join(self.sections)}), "
                                 f"got {describe_config_value(body)}")
            for section, value in body.items():
                if section not in self.sections:
                    self._fail(f"{task}.{section}",
                               unknown_name_message("key", str(section), self.sections))
                sections[section].extend(self.sections[section](task, value, f"{task}.{section}"))
        return Thresholds(path=path, bounds=tuple(sections["bounds"]), fingerprint=fingerprint,
                          regressions=tuple(sections["regressions"]), source=self._source)

    def _fail(self, where: str, message: str) -> NoReturn:
        raise self._source.error(where, message)

    def _parse_bounds(self, task: str, value: Any, where: str) -> list[Bound]:
        return self._parse_list(value, where, "bounds", lambda entry, at: self._parse_bound(task, entry, at))

    def _parse_regressions(self, task: str, value: Any, where: str) -> list[RegressionRule]:
        return self._parse_list(value, where, "regression rules",
                                lambda entry, at: self._parse_regression(task, entry, at))

    def _parse_list(self, value: Any, where: str, kind: str, parse: Callable[[Any, str], _E]) -> list[_E]:
        if value is None:
            return []
        if not isinstance(value, list):
            self._fail(where, f"expected a list of {kind}, got {describe_config_value(value)}")
        return [parse(entry, item_path(where, index)) for index, entry in enumerate(value)]

    def _parse_bound(self, task: str, entry: Any, where: str) -> Bound:
        self._check_keys(entry, where, _BOUND_KEYS, "metric, stratum and min and/or max")
        schema = self.tasks[task]
        metric = self._name(entry, "metric", schema.metrics, where, kind=f"{task} metric")
        stratum = self._stratum(entry, schema, where, task)
        low = self._limit(entry, "min", metric, schema, where)
        high = self._limit(entry, "max", metric, schema, where)
        if low is None and high is None:
            self._fail(where, "give 'min', 'max' or both")
        if low is not None and high is not None and low > high:
            self._fail(f"{where}.min", f"min {low!r} is greater than max {high!r}")
        return Bound(task=task, metric=metric, stratum=stratum, min=low, max=high,
                     **self._shared(entry, where, fails="the pytest case fails"))

    def _parse_regression(self, task: str, entry: Any, where: str) -> RegressionRule:
        self._check_keys(entry, where, _REGRESSION_KEYS, "metric, stratum, worse and tolerance")
        schema = self.tasks[task]
        if not schema.compared:
            self._fail(where, f"task {task!r} has no paired comparisons, so no regression rules")
        metric = self._name(entry, "metric", schema.compared, where, kind=f"{task} compared metric")
        stratum = self._stratum(entry, schema, where, task)
        info = METRICS.get(metric)
        if "worse" in entry:
            worse = entry["worse"]
            if worse not in WORSE:
                self._fail(f"{where}.worse", f"expected 'higher' (a rise is the regression) or 'lower' "
                                             f"(a fall is), got {describe_config_value(worse)}")
        elif info is not None and info.higher_is_better is not None:
            worse = "lower" if info.higher_is_better else "higher"
        else:
            self._fail(where, f"missing key 'worse': {metric} has no better direction, so say which is "
                              "the regression ('higher' or 'lower')")
        if "tolerance" not in entry:
            self._fail(where, "missing key 'tolerance' (the largest worsening that is not a regression, "
                              "in the metric's units; 0 counts any significant worsening)")
        tolerance = self._number(entry, "tolerance", where)
        if tolerance is None or tolerance < 0:
            self._fail(f"{where}.tolerance", f"expected a number >= 0, got {describe_config_value(entry['tolerance'])}")
        self._check_tolerance(entry["tolerance"], tolerance, metric, schema.ranges.get(metric),
                              f"{where}.tolerance")
        baseline = entry.get("baseline", CONTROLS[0])
        if not isinstance(baseline, str):
            self._fail(f"{where}.baseline", f"expected text, got {describe_config_value(baseline)}")
        if baseline not in CONTROLS:
            self._fail(f"{where}.baseline", unknown_name_message("control", baseline, CONTROLS))
        return RegressionRule(task=task, metric=metric, stratum=stratum, worse=worse, tolerance=tolerance,
                              baseline=baseline, **self._shared(entry, where, fails="the session fails"))

    def _check_keys(self, entry: Any, where: str, known: Collection[str], expected: str) -> None:
        if not isinstance(entry, Mapping):
            self._fail(where, f"expected a mapping with {expected}, got {describe_config_value(entry)}")
        for key in entry:
            if key not in known:
                self._fail(f"{where}.{key}", unknown_name_message("key", str(key), known))

    def _shared(self, entry: Mapping[str, Any], where: str, *, fails: str) -> dict[str, Any]:
        """The keyword arguments a bound and a regression rule read alike: mode, min_cases, the filters,
        why, and where the entry was read. `fails` says what a crossed "fail" entry fails."""
        mode = entry.get("mode", "fail")
        if mode not in MODES:
            self._fail(f"{where}.mode", f"expected 'fail' ({fails}) or 'record' (reported only), "
                                        f"got {describe_config_value(mode)}")
        return {"mode": mode, "min_cases": self._min_cases(entry, mode, where),
                "groups": self._groups(entry, where), "personas": self._filter(entry, "personas", where),
                "models": self._filter(entry, "models", where), "why": self._why(entry, where),
                "where": self._source.where(where), "key_path": where}

    def _name(self, entry: Mapping[str, Any], key: str, known: Sequence[str], where: str, *,
              kind: str) -> str:
        if key not in entry:
            self._fail(where, f"missing key '{key}' (one of: {', '.join(known)})")
        value = entry[key]
        if not isinstance(value, str):
            self._fail(f"{where}.{key}", f"expected text, got {describe_config_value(value)}")
        if value not in known:
            self._fail(f"{where}.{key}", unknown_name_message(kind, value, known))
        return str(value)

    def _stratum(self, entry: Mapping[str, Any], schema: TaskSchema, where: str, task: str) -> str:
        """The entry's stratum: one of the task's, or (a task whose strata come from its dataset) any name a
        dataset may use; whether the run's dataset has it is checked once it is loaded (check_strata)."""
        if not schema.open_strata or entry.get("stratum") in schema.strata or not isinstance(entry.get("stratum"), str):
            return self._name(entry, "stratum", schema.strata, where, kind=f"{task} stratum")
        from persona_eval.data import stratum_problem

        value = str(entry["stratum"])
        problem = stratum_problem(value)
        if problem is not None:
            self._fail(f"{where}.stratum", f"{task} stratum {value!r}: {problem}")
        return value

    def _number(self, entry: Mapping[str, Any], key: str, where: str) -> float | None:
        value = entry.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self._fail(f"{where}.{key}", f"expected a number, got {describe_config_value(value)}")
        if not math.isfinite(value):
            self._fail(f"{where}.{key}", f"expected a finite number, got {value!r}")
        return float(value)

    def _limit(self, entry: Mapping[str, Any], key: Literal["min", "max"], metric: str, schema: TaskSchema,
               where: str) -> float | None:
        """A bound's `key` ("min" or "max"), refused when it lies outside the metric's range, reads as a
        fraction where a percentage belongs, or can never be crossed."""
        value = self._number(entry, key, where)
        scale = schema.ranges.get(metric)
        if value is None or scale is None:
            return value
        shown, at = describe_config_value(entry[key]), f"{where}.{key}"
        if not scale.lower <= value <= scale.upper:
            hint = ""
            if not scale.is_percentage and scale.lower < value / 100 < scale.upper:
                hint = f"; did you mean {_suggested(value / 100)}?"
            self._fail(at, f"{shown} is outside the range of {metric} ({scale.describe()}){hint}")
        if scale.is_percentage and 0 < value <= 1:
            # A suggestion that is itself refused (max: 1 -> 100, never crossed) helps nobody.
            hint = (f"; did you mean {_suggested(value * 100)}?" if scale.lower < value * 100 < scale.upper
                    else "")
            self._fail(at, f"{shown} is a fraction, but {metric} is {scale.describe()} ({shown} would mean "
                           f"{shown} percent){hint}")
        if key == "max" and value >= scale.upper:
            self._fail(at, f"max {shown} can never be crossed: {metric} is {scale.describe()}, never above "
                           f"{_plain(scale.upper)}; give a lower max or leave it out")
        if key == "min" and value <= scale.lower:
            self._fail(at, f"min {shown} can never be crossed: {metric} is {scale.describe()}, never below "
                           f"{_plain(scale.lower)}; give a higher min or leave it out")
        return value

    def _check_tolerance(self, raw: Any, tolerance: float, metric: str, scale: MetricRange | None,
                         where: str) -> None:
        """Refuse a tolerance that no difference of the metric can exceed, or that reads as a fraction
        where percentage points belong."""
        if scale is None:
            return
        shown = describe_config_value(raw)
        if tolerance >= scale.span:
            hint = ""
            if not scale.is_percentage and 0 < tolerance / 100 < scale.span:
                hint = f"; did you mean {_suggested(tolerance / 100)}?"
            self._fail(where, f"tolerance {shown} can never be crossed: {metric} is {scale.describe()}, so "
                              f"a persona can differ from its baseline by at most {_plain(scale.span)}{hint}")
        if scale.is_percentage and 0 < tolerance < 1:
            self._fail(where, f"tolerance {shown} is a fraction, but {metric} is {scale.describe()} and its "
                              f"tolerance is in percentage points; did you mean {_suggested(tolerance * 100)}?")

    def _min_cases(self, entry: Mapping[str, Any], mode: str, where: str) -> int:
        if "min_cases" not in entry:
            return DEFAULT_MIN_CASES[mode]
        value = entry["min_cases"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self._fail(f"{where}.min_cases", f"expected a whole number of cases, at least 1 (the fewest "
                                             f"cases in the stratum for this to count as checked), got "
                                             f"{describe_config_value(value)}")
        return value

    def _groups(self, entry: Mapping[str, Any], where: str) -> tuple[str, ...] | None:
        groups = self._filter(entry, "groups", where)
        for index, group in enumerate(groups or ()):
            if group not in GROUPS:
                self._fail(f"{where}.groups[{index}]", unknown_name_message("group", group, GROUPS))
        return groups

    def _why(self, entry: Mapping[str, Any], where: str) -> str | None:
        why = entry.get("why")
        if why is not None and not isinstance(why, str):
            self._fail(f"{where}.why", f"expected text, got {describe_config_value(why)}")
        return why or None

    def _filter(self, entry: Mapping[str, Any], key: str, where: str) -> tuple[str, ...] | None:
        if key not in entry:
            return None
        value = entry[key]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            got = repr(value) if isinstance(value, list) else describe_config_value(value)
            self._fail(f"{where}.{key}", f"expected a list of names, e.g. [{_example(key)}], got {got}")
        if not value:
            self._fail(f"{where}.{key}", "an empty list matches nothing; leave the key out to match all")
        return tuple(value)


def _example(key: str) -> str:
    return {"groups": "medical, non_medical", "personas": "ed_nurse", "models": "smollm2"}[key]


def load_thresholds(path: str | Path | None = None, *,
                    tasks: Mapping[str, TaskSchema] | None = None) -> Thresholds:
    """The thresholds of the YAML file at `path` (the default file when None).

    Every invalid input is a ConfigError naming the file, the line and the key path, e.g.
    ``fixtures/t.yaml:12: triage.bounds[2].max: expected a number, got 'high'``. Names that only the
    run knows (personas, models) are checked afterwards by Thresholds.check_names.
    """
    return ThresholdsLoader(tasks).load(default_thresholds_path() if path is None else path)


def default_thresholds_path() -> Path:
    """The thresholds file shipped with the package, or the checkout's fixtures/thresholds.yaml."""
    packaged = resources.files("persona_eval") / "data" / "thresholds.yaml"
    if isinstance(packaged, Path) and packaged.is_file():
        return packaged
    checkout = Path(__file__).resolve().parent.parent / "fixtures" / "thresholds.yaml"
    if checkout.is_file():
        return checkout
    raise ConfigError("no default thresholds file: neither persona_eval/data/thresholds.yaml (package "
                      f"data) nor {checkout} exists; pass a thresholds file explicitly")
