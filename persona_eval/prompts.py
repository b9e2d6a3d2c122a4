"""Pure prompt rendering: (task text, persona, system policy) -> chat messages.

The design decision, in one place:

* The task instructions and the case are the user turn, identical in every condition.
* The persona declaration is the system message, and the only difference between conditions.
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

from dataclasses import dataclass

from persona_eval.personas import Persona

__all__ = ["Message", "RenderedMessages", "SystemPolicy", "render_messages"]

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
