"""The evaluation tasks: one module each (labels, strata, prompt templates)."""
