"""The persona conditions of the study, and user personas read from YAML.

A persona is one sentence, "You are a {role}.", sent as the system message. Everything else in the
prompt is identical across conditions, so that the declaration is the only thing that differs.
``no_persona`` sends no declaration at all: it is the baseline of every paired comparison.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_eval.errors import ConfigError
from persona_eval.registry import unknown_name_message
from persona_eval.yamlfile import YamlDocument, child_path, item_path, load_yaml

__all__ = [
    "BASELINE",
    "CONTROLS",
    "GROUPS",
    "GROUP_TITLES",
    "STUDY_PERSONAS",
    "Persona",
    "PersonaRegistry",
    "declaration_for",
    "indefinite_article",
    "load_personas",
]

# The persona groups, in report order, and how the report names each.
GROUP_TITLES: dict[str, str] = {"baseline": "baseline", "non_medical": "non-medical", "medical": "medical"}
GROUPS: tuple[str, ...] = tuple(GROUP_TITLES)
BASELINE = "no_persona"
# The controls every persona is compared with, in this order: the baseline that sends no declaration,
# and a non-medical persona that separates the effect of any declaration from that of a medical one.
CONTROLS: tuple[str, ...] = (BASELINE, "helpful_assistant")
_ID_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
# Words that start with a vowel letter but a consonant sound, and the reverse ("an hour").
_CONSONANT_SOUND = ("uni", "use", "usu", "eu", "one", "once")
_VOWEL_SOUND = ("hour", "honest", "honour", "honor", "heir")


def indefinite_article(phrase: str) -> str:
    """'a' or 'an' for `phrase`, by the sound of its first word.

    >>> indefinite_article("Emergency Department nurse"), indefinite_article("bold physician")
    ('an', 'a')
    >>> indefinite_article("ED physician"), indefinite_article("university doctor")
    ('an', 'a')
    """
    word = phrase.strip().split()[0] if phrase.strip() else ""
    lower = word.lower()
    if not word:
        return "a"
    if lower.startswith(_VOWEL_SOUND):
        return "an"
    if lower.startswith(_CONSONANT_SOUND):
        return "a"
    if word.isupper() and len(word) > 1:
        # An initialism is read letter by letter: "an ED nurse", "an MD", "a GP".
        return "an" if word[0] in "AEFHILMNORSX" else "a"
    return "an" if lower[0] in "aeiou" else "a"


def declaration_for(role: str) -> str:
    """The one-sentence persona declaration for `role`: ``You are an Emergency Department nurse.``"""
    return f"You are {indefinite_article(role)} {role.strip()}."


@dataclass(frozen=True)
class Persona:
    """One experimental condition.

    id: used in test ids and results (``ed_nurse``); name: for people; group: baseline, non_medical
    or medical; declaration: the system sentence, None for the baseline that sends none.
    """

    id: str
    name: str
    group: str
    declaration: str | None

    @property
    def is_baseline(self) -> bool:
        return self.declaration is None

    @property
    def is_medical(self) -> bool:
        return self.group == "medical"


STUDY_PERSONAS: tuple[Persona, ...] = (
    Persona(BASELINE, "No persona", "baseline", None),
    Persona("helpful_assistant", "Helpful assistant", "non_medical", declaration_for("helpful assistant")),
    Persona("ed_physician", "ED physician", "medical", declaration_for("Emergency Department physician")),
    Persona("ed_nurse", "ED nurse", "medical", declaration_for("Emergency Department nurse")),
    Persona("ed_physician_bold", "Bold ED physician", "medical",
            declaration_for("bold Emergency Department physician")),
    Persona("ed_physician_cautious", "Cautious ED physician", "medical",
            declaration_for("cautious Emergency Department physician")),
)


class PersonaRegistry:
    """The personas of a run, in a fixed order: the study's six, then the user's."""

    def __init__(self, personas: Iterable[Persona] = STUDY_PERSONAS) -> None:
        self._by_id: dict[str, Persona] = {}
        for persona in personas:
            self.add(persona)

    def add(self, persona: Persona) -> None:
        if persona.id in self._by_id:
            raise ConfigError(f"persona {persona.id!r} is defined twice")
        self._by_id[persona.id] = persona

    def get(self, persona_id: str) -> Persona:
        try:
            return self._by_id[persona_id]
        except KeyError:
            raise ConfigError(unknown_name_message("persona", persona_id, self._by_id)) from None

    def select(self, ids: Iterable[str] | None) -> list[Persona]:
        """The personas named by `ids` in registry order (all when `ids` is None); the baseline is
        always included, since every comparison is made against it."""
        if ids is None:
            return list(self)
        wanted = {self.get(i).id for i in ids} | {BASELINE}
        return [p for p in self if p.id in wanted]

    def __iter__(self) -> Iterator[Persona]:
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, persona_id: object) -> bool:
        return persona_id in self._by_id

    @property
    def ids(self) -> list[str]:
        return list(self._by_id)


_FIELDS: tuple[str, ...] = ("id", "name", "group", "role", "declaration")
_USER_GROUPS: tuple[str, ...] = ("medical", "non_medical")


def _suggested_id(text: str) -> str | None:
    """The id closest to `text` that the pattern accepts: "ED-Nurse 2" -> "ed_nurse_2"."""
    candidate = re.sub(r"[^a-z0-9_]+", "_", text.strip().lower()).strip("_")
    candidate = re.sub(r"^[0-9_]+", "", candidate)
    return candidate if candidate and _ID_PATTERN.match(candidate) else None


def _persona_from_mapping(entry: Any, where: str, source: YamlDocument) -> Persona:
    if not isinstance(entry, Mapping):
        got = repr(entry) if isinstance(entry, (str, int, float)) or entry is None else f"a {type(entry).__name__}"
        raise source.error(where, f"each persona must be a mapping with id, group and role (or declaration), "
                                  f"got {got}")
    for key in entry:
        if key not in _FIELDS:
            raise source.error(child_path(where, key), unknown_name_message("field", str(key), _FIELDS))
    if "id" not in entry:
        raise source.error(where, "missing field 'id' (lowercase letters, digits and '_', starting with a "
                                  "letter, e.g. primary_care_physician)")
    persona_id = entry["id"]
    if not isinstance(persona_id, str) or not _ID_PATTERN.match(persona_id):
        meant = _suggested_id(str(persona_id)) if isinstance(persona_id, (str, int)) else None
        hint = f"; did you mean {meant!r}?" if meant else ""
        raise source.error(child_path(where, "id"), f"{persona_id!r} is not a persona id: use lowercase "
                                                    f"letters, digits and '_', starting with a letter{hint}")
    group = entry.get("group", "medical")
    if group == "baseline":
        raise source.error(child_path(where, "group"), "'baseline' is the group of no_persona alone; give "
                                                       "'medical' or 'non_medical'")
    if not isinstance(group, str) or group not in _USER_GROUPS:
        message = (unknown_name_message("group", group, _USER_GROUPS) if isinstance(group, str)
                   else f"expected 'medical' or 'non_medical', got {group!r}")
        raise source.error(child_path(where, "group"), message)
    role, declaration = entry.get("role"), entry.get("declaration")
    if (role is None) == (declaration is None):
        raise source.error(where, f"persona {persona_id!r}: give exactly one of 'role' (rendered as "
                                  "'You are a ROLE.') or 'declaration' (the full sentence)")
    key = "declaration" if declaration is not None else "role"
    text = declaration if declaration is not None else role
    if not isinstance(text, str) or not text.strip():
        raise source.error(child_path(where, key), f"'{key}' must be non-empty text, got {text!r}")
    name = entry.get("name", persona_id.replace("_", " ").capitalize())
    if not isinstance(name, str) or not name.strip():
        raise source.error(child_path(where, "name"), f"field 'name' must be non-empty text, got {name!r}")
    sentence = text.strip() if declaration is not None else declaration_for(text)
    return Persona(persona_id, name, group, sentence)


def load_personas(path: str | Path | None = None) -> PersonaRegistry:
    """The study's six personas, plus those of a user YAML file::

        personas:
          - id: primary_care_physician
            name: Primary care physician
            group: medical
            role: primary care physician     # -> "You are a primary care physician."

    Every field is checked; a ConfigError names the file, line and field, e.g.
    ``personas.yaml:4: personas[0].group: unknown group 'medcal'. Did you mean 'medical'? ...``.
    """
    registry = PersonaRegistry()
    if path is None:
        return registry
    source = load_yaml(path, kind="personas file")
    document = source.data
    if isinstance(document, Mapping):
        for key in document:
            if key != "personas":
                raise source.error(str(key), unknown_name_message("top-level key", str(key), ["personas"]))
    if not isinstance(document, Mapping) or not isinstance(document.get("personas"), list):
        at = "personas" if isinstance(document, Mapping) and "personas" in document else ""
        raise source.error(at, "expected a top-level key 'personas' holding a list")
    first_line: dict[str, int | None] = {}
    for index, entry in enumerate(document["personas"]):
        where = item_path("personas", index)
        persona = _persona_from_mapping(entry, where, source)
        if persona.id in first_line:
            line = first_line[persona.id]
            raise source.error(child_path(where, "id"), f"persona {persona.id!r} is defined twice"
                                                        + (f" (first on line {line})" if line else ""))
        if persona.id in registry:
            raise source.error(child_path(where, "id"), f"persona {persona.id!r} is defined twice: it is "
                                                        "one of the study's personas; choose another id")
        first_line[persona.id] = source.line(child_path(where, "id"))
        registry.add(persona)
    return registry
