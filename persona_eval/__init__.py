"""persona-eval: paired, stratified evaluation of persona system prompts on clinical LLMs."""

from typing import Any

from persona_eval.data import load_safety_queries, load_triage_cases
from persona_eval.errors import BackendError, ConfigError, DataError, MissingDependencyError, PersonaEvalError
from persona_eval.parsing import AnswerSpan, find_triage_answer, parse_triage_label
from persona_eval.personas import STUDY_PERSONAS, Persona, PersonaRegistry, load_personas
from persona_eval.thresholds import Thresholds, load_thresholds

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``load_run`` and ``RunFrames`` (persona_eval.frames) import pandas only when first asked for, so a
    pytest session that never reads a run as DataFrames does not pay for it."""
    if name in ("load_run", "RunFrames"):
        from persona_eval import frames

        return getattr(frames, name)
    raise AttributeError(f"module 'persona_eval' has no attribute {name!r}")

__all__ = [
    "STUDY_PERSONAS",
    "AnswerSpan",
    "BackendError",
    "ConfigError",
    "DataError",
    "MissingDependencyError",
    "Persona",
    "PersonaEvalError",
    "PersonaRegistry",
    "RunFrames",
    "Thresholds",
    "__version__",
    "find_triage_answer",
    "load_personas",
    "load_run",
    "load_safety_queries",
    "load_thresholds",
    "load_triage_cases",
    "parse_triage_label",
]
