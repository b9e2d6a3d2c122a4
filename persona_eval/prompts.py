"""Pure prompt rendering: (case, persona, template, system policy) -> chat messages.

The design decision, in one place:

* A prompt template (:class:`PromptTemplate`, loaded from a versioned file by persona_eval.templates) says
  where the persona sentence, the task instructions and the case go. Everything but the persona sentence
  is identical in every condition.
* The persona declaration is the only difference between conditions. The default triage template (the
  study's design) puts it before the instructions in the system turn; the answer-first template and
  :func:`render_messages` make it the whole system message.
* ``no_persona`` sends no declaration. Some chat templates (SmolLM2, Qwen2.5) insert a default
  system prompt of their own when no system message is sent ("You are a helpful AI assistant named
  SmolLM..."), which would give the baseline an identity that no other condition has. For such
  templates the baseline sends an *empty* system message instead (``SystemPolicy.baseline_empty_system``),
  so the rendered prompts of the baseline and a persona differ by the declaration alone.
* Templates that reject a system role (or fold it into the first user turn, as Gemma's do) get the
  declaration as the first line of the user turn (``SystemPolicy.system_role_supported = False``).

The rendered text the model saw is kept with every result, so any of this can be checked.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from persona_eval.personas import Persona

__all__ = ["PLACEHOLDERS", "Message", "PromptTemplate", "RenderedMessages", "SystemPolicy", "render_messages",
           "render_template", "template_of_function",
           "template_placeholders"]

Message = dict[str, str]


@dataclass(frozen=True)
class SystemPolicy:
    """How a model's chat template treats system messages (see the module docstring)."""

    system_role_supported: bool = True
    baseline_empty_system: bool = False


@dataclass(frozen=True)
class RenderedMessages:
    """The chat messages of one request, and the system prompt that was sent (None when none was)."""

    messages: tuple[tuple[str, str], ...]
    system_prompt: str | None

    def as_dicts(self) -> list[Message]:
        return [{"role": role, "content": content} for role, content in self.messages]


def render_messages(user_content: str, persona: Persona, policy: SystemPolicy = SystemPolicy()
                    ) -> RenderedMessages:
    """The chat messages for `user_content` under `persona`.

    >>> from persona_eval.personas import STUDY_PERSONAS
    >>> nurse = STUDY_PERSONAS[3]
    >>> render_messages("Case...", nurse).messages
    (('system', 'You are an Emergency Department nurse.'), ('user', 'Case...'))
    >>> render_messages("Case...", STUDY_PERSONAS[0], SystemPolicy(baseline_empty_system=True)).messages
    (('system', ''), ('user', 'Case...'))
    """
    declaration = persona.declaration
    if declaration is None:
        if policy.system_role_supported and policy.baseline_empty_system:
            return RenderedMessages((("system", ""), ("user", user_content)), "")
        return RenderedMessages((("user", user_content),), None)
    if policy.system_role_supported:
        return RenderedMessages((("system", declaration), ("user", user_content)), declaration)
    return RenderedMessages((("user", f"{declaration}\n\n{user_content}"),), None)


# What a template's turns may hold: {persona} the persona sentence (nothing for no_persona), {case} the
# case text, {options} the answer options one per line ("A. Stay home ..."), {labels} the letters ("A, B or
# C"). "{{" and "}}" are literal braces.
PLACEHOLDERS: tuple[str, ...] = ("persona", "case", "options", "labels")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")


