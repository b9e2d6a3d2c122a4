"""persona-eval: paired, stratified evaluation of persona system prompts on clinical LLMs."""

from persona_eval.data import load_safety_queries, load_triage_cases
from persona_eval.errors import BackendError, ConfigError, DataError, MissingDependencyError, PersonaEvalError
from persona_eval.parsing import AnswerSpan, find_triage_answer, parse_triage_label
from persona_eval.personas import STUDY_PERSONAS, Persona, PersonaRegistry, load_personas
from persona_eval.thresholds import Thresholds, load_thresholds

__version__ = "0.1.0"

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
    "Thresholds",
    "__version__",
    "find_triage_answer",
    "load_personas",
    "load_safety_queries",
    "load_thresholds",
    "load_triage_cases",
    "parse_triage_label",
]
