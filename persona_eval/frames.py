"""A run as pandas DataFrames, for a notebook: ``load_run("reports/latest")``.

>>> run = load_run("reports/latest")                                      # doctest: +SKIP
>>> run.metrics.query("metric == 'under_triage_rate' and stratum == 'emergency'")   # doctest: +SKIP
>>> run.metrics.pivot_table(index=["model", "persona"], columns="metric", values="value")  # doctest: +SKIP

- ``metrics``: tidy, one row per (model, task, persona, stratum, metric): ``n`` cases, ``value`` (NaN
  where the metric is undefined or not available) and ``note`` (why, or None); the values of
  summary.json's ``results``.
- ``comparisons``: one row per paired comparison (summary.json's ``comparisons``): persona against a
  control or the approved run, ``delta``, interval, p-values, ``significant`` (a nullable boolean: <NA>
  where no comparison could be made).
- ``checks``: one row per bound checked, and ``regressions`` one per regression rule, with ``status``
  ("pass", "fail", "skipped") and ``blocking``; the bound or rule itself in flat columns.
- ``cases``: one row per case record of cases.jsonl, with ``prob_<label>`` columns for the label
  probabilities of a labelled task.
- ``summary``: summary.json itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from persona_eval.errors import ConfigError
from persona_eval.results import read_json, read_jsonl

__all__ = ["RunFrames", "load_run"]

_METRIC_COLUMNS = ["model", "task", "persona", "persona_group", "stratum", "n", "metric", "value", "note"]


@dataclass(frozen=True)
class RunFrames:
    """One run's results as DataFrames (see the module docstring)."""

    metrics: pd.DataFrame
    comparisons: pd.DataFrame
    checks: pd.DataFrame
    regressions: pd.DataFrame
    cases: pd.DataFrame
    summary: dict[str, Any]


def _metrics_frame(results: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    rows = []
    for row in results:
        notes = row.get("notes") or {}
        for metric, value in (row.get("metrics") or {}).items():
            rows.append({"model": row["model"], "task": row["task"], "persona": row["persona"],
                         "persona_group": row.get("persona_group"), "stratum": row["stratum"], "n": row.get("n"),
                         "metric": metric, "value": float("nan") if value is None else float(value),
                         "note": notes.get(metric)})
    return pd.DataFrame(rows, columns=_METRIC_COLUMNS)


def _cases_frame(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    rows = []
    for record in records:
        row = dict(record)
        probs = row.get("label_probs")
        if isinstance(probs, Mapping):
            for label, probability in probs.items():
                row[f"prob_{label}"] = probability
        rows.append(row)
    return pd.DataFrame(rows)


def load_run(path: str | Path) -> RunFrames:
    """The run at `path` (a run folder such as ``reports/latest``, or its summary.json) as DataFrames.

    Raises ConfigError naming the path when it is not a finished run (no summary.json), and the reading
    errors of persona_eval.results (file and line) for a damaged file."""
    path = Path(path)
    folder = path.parent if path.name == "summary.json" else path
    summary_path = folder / "summary.json"
    if not summary_path.is_file():
        raise ConfigError(f"{path}: not a finished persona-eval run (no summary.json); give a run folder such "
                          "as reports/latest")
    summary = read_json(summary_path)
    cases_path = folder / "cases.jsonl"
    records = read_jsonl(cases_path) if cases_path.is_file() else []
    comparisons = pd.DataFrame(summary.get("comparisons") or [])
    if "significant" in comparisons:
        # A comparison that could not be made (e.g. a metric not reported) is neither: pandas' nullable boolean.
        comparisons["significant"] = comparisons["significant"].astype("boolean")
    return RunFrames(metrics=_metrics_frame(summary.get("results") or []), comparisons=comparisons,
                     # The bound or rule of each entry spread into bound_<key> / rule_<key> columns.
                     checks=pd.json_normalize(summary.get("checks") or [], sep="_", max_level=1),
                     regressions=pd.json_normalize(summary.get("regressions") or [], sep="_", max_level=1),
                     cases=_cases_frame(records), summary=summary)
