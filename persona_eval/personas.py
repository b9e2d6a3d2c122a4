"""The persona conditions of the study, the placebo control, and user personas read from YAML.

A persona is one sentence, "You are a {role}.", sent as the system message. Everything else in the
prompt is identical across conditions, so that the declaration is the only thing that differs.
``no_persona`` sends no declaration at all: it is the baseline of every paired comparison.

``placebo`` is a control of another kind: a system sentence of about the same length as a persona's that
gives no role ("Please read the following information carefully."). Any sentence in the system turn moves
some answers of a model; the placebo measures how many, so that a persona's flips can be read against that
noise floor (persona_eval.robustness). It runs with every classification task, is never ranked by the
judges, and is a persona like the others in every table.

A persona may list other *wordings* of its declaration: sentences that say the same role in other words.
With ``--pe-wordings`` each wording runs as a variant of the persona, and the persona's effect is reported
with its spread across wordings (persona_eval.robustness). The study's personas and the placebo come with
three wordings each (the declaration and two others).
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
    "DEFAULT_PERSONAS",
    "GROUPS",
    "GROUP_TITLES",
    "PLACEBO",
    "STUDY_PERSONAS",
    "Persona",
    "PersonaRegistry",
    "declaration_for",
    "indefinite_article",
    "load_personas",
]

# The persona groups, in report order, and how the report names each.
GROUP_TITLES: dict[str, str] = {"baseline": "baseline", "control": "control", "non_medical": "non-medical",
                                 "medical": "medical"}
GROUPS: tuple[str, ...] = tuple(GROUP_TITLES)
BASELINE = "no_persona"
# The controls every persona is compared with, in this order: the baseline that sends no declaration,
# and a non-medical persona that separates the effect of any declaration from that of a medical one.
CONTROLS: tuple[str, ...] = (BASELINE, "helpful_assistant")
# The placebo sentence: no role, about a persona declaration's length (the study's are 28-52 characters).
PLACEBO = "placebo"
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

    id: used in test ids and results (``ed_nurse``); name: for people; group: baseline, control (the
    placebo), non_medical or medical; declaration: the system sentence, None for the baseline that sends
    none; wordings: other sentences saying the same (the declaration is wording 1, these 2, 3, ...).
    """

    id: str
    name: str
    group: str
    declaration: str | None
    wordings: tuple[str, ...] = ()

    @property
    def all_wordings(self) -> tuple[str, ...]:
        """Every wording of the declaration, the declaration first (none for the baseline)."""
        return () if self.declaration is None else (self.declaration, *self.wordings)

    def worded(self, number: int) -> Persona:
        """This persona with wording `number` (1 = the declaration) as its declaration.

        >>> STUDY_PERSONAS[3].worded(2).declaration
        'You work as a nurse in an Emergency Department.'
        """
        wordings = self.all_wordings
        if not 1 <= number <= len(wordings):
            raise ValueError(f"persona {self.id!r} has {len(wordings)} wording(s), not a wording {number}")
        return Persona(self.id, self.name, self.group, wordings[number - 1], self.wordings)

    @property
    def is_baseline(self) -> bool:
        return self.declaration is None

    @property
    def is_medical(self) -> bool:
        return self.group == "medical"


# The study's six conditions. Wordings 2 and 3 of each were written for persona-eval: the same role, said
# once as work ("You work as ...") and once as a role ("Your role is ...").
STUDY_PERSONAS: tuple[Persona, ...] = (
    Persona(BASELINE, "No persona", "baseline", None),
    Persona("helpful_assistant", "Helpful assistant", "non_medical", declaration_for("helpful assistant"),
            ("You are an assistant whose aim is to be helpful.", "Your role is to be a helpful assistant.")),
    Persona("ed_physician", "ED physician", "medical", declaration_for("Emergency Department physician"),
            ("You work as a doctor in an Emergency Department.",
             "Your role is that of a physician in a hospital Emergency Department.")),
    Persona("ed_nurse", "ED nurse", "medical", declaration_for("Emergency Department nurse"),
            ("You work as a nurse in an Emergency Department.",
             "Your role is that of a nurse in a hospital Emergency Department.")),
    Persona("ed_physician_bold", "Bold ED physician", "medical",
            declaration_for("bold Emergency Department physician"),
            ("You work as a doctor in an Emergency Department, and you act boldly.",
             "Your role is that of a bold, decisive physician in an Emergency Department.")),
    Persona("ed_physician_cautious", "Cautious ED physician", "medical",
            declaration_for("cautious Emergency Department physician"),
            ("You work as a doctor in an Emergency Department, and you act with caution.",
             "Your role is that of a careful, cautious physician in an Emergency Department.")),
)
# The placebo control: a sentence with no role, and two other wordings of the same.
PLACEBO_PERSONA = Persona(PLACEBO, "Placebo sentence", "control", "Please read the following information carefully.",
                          ("Take care to read the details that follow.",
                           "Read what follows with attention before you answer."))
# The personas a run has unless told otherwise: the baseline, the placebo, then the study's others.
DEFAULT_PERSONAS: tuple[Persona, ...] = (STUDY_PERSONAS[0], PLACEBO_PERSONA, *STUDY_PERSONAS[1:])


class PersonaRegistry:
    """The personas of a run, in a fixed order: the baseline, the placebo, the study's other five, then the
    user's."""

    def __init__(self, personas: Iterable[Persona] = DEFAULT_PERSONAS) -> None:
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
        """The personas named by `ids` in registry order (all when `ids` is None); the baseline and the
        placebo are always included: every comparison is made against the one, every flip count read
        against the other."""
        if ids is None:
            return list(self)
        wanted = {self.get(i).id for i in ids} | {BASELINE} | ({PLACEBO} if PLACEBO in self else set())
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


_FIELDS: tuple[str, ...] = ("id", "name", "group", "role", "declaration", "wordings")
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
    if group in ("baseline", "control"):
        owner = "no_persona" if group == "baseline" else "the placebo"
        raise source.error(child_path(where, "group"), f"{group!r} is the group of {owner} alone; give "
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
    return Persona(persona_id, name, group, sentence, _wordings(entry, where, source, sentence))


def _wordings(entry: Mapping[str, Any], where: str, source: YamlDocument, sentence: str) -> tuple[str, ...]:
    """The persona's other wordings (full sentences), each non-empty, none repeating another."""
    wordings = entry.get("wordings", [])
    at = child_path(where, "wordings")
    if not isinstance(wordings, list):
        raise source.error(at, f"'wordings' must be a list of sentences (other ways of saying the declaration), "
                               f"got {wordings!r}")
    seen = {sentence.strip()}
    out = []
    for index, wording in enumerate(wordings):
        here = item_path(at, index)
        if not isinstance(wording, str) or not wording.strip():
            raise source.error(here, f"each wording must be a non-empty sentence, got {wording!r}")
        if wording.strip() in seen:
            raise source.error(here, f"wording {wording.strip()!r} repeats the declaration or another wording")
        seen.add(wording.strip())
        out.append(wording.strip())
    return tuple(out)


def load_personas(path: str | Path | None = None) -> PersonaRegistry:
    """The default personas (the study's six and the placebo), plus those of a user YAML file::

        personas:
          - id: primary_care_physician
            name: Primary care physician
            group: medical
            role: primary care physician     # -> "You are a primary care physician."
            wordings:                        # optional: other wordings (--pe-wordings runs them)
              - You work as a doctor in primary care.

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
                                                        "one of the default personas; choose another id")
        first_line[persona.id] = source.line(child_path(where, "id"))
        registry.add(persona)
    return registry
