"""The HTML report's names for metrics, strata, the controls, judging criteria and persona groups."""

from __future__ import annotations

from persona_eval.judges import CRITERIA
from persona_eval.metrics import METRICS
from persona_eval.personas import CONTROLS, STUDY_PERSONAS
from persona_eval.tasks import metric_text
from persona_eval.tasks import stratum_title as stratum_title  # the report reads it from here

# A control as named inside a sentence ("vs no persona").
BASELINE_TITLE = {p.id: p.name.lower() for p in STUDY_PERSONAS if p.id in CONTROLS}


def metric_title(metric: str) -> str:
    text = metric_text(metric)
    return text.title if text else metric.replace("_", " ").capitalize()


def metric_phrase(metric: str) -> str:
    """The metric's name inside a sentence ("calibration error (ECE)", not "Calibration error (ECE)")."""
    title = metric_title(metric)
    return title[:1].lower() + title[1:]


def metric_description(metric: str) -> str:
    info = METRICS.get(metric)
    return info.description if info else metric


def criterion_title(criterion: str) -> str:
    spec = CRITERIA.get(criterion)
    return spec.heading if spec else criterion.replace("_", " ").capitalize()


def direction(metric: str, delta: float) -> str:
    """'better', 'worse' or 'changed' (metrics that describe behaviour have no better side)."""
    info = METRICS.get(metric)
    if info is None or info.higher_is_better is None or delta == 0:
        return "changed"
    return "better" if (delta > 0) == info.higher_is_better else "worse"
