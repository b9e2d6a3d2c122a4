"""persona-eval: paired, stratified evaluation of persona system prompts on clinical LLMs."""

__version__ = "0.1.0"
