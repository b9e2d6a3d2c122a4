"""Prompt templates as versioned files: the built-in ones by name, a team's own by path.

A template file is YAML::

    id: my-triage            # letters, digits, "-", "_", "."
    version: 3               # bump it whenever the wording changes
    task: triage             # optional: the task it is written for
    system: |-               # optional (default "{persona}")
      {persona}

      Decide how urgently ... The options are:
      {options}
    user: |-
      {case}
    answer_prefix: "## Final Response\\n"   # where the latent label is read, after the prompt
    answer_first: false      # true when the reply is asked to start with the letter

The turns may hold ``{persona}``, ``{case}`` (required, in the user turn), ``{options}`` and ``{labels}``
(see persona_eval.prompts). The built-in triage templates are ``study`` (the default: the study's design)
and ``answer-first``; ``--pe-template triage=NAME_OR_PATH`` or a model's ``template`` in the models file
chooses another.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from persona_eval.errors import ConfigError
from persona_eval.personas import Persona
from persona_eval.prompts import (
    PLACEHOLDERS,
    PromptTemplate,
    RenderedMessages,
    SystemPolicy,
    render_template,
    template_placeholders,
)
from persona_eval.registry import close_matches, unknown_name_message
from persona_eval.yamlfile import YamlDocument, load_yaml

__all__ = ["BUILT_IN", "DEFAULT_TEMPLATES", "load_template", "render_case", "template_named"]

_HERE = Path(__file__).parent / "data" / "templates"
# Built-in templates: task -> name -> file.
BUILT_IN: dict[str, dict[str, Path]] = {
    "triage": {"study": _HERE / "triage-study.yaml", "answer-first": _HERE / "triage-answer-first.yaml"},
}
# The template each task uses when neither the command line nor the models file names one.
DEFAULT_TEMPLATES: dict[str, str] = {"triage": "study"}

_FIELDS = {"id", "version", "task", "description", "system", "user", "answer_prefix", "answer_first"}
_REQUIRED = ("id", "version", "user", "answer_prefix")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MEMO: dict[tuple[str, str], PromptTemplate] = {}


def template_named(reference: str, *, task: str) -> PromptTemplate:
    """The template `reference` of `task`: a built-in name (``study``, ``answer-first``) or a file path.
    Loaded once per process."""
    memo_key = (task, reference)
    if memo_key not in _MEMO:
        built_in = BUILT_IN.get(task, {})
        if reference in built_in:
            template = load_template(built_in[reference], task=task, source="built-in")
        else:
            path = Path(reference)
            if not path.suffix and not path.exists():
                raise ConfigError(f"template {reference!r} of task {task!r}: "
                                  + unknown_name_message("built-in template", reference, built_in)
                                  + " (or give the path of a template file)")
            template = load_template(path, task=task)
        _MEMO[memo_key] = template
    return _MEMO[memo_key]


def _text(document: YamlDocument, data: dict[str, Any], name: str, *, allow_empty: bool = False) -> str:
    value = data[name]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and name == "version":
        return str(value)
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise document.error(name, f"expected text, got {value!r}")
    return value


def load_template(path: str | Path, *, task: str | None = None, source: str | None = None) -> PromptTemplate:
    """The template in the YAML file at `path`, checked; `task` (when given) must match the file's own.

    A mistake is a ConfigError naming the file, line and field: an unknown field (with the near miss it
    was probably meant to be), a missing required one, a placeholder that does not exist, a user turn
    without ``{case}``, or no ``{persona}`` anywhere (every condition would then send the same prompt)."""
    document = load_yaml(path, kind="prompt template")
    data = document.data
    if not isinstance(data, dict):
        raise document.error("", "expected a mapping of template fields (id, version, system, user, answer_prefix)")
    for name in data:
        if name not in _FIELDS:
            close = close_matches(str(name), _FIELDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise document.error(str(name), f"unknown field{hint} Known: {', '.join(sorted(_FIELDS))}.")
    for name in _REQUIRED:
        if name not in data:
            raise document.error("", f"field {name!r}: required field is missing")
    template_id = _text(document, data, "id")
    if not _ID.match(template_id):
        raise document.error("id", f"expected letters, digits, '.', '-' or '_', got {template_id!r}")
    system = _text(document, data, "system", allow_empty=True) if "system" in data else "{persona}"
    user = _text(document, data, "user")
    prefix = _text(document, data, "answer_prefix")
    for name, text in (("system", system), ("user", user)):
        for placeholder in template_placeholders(text):
            if placeholder not in PLACEHOLDERS:
                close = close_matches(placeholder, PLACEHOLDERS, n=1)
                hint = f"; did you mean {{{close[0]}}}?" if close else ""
                raise document.error(name, f"unknown placeholder {{{placeholder}}}{hint} Known: "
                                     + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
                                     + ' (write "{{" and "}}" for literal braces)')
    if "case" not in template_placeholders(user):
        raise document.error("user", "the user turn must hold {case}, where the case text goes")
    if "persona" not in template_placeholders(system) + template_placeholders(user):
        raise document.error("system", "no {persona} in the system or user turn: every persona would send the "
                             "same prompt")
    answer_first = data.get("answer_first", False)
    if not isinstance(answer_first, bool):
        raise document.error("answer_first", f"expected true or false, got {answer_first!r}")
    own_task = data.get("task")
    if own_task is not None and not isinstance(own_task, str):
        raise document.error("task", f"expected a task name, got {own_task!r}")
    if task is not None and own_task is not None and own_task != task:
        raise document.error("task", f"this template is written for task {own_task!r}, not {task!r}")
    return PromptTemplate(id=template_id, version=_text(document, data, "version"), system=system, user=user,
                          answer_prefix=prefix, answer_first=answer_first, task=own_task,
                          source=source or str(path))


def render_case(case_text: str, persona: Persona, policy: SystemPolicy | None = None, *, task: str = "triage",
                template: str | PromptTemplate | None = None) -> RenderedMessages:
    """The chat messages of one case of `task` under `persona`, with `template` (a built-in name, a file, a
    PromptTemplate; default: the task's default template): the request the suite sends."""
    from persona_eval.tasks import spec_of

    spec = spec_of(task)
    if spec is None or not spec.labels:
        raise ConfigError(f"task {task!r} has no answer labels to render a prompt template with")
    if not isinstance(template, PromptTemplate):
        template = template_named(template or DEFAULT_TEMPLATES[task], task=task)
    return render_template(template, case_text, persona, labels=spec.labels, label_text=spec.label_text,
                           policy=policy or SystemPolicy())
