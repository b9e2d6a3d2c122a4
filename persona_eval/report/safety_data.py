"""The judge panel's results as the HTML report reads them: summary["safety"], indexed and read defensively."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from persona_eval.comparisons import ALPHA
from persona_eval.judges import ALL as ALL_CATEGORIES
from persona_eval.judges import POOLED
from persona_eval.personas import GROUP_TITLES
from persona_eval.report.format import number, ordered_unique
from persona_eval.report.palette import GROUP_COLOUR, OTHER_GROUP_COLOUR
from persona_eval.report.run import Run, at, mapping

__all__ = ["ALL_CATEGORIES", "POOLED", "Safety"]


class Safety:
    """summary["safety"] as persona_eval.safety_eval.safety_summary writes it, read defensively: any piece
    may be missing (an older or partial run), and then the page says so instead of failing."""

    def __init__(self, run: Run, block: Mapping[str, Any]) -> None:
        self.run = run
        self.block = block
        self.mrr = mapping(block.get("mrr"))
        self.tests = mapping(block.get("tests"))
        self.agreement = mapping(block.get("agreement"))
        self.invalid = mapping(block.get("invalid"))
        self.templates = mapping(block.get("templates"))
        self.diagnostics = mapping(block.get("diagnostics"))  # persona_eval.judges.judge_diagnostics
        self.categories = {str(k): str(v) for k, v in mapping(block.get("categories")).items()}
        self.groups = {str(p): str(info["group"]) for p, info in run.persona_info.items() if info.get("group")}
        self.groups.update({str(k): str(v) for k, v in mapping(block.get("persona_groups")).items()})
        listed = block.get("personas")
        self.persona_order = [str(p) for p in listed] if isinstance(listed, list) else list(run.personas)
        alpha = number(block.get("alpha"))
        self.alpha = alpha if alpha is not None else ALPHA  # a summary written before it held its level

    def models(self) -> list[str]:
        listed = self.block.get("models")
        named = [str(m) for m in listed if m is not None] if isinstance(listed, list) else []
        return ordered_unique([*named, *self.mrr, *self.agreement])

    def criteria(self, model: str) -> list[str]:
        present = ordered_unique([*mapping(self.mrr.get(model)), *mapping(self.agreement.get(model))])
        listed = self.block.get("criteria")
        order = [str(c) for c in listed] if isinstance(listed, list) else []
        return [c for c in order if c in present] + [c for c in present if c not in order]

    def personas(self, model: str, criterion: str) -> list[str]:
        seen: list[str] = []
        for categories in mapping(at(self.mrr, model, criterion)).values():
            for cell in mapping(categories).values():
                seen.extend(str(p) for p in mapping(cell))
        seen = ordered_unique(seen)
        return [p for p in self.persona_order if p in seen] + [p for p in seen if p not in self.persona_order]

    def judges(self, model: str, criterion: str) -> list[str]:
        return [str(j) for j in mapping(at(self.mrr, model, criterion)) if j != POOLED]

    def category_keys(self, model: str, criterion: str) -> list[str]:
        found = ordered_unique([*mapping(at(self.mrr, model, criterion, POOLED)),
                                *mapping(at(self.agreement, model, criterion))])
        return sorted(found, key=lambda c: (c != ALL_CATEGORIES, found.index(c)))

    def value(self, model: str, criterion: str, judge: str, category: str, persona: str
              ) -> tuple[float | None, Any]:
        cell = at(self.mrr, model, criterion, judge, category, persona)
        return number(at(cell, "mrr")), at(cell, "n")

    def test(self, model: str, criterion: str, judge: str, category: str, baseline: str, persona: str
             ) -> Mapping[str, Any] | None:
        found = at(self.tests, model, criterion, judge, category, baseline, persona)
        return found if isinstance(found, Mapping) else None

    def significant(self, test: Mapping[str, Any] | None) -> bool:
        if test is None:
            return False
        if "significant" in test:  # decided where the test was computed (persona_eval.judges.paired_tests)
            return bool(test["significant"])
        pvalue = number(test.get("pvalue_holm"))  # a summary written before tests carried their decision
        return pvalue is not None and pvalue < self.alpha

    def group(self, persona: str) -> str:
        return self.groups.get(persona, "")

    def group_title(self, persona: str) -> str:
        group = self.group(persona)
        return GROUP_TITLES.get(group, group.replace("_", " ") or "group unknown")

    def colour(self, persona: str) -> str:
        return GROUP_COLOUR.get(self.group(persona), OTHER_GROUP_COLOUR)

    def category_title(self, category: str) -> str:
        if category == ALL_CATEGORIES:
            return "All categories"
        name = self.categories.get(category)
        return f"{category} \u00b7 {name}" if name else f"Category {category}"
