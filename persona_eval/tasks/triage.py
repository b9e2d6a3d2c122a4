"""Clinical triage: three levels of care (A < B < C in urgency), two strata, versioned prompt templates.

A = stay home / self-care, B = routine or primary care, C = emergency care. The ``emergency``
stratum holds emergency-department presentations (high acuity); ``primary_care`` holds symptom-based,
mostly lower-acuity questions. Persona effects run in opposite directions in the two strata, so every
metric is reported per stratum as well as over ``all``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from persona_eval import tasks
from persona_eval.tasks import MetricText

__all__ = [
    "INTAKE_FIELDS",
    "INTAKE_TEMPLATE_VERSION",
    "LABELS",
    "LABEL_METRIC_NAMES",
    "LABEL_TEXT",
    "MAX_NEW_TOKENS",
    "METRIC_NAMES",
    "METRIC_TEXT",
    "REPORT_STRATA",
    "SPEC",
    "STRATA",
    "STRATUM_PHRASES",
    "STRATUM_TITLES",
    "MetricText",
    "TriageCase",
    "render_intake",
]

TASK = "triage"
LABELS: tuple[str, ...] = ("A", "B", "C")
LABEL_TEXT: dict[str, str] = {
    "A": "Stay home and manage with self-care",
    "B": "Book a routine appointment with a primary care doctor",
    "C": "Go to emergency care now",
}
# The study's strata: the fixture set's and the default ones. A dataset may use others (persona_eval.data);
# the strata of a run are those of its dataset (TaskSpec.open_strata).
STRATA: tuple[str, ...] = ("emergency", "primary_care")
URGENCY: dict[str, int] = {label: rank for rank, label in enumerate(LABELS)}

# The metrics reported for this task (those of any classification task with ordered labels), in table
# order; LABEL_METRIC_NAMES are those computed from the labels, without too_long_rate and truncated_rate.
METRIC_NAMES: tuple[str, ...] = tasks.LABEL_METRIC_NAMES
LABEL_METRIC_NAMES: tuple[str, ...] = tuple(name for name in METRIC_NAMES if name not in tasks.RECORD_METRIC_NAMES)
# Report strata: each stratum of the dataset, and all cases together.
REPORT_STRATA: tuple[str, ...] = ("all", *STRATA)
# How a stratum is named: as a heading of the report, and inside a line of the terminal summary.
STRATUM_TITLES: dict[str, str] = {"all": "All cases", "emergency": "Emergency", "primary_care": "Primary care"}
STRATUM_PHRASES: dict[str, str] = {"all": "all cases", "emergency": "emergency stratum",
                                   "primary_care": "primary-care stratum"}
METRIC_TEXT = tasks.LABEL_METRIC_TEXT

# The default answer budget of a local model: "## Final Response", the letter and one sentence. The prompt
# templates are files: persona_eval/data/templates (persona_eval.templates).
MAX_NEW_TOKENS = 32
INTAKE_TEMPLATE_VERSION = "intake-v1"

SPEC = tasks.TaskSpec(
    name=TASK, title="Triage", strata=STRATA, labels=LABELS, label_text=LABEL_TEXT, answer_noun="level of care",
    label_names={"A": "self-care", "B": "primary care", "C": "emergency"},
    compared=tasks.LABEL_COMPARED_METRICS, stratum_titles=STRATUM_TITLES, stratum_phrases=STRATUM_PHRASES,
    default_dataset="fixtures/triage/vignettes.jsonl", max_new_tokens=MAX_NEW_TOKENS,
    templates={"intake": INTAKE_TEMPLATE_VERSION}, open_strata=True)

# Structured intake fields, in the order the intake template renders them.
INTAKE_FIELDS: tuple[str, ...] = (
    "age", "sex", "presenting_symptoms", "onset", "vital_signs", "history", "medications",
)


@dataclass(frozen=True)
class TriageCase:
    """One triage case. ``text`` is the vignette the model reads: given as is, or rendered from the
    structured ``intake`` fields by the intake template. ``source`` is "file:line" for messages."""

    id: str
    stratum: str
    reference: str
    rationale: str
    text: str
    source: str = ""
    intake: Mapping[str, Any] | None = field(default=None, compare=False)


def _render_vitals(vitals: Any) -> str:
    if isinstance(vitals, Mapping):
        return ", ".join(f"{name} {value}" for name, value in vitals.items())
    return str(vitals)


def _render_list(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "; ".join(str(v) for v in value) if value else "none"
    return str(value)


def render_intake(intake: Mapping[str, Any]) -> str:
    """The vignette text of a structured intake (template ``intake-v1``).

    >>> print(render_intake({"age": 67, "sex": "male", "presenting_symptoms": "slurred speech",
    ...                      "onset": "40 minutes ago", "vital_signs": {"BP": "182/96", "HR": 88}}))
    Patient: 67-year-old male.
    Presenting symptoms: slurred speech.
    Onset: 40 minutes ago.
    Vital signs: BP 182/96, HR 88.
    """
    lines = []
    age, sex = intake.get("age"), intake.get("sex")
    if age is not None or sex is not None:
        who = " ".join(p for p in (f"{age}-year-old" if age is not None else "", str(sex or "")) if p)
        lines.append(f"Patient: {who}.")
    labels = {
        "presenting_symptoms": "Presenting symptoms",
        "onset": "Onset",
        "vital_signs": "Vital signs",
        "history": "History",
        "medications": "Medications",
    }
    for key, label in labels.items():
        if intake.get(key) in (None, ""):
            continue
        value = _render_vitals(intake[key]) if key == "vital_signs" else _render_list(intake[key])
        lines.append(f"{label}: {value.rstrip('.')}.")
    return "\n".join(lines)
