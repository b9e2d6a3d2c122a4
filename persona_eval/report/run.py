"""A run as the HTML report reads it: summary.json and cases.jsonl indexed, and defensive lookups."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from persona_eval.personas import BASELINE
from persona_eval.report.format import ordered_unique
from persona_eval.report.palette import BASELINE_COLOUR, PALETTE
from persona_eval.tasks import spec_of


def at(value: Any, *keys: str) -> Any:
    """value[k1][k2]... or None where a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def mapping(value: Any) -> Mapping[str, Any]:
    """The value if it is a mapping, else an empty one (a part of the summary missing or malformed)."""
    return value if isinstance(value, Mapping) else {}


class Run:
    """summary.json and cases.jsonl, indexed the ways the page reads them."""

    def __init__(self, summary: Mapping[str, Any], cases: Sequence[Mapping[str, Any]]) -> None:
        self.summary = summary
        # The drill-down shows the answers of classification tasks; the patient-safety task's response records
        # are shown by its own section.
        self.cases = [c for c in cases if self.labels(str(c.get("task")))]
        self.results: list[Mapping[str, Any]] = list(summary.get("results") or [])
        self.persona_info = {p["id"]: p for p in summary.get("personas") or [] if isinstance(p, Mapping)}
        self.personas = ordered_unique([*self.persona_info, *(r["persona"] for r in self.results),
                                        *(c.get("persona", "") for c in self.cases)])
        self.personas = [p for p in self.personas if p]
        self._model_tasks = ordered_unique((r["model"], r["task"]) for r in self.results)
        self.rows: dict[tuple[str, str, str, str], Mapping[str, Any]] = {
            (r["model"], r["task"], r["stratum"], r["persona"]): r for r in self.results}
        raw = summary.get("comparisons")
        self.has_comparisons = isinstance(raw, list)
        self.comparisons: dict[tuple[Any, ...], Mapping[str, Any]] = {}
        for comparison in raw if isinstance(raw, list) else []:
            if isinstance(comparison, Mapping):
                key = tuple(comparison.get(k) for k in ("model", "task", "stratum", "metric", "persona", "baseline"))
                self.comparisons[key] = comparison
        self.colours = {persona: PALETTE[i % len(PALETTE)]
                        for i, persona in enumerate(p for p in self.personas if p != BASELINE)}
        self.colours[BASELINE] = BASELINE_COLOUR

    def model_tasks(self) -> list[tuple[str, str]]:
        return list(self._model_tasks)

    @staticmethod
    def labels(task: str) -> tuple[str, ...]:
        """The answer labels of a classification task (least to most urgent); empty for any other task. A
        task this process does not know is read as triage's labels."""
        spec = spec_of(task)
        known = spec_of("triage") if spec is None else spec
        return known.labels if known is not None else ()

    def strata(self, model: str, task: str) -> list[str]:
        found = ordered_unique(r["stratum"] for r in self.results if r["model"] == model and r["task"] == task)
        return sorted(found, key=lambda s: (s != "all", found.index(s)))

    def personas_of(self, model: str, task: str) -> list[str]:
        present = {r["persona"] for r in self.results if r["model"] == model and r["task"] == task}
        return [p for p in self.personas if p in present]

    def metrics_of(self, model: str, task: str) -> list[str]:
        names: list[str] = []
        for r in self.results:
            if r["model"] == model and r["task"] == task:
                names.extend(r.get("metrics", {}))
        return ordered_unique(names)

    def name(self, persona: str) -> str:
        info = self.persona_info.get(persona)
        return str(info.get("name") or persona) if info else persona

    def colour(self, persona: str) -> str:
        return self.colours.get(persona, BASELINE_COLOUR)

    def comparison(self, model: str, task: str, stratum: str, metric: str, persona: str,
                   baseline: str) -> Mapping[str, Any] | None:
        return self.comparisons.get((model, task, stratum, metric, persona, baseline))
