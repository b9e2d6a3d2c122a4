"""Repository-wide pytest settings. The persona-eval plugin itself lives in persona_eval/plugin.py and is
registered through the package's pytest11 entry point."""

pytest_plugins = ["pytester"]
