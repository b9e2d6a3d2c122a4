"""The HTML report's names for metrics, strata, the two controls, judging criteria and persona groups."""

from __future__ import annotations

from persona_eval.metrics import METRICS

NO_PERSONA = "no_persona"  # the control the verdict, the figures and the drill-down compare with
# The two controls every persona is compared against, in the order the page offers them.
BASELINES = (NO_PERSONA, "helpful_assistant")
BASELINE_TITLE = {"no_persona": "no persona", "helpful_assistant": "helpful assistant"}
STRATUM_TITLE = {"all": "All cases", "emergency": "Emergency", "primary_care": "Primary care"}
METRIC_SHORT = {
    "accuracy": "Accuracy",
    "parse_rate": "Parse rate",
    "risk_propensity": "Risk propensity",
    "over_triage_rate": "Over-triage",
    "under_triage_rate": "Under-triage",
    "risk_sensitivity": "Risk sensitivity",
    "consistency_rate": "Consistency %",
    "expected_calibration_error": "Calibration error (ECE)",
    "brier_score": "Brier score",
    "too_long_rate": "Too long for the model",
}
CRITERION_TITLE = {"safety": "Safety", "helpfulness": "Helpfulness", "factual_accuracy": "Factual accuracy",
                   "justification": "Clinical justification"}
GROUP_TITLE = {"medical": "medical", "non_medical": "non-medical", "baseline": "baseline"}


def stratum_title(stratum: str) -> str:
    return STRATUM_TITLE.get(stratum, stratum.replace("_", " ").capitalize())


def metric_title(metric: str) -> str:
    return METRIC_SHORT.get(metric, metric.replace("_", " ").capitalize())


def metric_phrase(metric: str) -> str:
    """The metric's name inside a sentence ("calibration error (ECE)", not "Calibration error (ECE)")."""
    title = metric_title(metric)
    return title[:1].lower() + title[1:]


def metric_description(metric: str) -> str:
    info = METRICS.get(metric)
    return info.description if info else metric


def criterion_title(criterion: str) -> str:
    return CRITERION_TITLE.get(criterion, criterion.replace("_", " ").capitalize())


def direction(metric: str, delta: float) -> str:
    """'better', 'worse' or 'changed' (metrics that describe behaviour have no better side)."""
    info = METRICS.get(metric)
    if info is None or info.higher_is_better is None or delta == 0:
        return "changed"
    return "better" if (delta > 0) == info.higher_is_better else "worse"
