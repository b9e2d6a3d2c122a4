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

An approved baseline file (``--pe-save-baseline``) is JSON lines: a header line
``{"persona_eval_baseline": 1, "run_id": ..., "created": ..., "models": {...}, "datasets": {...}}``, then
the run's per-case records exactly as in its cases.jsonl.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from persona_eval.comparisons import APPROVED, ComparisonSettings, compare_to_approved
from persona_eval.errors import ConfigError, DataError
from persona_eval.results import json_safe
from persona_eval.thresholds import RegressionRule, _format_number, _metric_label

__all__ = [
    "BASELINE_VERSION",
    "RegressionCheck",
    "ResultSet",
    "approved_comparison",
    "check_regressions",
    "load_results",
    "save_baseline",
]

BASELINE_VERSION = 1
_HEADER_KEY = "persona_eval_baseline"
Scope = Literal["within_run", "approved"]
Status = Literal["pass", "fail", "skipped"]


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

    @property
    def blocking(self) -> bool:
        return self.status == "fail" and self.rule.mode == "fail"

    def to_json(self) -> dict[str, Any]:
        comparison = self.comparison or {}
        return {
            "scope": self.scope,
            "rule": self.rule.to_json(),
            "status": self.status,
            "blocking": self.blocking,
            "message": self.message,
            **{key: comparison.get(key) for key in (
                "model", "task", "stratum", "metric", "persona", "baseline", "baseline_model", "value",
                "baseline_value", "delta", "ci_low", "ci_high", "confidence_level", "pvalue",
                "pvalue_adjusted", "significant", "test")},
        }


def _pvalue(value: float) -> str:
    return "< 0.001" if value < 0.001 else f"= {value:.3f}"


def _against(comparison: Mapping[str, Any]) -> str:
    if comparison["baseline"] == APPROVED:
        return f"the approved baseline ({comparison.get('baseline_model')})"
    return str(comparison["baseline"])


def _check_one(rule: RegressionRule, comparison: Mapping[str, Any], scope: Scope) -> RegressionCheck:
    subject = (f"{comparison['persona']} on {comparison['model']}: {_metric_label(rule.metric)} "
               f"({rule.stratum}) vs {_against(comparison)}")
    delta, adjusted = comparison.get("delta"), comparison.get("pvalue_adjusted")
    if delta is None or adjusted is None:
        reason = comparison.get("note") or "the comparison has no p-value"
        return RegressionCheck(rule, comparison, "skipped",
                               f"SKIPPED: {subject} was not checked: {reason}.", scope)
    shown_delta = f"{delta:+.3f}" if abs(delta) < 10 else f"{delta:+.1f}"
    interval = ""
    if comparison.get("ci_low") is not None and comparison.get("ci_high") is not None:
        level = round(100 * float(comparison["confidence_level"]))
        interval = (f", {level}% CI {_format_number(comparison['ci_low'])} to "
                    f"{_format_number(comparison['ci_high'])}")
    evidence = (f"({_format_number(comparison['baseline_value'])} -> {_format_number(comparison['value'])}"
                f"{interval}, Holm-adjusted p {_pvalue(adjusted)}, {comparison['test']})")
    worse = rule.crossed_by(delta)
    significant = bool(comparison.get("significant"))
    if worse and significant:
        direction = "rose" if rule.worse == "higher" else "fell"
        verdict = "FAIL" if rule.mode == "fail" else "FAIL (record only, the session does not fail)"
        message = (f"{verdict}: {subject} {direction} by {_format_number(abs(delta))} {evidence}, beyond "
                   f"the tolerance {_format_number(rule.tolerance)}.")
        if rule.why:
            message += f" {rule.why.strip()}"
        return RegressionCheck(rule, comparison, "fail", message, scope)
    why = ("not significant" if worse else
           f"within the tolerance {_format_number(rule.tolerance)} ({rule.worse} is worse)")
    return RegressionCheck(rule, comparison, "pass", f"PASS: {subject} changed by {shown_delta} {evidence}: "
                                                     f"{why}.", scope)


def check_regressions(comparisons: Iterable[Mapping[str, Any]], rules: Sequence[RegressionRule], *,
                      scope: Scope = "within_run") -> list[RegressionCheck]:
    """Every rule on every comparison it applies to, in rule order then comparison order.

    A rule applies to a comparison of its task, metric and stratum whose persona and model pass its
    filters; within a run the comparison's baseline must also be the rule's control (``scope =
    "within_run"``), against an approved run (``scope = "approved"``) the comparisons are those with
    baseline "approved" and the rule's control is not used. A rule that applies to no comparison gives
    one skipped check saying so.
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
            checks.append(RegressionCheck(
                rule, None, "skipped",
                f"SKIPPED: no comparison of the {_metric_label(rule.metric)} ({rule.stratum}) against {against} "
                f"in this run{'' if scope == 'approved' else f' (did {rule.baseline} run?)'}, so the rule "
                "was not checked.", scope))
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
    then one record per line. Written to a temporary file then renamed, so a reader never sees half."""
    path = Path(path)
    header = {_HEADER_KEY: BASELINE_VERSION, "run_id": run_id,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "models": dict(models), "datasets": dict(datasets), "n_records": len(records)}
    lines = [json.dumps(json_safe(header), ensure_ascii=False, allow_nan=False)]
    lines += [json.dumps(json_safe(record), ensure_ascii=False, allow_nan=False) for record in records]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_text("\n".join(lines) + "\n", encoding="utf-8")
        staging.replace(path)
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
    checks = check_regressions(result["comparisons"], rules, scope="approved")
    return {
        "approved": {"source": str(approved.source), "run_id": approved.header.get("run_id"),
                     "models": approved.header.get("models"), "datasets": approved.header.get("datasets")},
        "verdict": {
            "passed": not any(check.blocking for check in checks),
            "blocking": [check.message for check in checks if check.blocking],
            "recorded": [check.message for check in checks if check.status == "fail" and not check.blocking],
        },
        "comparisons": result["comparisons"],
        "regressions": [check.to_json() for check in checks],
        "skipped": result["skipped"],
        "error": None,
    }