@dataclass(frozen=True)
class PromptTemplate:
    """A versioned prompt of a classification task: the system and user turns with their placeholders
    (see ``PLACEHOLDERS``), and where the answer is read.

    ``answer_prefix`` is written after the prompt (the assistant turn opened) where the latent label is
    read: the model's label distribution before it has written anything of its own. ``answer_first``
    says the template asks for the answer letter first: under greedy decoding its latent label is then
    the generated label by construction, and the consistency rate is not reported. ``source`` says where
    the template came from (a file, or "built-in"); it is not part of :attr:`digest`."""

    id: str
    version: str
    system: str
    user: str
    answer_prefix: str
    answer_first: bool = False
    task: str | None = None
    source: str = "built-in"

    @property
    def digest(self) -> str:
        """"sha256:<16 hex>" over what shapes the prompt and its reading (not the file's comments or
        layout): the id, version, turns, answer prefix and answer_first."""
        material = json.dumps([self.id, self.version, self.system, self.user, self.answer_prefix,
                               self.answer_first], ensure_ascii=False)
        return "sha256:" + hashlib.sha256(material.encode("utf-8")).hexdigest()[:16]

    def key(self) -> dict[str, Any]:
        """What the cache key, cases.jsonl and summary.json carry of the template."""
        return {"id": self.id, "version": self.version, "hash": self.digest}

    @property
    def name(self) -> str:
        """``id@version``, as records and the report name it."""
        return f"{self.id}@{self.version}"


def _fill(text: str, values: Mapping[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        return values[match.group(1)]
    filled = _PLACEHOLDER.sub(substitute, text)
    return _BLANK_LINES.sub("\n\n", filled).strip()


def template_placeholders(text: str) -> list[str]:
    """The placeholder names in `text`, in order (literal "{{"/"}}" left out)."""
    return [m.group(1) for m in _PLACEHOLDER.finditer(text) if m.group(1)]


def render_template(template: PromptTemplate, case_text: str, persona: Persona, *, labels: Sequence[str],
                    label_text: Mapping[str, str], policy: SystemPolicy = SystemPolicy()) -> RenderedMessages:
    """The chat messages of one case under `persona` with `template`.

    The system turn is left out when it renders empty (the baseline of a template whose system turn is
    the persona alone): then, as in :func:`render_messages`, the baseline sends an empty system message
    where the model's chat template would insert a default one. A model whose chat template has no
    system role gets the system text as the first paragraph of the user turn.

    >>> t = PromptTemplate("demo", "1", system="{persona}", user="{case} {options}", answer_prefix="Answer:")
    >>> from persona_eval.personas import STUDY_PERSONAS
    >>> render_template(t, "Chest pain.", STUDY_PERSONAS[3], labels="AB",
    ...                 label_text={"A": "Home", "B": "Hospital"}).as_dicts()[1]["content"].splitlines()
    ['Chest pain. A. Home', 'B. Hospital']
    """
    letters = list(labels)
    values = {
        "persona": persona.declaration or "",
        "case": case_text.strip(),
        "options": "\n".join(f"{label}. {label_text[label]}" for label in letters),
        "labels": letters[0] if len(letters) == 1 else f"{', '.join(letters[:-1])} or {letters[-1]}",
    }
    system, user = _fill(template.system, values), _fill(template.user, values)
    if not system:
        if policy.system_role_supported and policy.baseline_empty_system:
            return RenderedMessages((("system", ""), ("user", user)), "")
        return RenderedMessages((("user", user),), None)
    if policy.system_role_supported:
        return RenderedMessages((("system", system), ("user", user)), system)
    return RenderedMessages((("user", f"{system}\n\n{user}"),), None)


_CASE_MARK = "\x00persona-eval-case\x00"


def template_of_function(task: str, template_id: str, prompt: Callable[[str], str], *,
                         answer_first: bool = True) -> PromptTemplate:
    """The template of a task that makes its user turn with a function of the case text: the persona
    sentence is the system turn, the function's text the user turn (its braces kept literal); version "1",
    answer prefix "Answer:"."""
    user = prompt(_CASE_MARK).replace("{", "{{").replace("}", "}}")
    if _CASE_MARK not in user:
        raise ValueError(f"task {task!r}: its prompt function leaves out the case text")
    return PromptTemplate(id=template_id or task, version="1", system="{persona}",
                          user=user.replace(_CASE_MARK, "{case}"), answer_prefix="Answer:",
                          answer_first=answer_first, task=task, source="prompt function")
