"""The deployment gate: persona-safety regressions found in paired comparisons, and approved baselines on disk.

A regression rule (the ``regressions`` section of a thresholds file, see :mod:`persona_eval.thresholds`) is
crossed by a comparison (see :mod:`persona_eval.comparisons`) whose delta is worse than the rule's
tolerance in the rule's ``worse`` direction AND significant after Holm adjustment. Two scopes:

``within_run``
    each persona against the rule's control (``no_persona`` by default) in the same run;
``approved``
    each persona of this run against the same persona of an approved run (``--pe-baseline``,
    ``persona-eval compare``), case by case.

A crossed ``fail`` rule fails the session; a crossed ``record`` rule is only reported.

A ``fail`` bound or rule that could not be checked (its control or its stratum did not run, fewer cases than
its ``min_cases``, no label probabilities, no p-value) is *not checked*: the gate never passes on it. The
verdict is then NOT CHECKED, with the reason and the command that would check it, and the session fails
unless ``--pe-allow-unchecked`` says the user accepts it. A crossed check stays a failure whatever its
number of cases: evidence of harm on a few cases is still evidence. ``record`` entries that could not be
checked are listed, and stay informational. Each unchecked entry carries a ``reason``, which
:func:`how_to_check` turns into the command that would check it: ``too_few_cases`` (fewer cases than
its min_cases), ``not_available`` (no label probabilities), ``not_defined`` (the metric is not defined
on these cases), ``no_stratum``, ``no_control``, ``no_persona`` (no persona beside the controls ran),
``no_pvalue``, ``no_comparison`` (none it applies to, cause unknown), ``underpowered`` (see below).

Underpowered: a rule that is not crossed has only shown something if the run could have seen the
worsening it guards against. A comparison carries its minimum detectable effect ``mde`` (see
:mod:`persona_eval.comparisons`): the smallest difference its test detects with 80% power, in the
metric's units, as the rule's tolerance. A rule that is not crossed, on a comparison whose ``mde`` is
wider than the rule's tolerance (or None: no difference detectable on so few cases), is not checked with
the reason ``underpowered``: a worsening beyond the tolerance but within the ``mde`` would most likely
have gone unseen. A crossed rule stays crossed whatever the ``mde``. A comparison without an ``mde`` field
(made before it existed) is checked as before.

An approved baseline file (``--pe-save-baseline``) is JSON lines: a header line
``{"persona_eval_baseline": 1, "run_id": ..., "created": ..., "models": {...}, "datasets": {...}}``, then
the run's per-case records exactly as in its cases.jsonl.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from persona_eval.comparisons import APPROVED, ComparisonSettings, compare_to_approved
from persona_eval.errors import ConfigError, DataError
from persona_eval.metrics import METRICS
from persona_eval.personas import BASELINE, Persona
from persona_eval.power import cases_needed, implied_discordance
from persona_eval.results import write_jsonl
from persona_eval.thresholds import BoundCheck, RegressionRule, Thresholds, format_number, metric_label

__all__ = [
    "BASELINE_VERSION",
    "POWER_METRICS",
    "STATE_WORDS",
    "RegressionCheck",
    "ResultSet",
    "approved_comparison",
    "check_bounds",
    "check_regressions",
    "gate_verdict",
    "how_to_check",
    "load_results",
    "save_baseline",
]

BASELINE_VERSION = 1
_HEADER_KEY = "persona_eval_baseline"
Scope = Literal["within_run", "approved"]
Status = Literal["pass", "fail", "skipped"]
# The verdict's status (gate_verdict), as the terminal, summary.md and the report headline it.
STATE_WORDS: Mapping[str, str] = {"passed": "PASSED", "failed": "FAILED", "not_checked": "NOT CHECKED"}

def _not_checked_prefix(mode: str) -> str:
    return "NOT CHECKED" if mode == "fail" else "SKIPPED (record only)"


# --- bounds ---------------------------------------------------------------------------------------------

def _bound_json(check: BoundCheck, *, n: int | None, reason: str | None, message: str | None = None,
                status: Status | None = None) -> dict[str, Any]:
    data = check.to_json()
    if status is not None:
        data["status"] = status
        data["blocking"] = status == "fail" and check.bound.mode == "fail"
    if message is not None:
        data["message"] = message
    data["n"] = n
    data["reason"] = reason if data["status"] == "skipped" else None
    data["not_checked"] = data["status"] == "skipped" and check.bound.mode == "fail"
    return data


def check_bounds(thresholds: Thresholds, task: str, metrics: Mapping[str, Mapping[str, Any]], *, model: str,
                 persona: Persona) -> list[dict[str, Any]]:
    """Every bound of `task` that applies to this (model, persona), checked against `metrics` ({stratum:
    {"n": cases, "metrics": {...}}}), as JSON: the bound check plus ``n``, ``reason`` (see the module docstring)
    when it could not be checked and ``not_checked`` (a ``fail`` bound that could not be checked).

    A bound that holds on fewer than its ``min_cases`` cases is not checked (too few to pass); one that is
    crossed fails whatever the number of cases."""
    values = {stratum: block["metrics"] for stratum, block in metrics.items()}
    checks = []
    for check in thresholds.check(task, values, model=model, persona=persona):
        bound = check.bound
        block = metrics.get(bound.stratum)
        n = int(block["n"]) if block is not None and block.get("n") is not None else None
        subject = f"{metric_label(bound.metric)} ({bound.stratum}) for {persona.id} on {model}"
        prefix = _not_checked_prefix(bound.mode)
        if check.status == "skipped":
            if block is None:
                reason = "no_stratum"
                text = f"{subject}: no case of the stratum '{bound.stratum}' ran"
            elif bound.metric not in block["metrics"]:
                reason, text = "not_defined", f"{subject} was not computed in this run"
            elif check.value is None:
                reason, text = "not_available", f"{subject} is not available for this model (no label probabilities)"
            else:
                reason, text = "not_defined", f"{subject} is not defined on these cases"
            message = f"{prefix}: {text}, so {bound.describe_limit()} was not checked."
            checks.append(_bound_json(check, n=n, reason=reason, message=message))
        elif check.status == "pass" and n is not None and n < bound.min_cases:
            assert check.value is not None
            message = (f"{prefix}: {subject} is {format_number(check.value)} on {n} case{'s' if n != 1 else ''}; "
                       f"{bound.describe_limit()} needs at least {bound.min_cases} (min_cases) to count as "
                       "checked.")
            checks.append(_bound_json(check, n=n, reason="too_few_cases", message=message, status="skipped"))
        else:
            checks.append(_bound_json(check, n=n, reason=None))
    return checks


# --- regression checks ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RegressionCheck:
    """The outcome of one regression rule on one comparison (or on none: a rule that matched no
    comparison of the run is one skipped check, with comparison None)."""

    rule: RegressionRule
    comparison: Mapping[str, Any] | None
    status: Status
    message: str
    scope: Scope
    reason: str | None = None

    @property
    def blocking(self) -> bool:
        return self.status == "fail" and self.rule.mode == "fail"

    @property
    def not_checked(self) -> bool:
        """A ``fail`` rule that could not be checked: the gate cannot pass on it."""
        return self.status == "skipped" and self.rule.mode == "fail"

    def to_json(self) -> dict[str, Any]:
        comparison = self.comparison or {}
        return {
            "scope": self.scope,
            "rule": self.rule.to_json(),
            "status": self.status,
            "blocking": self.blocking,
            "not_checked": self.not_checked,
            "reason": self.reason,
            "message": self.message,
            **{key: comparison.get(key) for key in (
                "model", "task", "stratum", "metric", "persona", "baseline", "baseline_model", "value",
                "baseline_value", "delta", "ci_low", "ci_high", "confidence_level", "pvalue",
                "pvalue_adjusted", "significant", "test", "n", "persona_only", "baseline_only",
                "standard_error", "mde", "mde_level", "mde_power", "family_size")},
        }


def _pvalue(value: float) -> str:
    return "< 0.001" if value < 0.001 else f"= {value:.3f}"


def _against(comparison: Mapping[str, Any]) -> str:
    if comparison["baseline"] == APPROVED:
        return f"the approved baseline ({comparison.get('baseline_model')})"
    return str(comparison["baseline"])


def _check_one(rule: RegressionRule, comparison: Mapping[str, Any], scope: Scope) -> RegressionCheck:
    subject = (f"{comparison['persona']} on {comparison['model']}: {metric_label(rule.metric)} "
               f"({rule.stratum}) vs {_against(comparison)}")
    delta, adjusted = comparison.get("delta"), comparison.get("pvalue_adjusted")
    prefix = _not_checked_prefix(rule.mode)
    if delta is None or adjusted is None:
        note = comparison.get("note") or "the comparison has no p-value"
        reason = "not_available" if "probabilit" in str(note) else "no_pvalue"
        return RegressionCheck(rule, comparison, "skipped", f"{prefix}: {subject} was not checked: {note}.",
                               scope, reason)
    shown_delta = f"{delta:+.3f}" if abs(delta) < 10 else f"{delta:+.1f}"
    interval = ""
    if comparison.get("ci_low") is not None and comparison.get("ci_high") is not None:
        level = round(100 * float(comparison["confidence_level"]))
        interval = (f", {level}% CI {format_number(comparison['ci_low'])} to "
                    f"{format_number(comparison['ci_high'])}")
    evidence = (f"({format_number(comparison['baseline_value'])} -> {format_number(comparison['value'])}"
                f"{interval}, Holm-adjusted p {_pvalue(adjusted)}, {comparison['test']})")
    worse = rule.crossed_by(delta)
    significant = bool(comparison.get("significant"))
    if worse and significant:
        direction = "rose" if rule.worse == "higher" else "fell"
        verdict = "FAIL" if rule.mode == "fail" else "FAIL (record only, the session does not fail)"
        message = (f"{verdict}: {subject} {direction} by {format_number(abs(delta))} {evidence}, beyond "
                   f"the tolerance {format_number(rule.tolerance)}.")
        if rule.why:
            message += f" {rule.why.strip()}"
        return RegressionCheck(rule, comparison, "fail", message, scope)
    why = ("not significant" if worse else
           f"within the tolerance {format_number(rule.tolerance)} ({rule.worse} is worse)")
    n = comparison.get("n")
    if isinstance(n, int) and n < rule.min_cases:
        return RegressionCheck(rule, comparison, "skipped",
                               f"{prefix}: {subject} changed by {shown_delta} {evidence} on {n} paired "
                               f"case{'s' if n != 1 else ''}; the rule needs at least {rule.min_cases} "
                               "(min_cases) to count as checked.", scope, "too_few_cases")
    if "mde" in comparison and _underpowered(rule, comparison.get("mde")):
        return RegressionCheck(rule, comparison, "skipped",
                               f"{prefix}: {subject} changed by {shown_delta} {evidence}, but was not checked: "
                               f"{_power_text(rule, comparison)}; give more cases (persona-eval power says how "
                               "many).", scope, "underpowered")
    return RegressionCheck(rule, comparison, "pass", f"PASS: {subject} changed by {shown_delta} {evidence}: "
                                                     f"{why}.", scope)


def _underpowered(rule: RegressionRule, mde: Any) -> bool:
    """Whether a worsening beyond the rule's tolerance could have gone unseen: the comparison's minimum
    detectable effect (the metric's units, as the tolerance) is wider, or nothing is detectable (None)."""
    return mde is None or float(mde) > rule.tolerance


def _power_text(rule: RegressionRule, comparison: Mapping[str, Any]) -> str:
    n, mde = comparison.get("n"), comparison.get("mde")
    if mde is None:
        return (f"on {n} paired case{'s' if n != 1 else ''} this run could not detect any worsening (no "
                f"difference reaches significance at the level {_level_text(comparison)})")
    return (f"this run could detect a worsening of {format_number(float(mde))} or more, wider than the rule's "
            f"tolerance {format_number(rule.tolerance)} (n={n})")


def _level_text(comparison: Mapping[str, Any]) -> str:
    level, size = comparison.get("mde_level"), comparison.get("family_size")
    if isinstance(level, (int, float)) and isinstance(size, int) and size > 1:
        return f"{_number_text(level * size)}/{size}"
    return _number_text(level) if isinstance(level, (int, float)) else "of the test"


def check_regressions(comparisons: Iterable[Mapping[str, Any]], rules: Sequence[RegressionRule], *,
                      scope: Scope = "within_run", personas_run: Collection[str] | None = None,
                      strata_run: Collection[tuple[str, str]] | None = None) -> list[RegressionCheck]:
    """Every rule on every comparison it applies to, in rule order then comparison order.

    A rule applies to a comparison of its task, metric and stratum whose persona and model pass its
    filters; within a run the comparison's baseline must also be the rule's control (``scope =
    "within_run"``), against an approved run (``scope = "approved"``) the comparisons are those with
    baseline "approved" and the rule's control is not used. A rule that applies to no comparison gives
    one skipped check saying why: its control (`personas_run`: the personas that ran), its stratum
    (`strata_run`: the (task, stratum) pairs that ran) or any other persona did not run.
    """
    comparisons = list(comparisons)
    checks: list[RegressionCheck] = []
    for rule in rules:
        matched = [c for c in comparisons
                   if (c["task"], c["metric"], c["stratum"]) == (rule.task, rule.metric, rule.stratum)
                   and (c["baseline"] == APPROVED if scope == "approved" else c["baseline"] == rule.baseline)
                   and rule.applies_to(model=c["model"], persona=c["persona"], persona_group=c.get("persona_group"))]
        if not matched:
            against = "the approved baseline" if scope == "approved" else rule.baseline
            if scope == "within_run" and personas_run is not None and rule.baseline not in personas_run:
                reason, why = "no_control", f"the control {rule.baseline} did not run"
            elif strata_run is not None and (rule.task, rule.stratum) not in strata_run:
                reason, why = "no_stratum", f"no {rule.task} case of the stratum '{rule.stratum}' ran"
            elif personas_run is not None:
                reason, why = "no_persona", "no persona it applies to ran beside the control"
            else:
                reason, why = "no_comparison", f"did {rule.baseline} and a persona it applies to run?"
            checks.append(RegressionCheck(
                rule, None, "skipped",
                f"{_not_checked_prefix(rule.mode)}: no comparison of the {metric_label(rule.metric)} "
                f"({rule.stratum}) against {against} in this run ({why}), so the rule was not checked.",
                scope, reason))
            continue
        checks.extend(_check_one(rule, comparison, scope) for comparison in matched)
    return checks


# --- approved baselines on disk --------------------------------------------------------------------------

@dataclass
class ResultSet:
    """Per-case records of a run, read from a run folder, its cases.jsonl, or an approved baseline file;
    `header` holds what is known of the run (run_id, models, datasets)."""

    source: Path
    header: dict[str, Any]
    records: list[dict[str, Any]]

    @property
    def label(self) -> str:
        run_id = self.header.get("run_id")
        return f"{self.source} (run {run_id})" if run_id else str(self.source)


def save_baseline(path: str | Path, records: Sequence[Mapping[str, Any]], *, run_id: str,
                  models: Mapping[str, Any], datasets: Mapping[str, Any]) -> Path:
    """Write `records` (a run's cases.jsonl lines) as an approved baseline file at `path`: a header line,
    then one record per line. Written atomically with secrets masked, as cases.jsonl is
    (:func:`persona_eval.results.write_jsonl`)."""
    path = Path(path)
    header = {_HEADER_KEY: BASELINE_VERSION, "run_id": run_id,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "models": dict(models), "datasets": dict(datasets), "n_records": len(records)}
    try:
        write_jsonl(path, [header, *records])
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write the approved baseline ({exc.strerror})") from None
    return path


def _read_lines(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text (byte {exc.start})", path=str(path)) from None
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"not valid JSON ({exc.msg})", path=str(path), line=number) from None
        if not isinstance(value, dict):
            raise DataError(f"expected a JSON object per line, got {type(value).__name__}", path=str(path),
                            line=number)
        out.append(value)
    return out


def load_results(path: str | Path) -> ResultSet:
    """The per-case records at `path`: a run folder (its cases.jsonl, and summary.json for the header), a
    cases.jsonl file, or an approved baseline file written by :func:`save_baseline`."""
    path = Path(path)
    if path.is_dir():
        cases = path / "cases.jsonl"
        if not cases.is_file():
            raise ConfigError(f"{path}: not a persona-eval run folder (no cases.jsonl); give a run folder "
                              "such as reports/latest, or an approved baseline file")
        header: dict[str, Any] = {}
        summary = path / "summary.json"
        if summary.is_file():
            try:
                document = json.loads(summary.read_text(encoding="utf-8"))
                metadata = document.get("metadata", {})
                header = {"run_id": document.get("run_id"), "models": metadata.get("models", {}),
                          "datasets": metadata.get("datasets", {})}
            except (OSError, ValueError, AttributeError):
                header = {}
        records = _read_lines(cases)
        source = path
    elif path.is_file():
        lines = _read_lines(path)
        header = {}
        if lines and _HEADER_KEY in lines[0]:
            header = lines.pop(0)
            version = header.get(_HEADER_KEY)
            if version != BASELINE_VERSION:
                raise DataError(f"approved baseline format version {version!r}; this persona-eval reads "
                                f"version {BASELINE_VERSION}", path=str(path), line=1)
        records = lines
        source = path
    else:
        raise ConfigError(f"{path}: no such run folder or baseline file")
    if not records:
        raise DataError("holds no per-case records", path=str(source))
    for number, record in enumerate(records, start=2 if header.get(_HEADER_KEY) else 1):
        missing = [f for f in ("task", "model", "persona", "case_id", "stratum", "reference") if f not in record]
        if missing:
            raise DataError(f"not a per-case record of persona-eval (no field {missing[0]!r})",
                            path=str(source if path.is_file() else path / "cases.jsonl"), line=number)
    if not header.get("run_id"):
        header["run_id"] = records[0].get("run_id")
    return ResultSet(source=source, header=header, records=records)


# --- against an approved run ----------------------------------------------------------------------------

def approved_comparison(candidate: Sequence[Mapping[str, Any]], approved: ResultSet,
                        rules: Sequence[RegressionRule], *, settings: ComparisonSettings | None = None
                        ) -> dict[str, Any]:
    """The candidate's per-case records against an approved run, with the regression rules checked:
    ``{"approved": {source, run_id, models, datasets}, "verdict": {passed, blocking, recorded},
    "comparisons": [...], "regressions": [check JSON, ...], "skipped": [...], "error": None}``, the
    verdict's lists holding the messages of the crossed rules. A changed dataset (or records that cannot
    be paired) raises DataError naming the case ids."""
    result = compare_to_approved(candidate, approved.records, settings=settings)
    strata = {(str(r.get("task")), "all") for r in candidate} | {(str(r.get("task")), str(r.get("stratum")))
                                                                 for r in candidate}
    checks = check_regressions(result["comparisons"], rules, scope="approved", strata_run=strata)
    return {
        "approved": {"source": str(approved.source), "run_id": approved.header.get("run_id"),
                     "models": approved.header.get("models"), "datasets": approved.header.get("datasets")},
        "verdict": {
            "passed": not any(check.blocking or check.not_checked for check in checks),
            "blocking": [check.message for check in checks if check.blocking],
            "not_checked": [check.message for check in checks if check.not_checked],
            "recorded": [check.message for check in checks if check.status == "fail" and not check.blocking],
        },
        "comparisons": result["comparisons"],
        "regressions": [check.to_json() for check in checks],
        "skipped": result["skipped"],
        "error": None,
    }


# --- the verdict ------------------------------------------------------------------------------------------

def _without_option(args: Sequence[str], option: str) -> list[str]:
    """`args` without `option` and its value (both ``--opt V`` and ``--opt=V``)."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == option:
            skip = True
            continue
        if arg.startswith(option + "="):
            continue
        out.append(arg)
    return out


def how_to_check(check: Mapping[str, Any], args: Sequence[str] | None) -> str:
    """What would check an entry that could not be checked, for a person to act on: a command built from
    this run's own command line (`args`, pytest's arguments) where one exists, else what to change."""
    reason = check.get("reason")
    args = list(args) if args is not None else ["evals", "-k", "triage"]
    rule = check.get("rule") or check.get("bound") or {}
    record = "or make the entry 'mode: record' in the thresholds file if it is only informational"
    if reason == "too_few_cases":
        if any(a == "--pe-limit" or a.startswith("--pe-limit=") for a in args):
            return f"rerun without --pe-limit: pytest {shlex.join(_without_option(args, '--pe-limit'))}"
        return (f"give a dataset with at least {rule.get('min_cases', 10)} cases in the stratum "
                f"'{rule.get('stratum')}' (--pe-dataset), {record}")
    if reason == "no_control":
        baseline = str(rule.get("baseline") or BASELINE)
        keyword = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "-k"), "")
        if baseline in keyword:
            task = str(rule.get("task") or "triage")
            return (f"run the control with the personas (this -k leaves {baseline} out): "
                    f"pytest {shlex.join([*_without_option(args, '-k'), '-k', task])}")
        return f"run the control with the personas: pytest {shlex.join([*args, '--pe-persona', baseline])}"
    if reason == "no_persona":
        return (f"run the personas beside the controls (a -k that selects only controls compares nothing): "
                f"pytest {shlex.join([*_without_option(args, '-k'), '-k', str(rule.get('task') or 'triage')])}")
    if reason == "no_stratum":
        return (f"give a dataset with cases in the stratum '{rule.get('stratum')}' (--pe-dataset), or drop the "
                "entry from the thresholds file")
    if reason == "not_available":
        return ("serve the model with log-probabilities (vLLM: --max-logprobs 20; models file: logprobs: true), "
                f"{record}")
    if reason == "not_defined":
        return f"check why the stratum has no readable answer (see the parse rate), {record}"
    if reason == "underpowered":
        return _how_to_power(check, rule, record)
    return f"rerun with more cases, {record}"


# The metrics `persona-eval power` plans for: shares of cases with a binary outcome.
POWER_METRICS: tuple[str, ...] = ("accuracy", "under_triage_rate", "over_triage_rate", "risk_propensity")


def _number_text(value: float) -> str:
    return f"{value:.6g}"


def _how_to_power(check: Mapping[str, Any], rule: Mapping[str, Any], record: str) -> str:
    """How many cases would check an underpowered rule, and the `persona-eval power` command that says so."""
    metric, stratum = str(rule.get("metric")), rule.get("stratum")
    tolerance, n = rule.get("tolerance"), check.get("n")
    level, size = check.get("mde_level"), check.get("family_size")
    if not isinstance(tolerance, (int, float)) or tolerance <= 0:
        return ("a tolerance of 0 cannot be shown to hold on any number of cases: give the rule the largest "
                f"worsening that does not matter as its tolerance, {record}")
    if not (isinstance(level, (int, float)) and isinstance(size, int) and isinstance(n, int) and n > 0):
        return f"give more cases in the stratum '{stratum}' (--pe-dataset), {record}"
    alpha = level * size
    scale = METRICS[metric].upper if metric in METRICS else 1.0
    difference = float(tolerance) / scale
    discordance: float | None = None
    if check.get("persona_only") is not None and check.get("baseline_only") is not None:
        discordance = (int(check["persona_only"]) + int(check["baseline_only"])) / n
    elif metric in POWER_METRICS and check.get("standard_error") is not None:
        discordance = implied_discordance(float(check["standard_error"]), n, difference=check.get("delta") or 0.0)
    needed: int | None
    if discordance is not None and difference <= 1:
        seen = f"{100 * discordance:.3g}%"
        if discordance >= difference:
            basis = f"if {seen} of the cases change, as in this run"
        else:
            basis = (f"if {100 * difference:.3g}% of the cases change, the fewest such a worsening needs; "
                     f"{seen} did in this run")
        discordance = min(1.0, max(discordance, difference))
        needed = cases_needed(difference, discordance=discordance, alpha=level)
    elif isinstance(check.get("mde"), (int, float)):
        # The minimum detectable effect shrinks as 1 / sqrt(n).
        needed = math.ceil(n * (float(check["mde"]) / float(tolerance)) ** 2)
        basis = "by the normal approximation"
        discordance = None
    else:
        return f"give more cases in the stratum '{stratum}' (--pe-dataset), {record}"
    amount = (f"about {needed} cases in the stratum '{stratum}' ({basis}; this run has {n})" if needed is not None
              else f"far more cases in the stratum '{stratum}' than this run's {n}")
    text = f"give {amount} (--pe-dataset)"
    if metric in POWER_METRICS:
        command = ["persona-eval", "power", "--metric", metric, "--difference", _number_text(difference)]
        if discordance is not None:
            command += ["--discordance", _number_text(round(discordance, 4))]
        command += ["--comparisons", str(size), "--alpha", _number_text(alpha)]
        text += f"; to plan it: {shlex.join(command)}"
    return f"{text}; {record}"


def gate_verdict(results: Sequence[Mapping[str, Any]], regressions: Sequence[Mapping[str, Any]],
                 baseline_comparison: Mapping[str, Any] | None, comparisons_error: str | None, *,
                 allow_unchecked: bool = False, args: Sequence[str] | None = None) -> dict[str, Any]:
    """The run's verdict from the cases' bound checks and the regression checks (JSON).

    ``status`` is "failed" when a ``fail`` bound or rule was crossed (or the gate could not be computed),
    else "not_checked" when a ``fail`` entry could not be checked, else "passed". ``passed`` is True for
    "passed", and for "not_checked" only with `allow_unchecked`. The lists hold messages, persona-safety
    regressions first: ``blocking`` (crossed), ``not_checked`` (with the command that would check each),
    ``recorded`` (record-only crossed), ``skipped`` (record-only not checked)."""
    blocking: list[str] = []
    recorded: list[str] = []
    skipped: list[str] = []
    not_checked: list[dict[str, Any]] = []
    checked = 0
    gate = list(regressions)
    if baseline_comparison is not None:
        gate.extend(baseline_comparison.get("regressions", []))

    def sort(check: Mapping[str, Any]) -> None:
        if check["status"] == "fail":
            (blocking if check["blocking"] else recorded).append(check["message"])
        elif check["status"] == "skipped":
            if check.get("not_checked"):
                not_checked.append({"message": check["message"], "reason": check.get("reason"),
                                    "how_to_check": how_to_check(check, args)})
            else:
                skipped.append(check["message"])

    for check in gate:
        sort(check)
    if comparisons_error:
        blocking.append(f"FAIL: the paired comparisons could not be computed, so the gate was not checked: "
                        f"{comparisons_error}")
    if baseline_comparison is not None and baseline_comparison.get("error"):
        blocking.append(f"FAIL: the comparison with the approved baseline could not be made: "
                        f"{baseline_comparison['error']}")
    for result in results:
        for check in result["checks"]:
            checked += 1
            sort(check)
    status = "failed" if blocking else "not_checked" if not_checked else "passed"
    return {"status": status, "passed": status == "passed" or (status == "not_checked" and allow_unchecked),
            "allow_unchecked": allow_unchecked, "checked": checked, "regressions_checked": len(gate),
            "blocking": blocking, "not_checked": not_checked, "recorded": recorded, "skipped": skipped,
            "blocking_regressions": [check for check in gate if check["blocking"]]}
