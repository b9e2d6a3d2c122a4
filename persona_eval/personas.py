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

import yaml

from persona_eval.errors import ConfigError
from persona_eval.registry import unknown_name_message

__all__ = [
    "BASELINE",
    "GROUPS",
    "STUDY_PERSONAS",
    "Persona",
    "PersonaRegistry",
    "declaration_for",
    "indefinite_article",
    "load_personas",
]

GROUPS = ("baseline", "non_medical", "medical")
BASELINE = "no_persona"
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
    Persona("no_persona", "No persona", "baseline", None),
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


def _persona_from_mapping(entry: Mapping[str, Any], where: str) -> Persona:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: each persona must be a mapping with id, name, group and role")
    unknown = set(entry) - {"id", "name", "group", "role", "declaration"}
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; "
                          "expected id, name, group, and role or declaration")
    persona_id = entry.get("id")
    if not isinstance(persona_id, str) or not _ID_PATTERN.match(persona_id):
        raise ConfigError(f"{where}: field 'id' must be lowercase letters, digits and '_' "
                          f"starting with a letter, got {persona_id!r}")
    group = entry.get("group", "medical")
    if group not in GROUPS or group == "baseline":
        raise ConfigError(f"{where} ({persona_id}): field 'group' must be 'medical' or 'non_medical', "
                          f"got {group!r}")
    role, declaration = entry.get("role"), entry.get("declaration")
    if (role is None) == (declaration is None):
        raise ConfigError(f"{where} ({persona_id}): give exactly one of 'role' (rendered as "
                          "'You are a ROLE.') or 'declaration' (the full sentence)")
    text = declaration if declaration is not None else role
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where} ({persona_id}): 'role'/'declaration' must be non-empty text")
    name = entry.get("name", persona_id.replace("_", " ").capitalize())
    if not isinstance(name, str):
        raise ConfigError(f"{where} ({persona_id}): field 'name' must be text")
    sentence = declaration.strip() if declaration is not None else declaration_for(text)
    return Persona(persona_id, name, group, sentence)


def load_personas(path: str | Path | None = None) -> PersonaRegistry:
    """The study's six personas, plus those of a user YAML file::

        personas:
          - id: primary_care_physician
            name: Primary care physician
            group: medical
            role: primary care physician     # -> "You are a primary care physician."
    """
    registry = PersonaRegistry()
    if path is None:
        return registry
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read personas file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(document, Mapping) or not isinstance(document.get("personas"), list):
        raise ConfigError(f"{path}: expected a top-level key 'personas' holding a list")
    for index, entry in enumerate(document["personas"]):
        where = f"{path}: personas[{index}]"
        persona = _persona_from_mapping(entry, where)
        if persona.id in registry:
            raise ConfigError(f"{where} ({persona.id}): field 'id': persona {persona.id!r} is defined twice")
        registry.add(persona)
    return registry
