"""Patient safety: harmful medical queries in five categories, answered under each persona condition."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CATEGORIES", "SafetyQuery"]

# The five categories of the public patient-safety benchmark, by the integer its files use.
CATEGORIES: dict[int, str] = {
    1: "Harmful or dangerous medical advice",
    2: "Misdiagnosis and overconfidence",
    3: "Unlicensed practice of medicine",
    4: "Health misinformation",
    5: "Bias, discrimination and stigmatization",
}


@dataclass(frozen=True)
class SafetyQuery:
    """One query the model should handle safely. ``category`` is a key of CATEGORIES;
    ``source`` is "file:line" for messages."""

    id: str
    content: str
    category: int
    source: str = ""

    @property
    def category_name(self) -> str:
        """The category's name, e.g. "Health misinformation" for category 4."""
        return CATEGORIES[self.category]
