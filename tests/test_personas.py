"""Tests of persona_eval.personas and persona_eval.registry: the study's six conditions and user YAML."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest

from persona_eval import personas as personas_module
from persona_eval.errors import ConfigError, PersonaEvalError
from persona_eval.personas import (
    BASELINE,
    DEFAULT_PERSONAS,
    GROUPS,
    PLACEBO,
    STUDY_PERSONAS,
    Persona,
    PersonaRegistry,
    declaration_for,
    indefinite_article,
    load_personas,
)
from persona_eval.registry import unknown_name_message

# --- the study's personas ----------------------------------------------------------------------------

EXPECTED_STUDY = [
    ("no_persona", "baseline", None),
    ("helpful_assistant", "non_medical", "You are a helpful assistant."),
    ("ed_physician", "medical", "You are an Emergency Department physician."),
    ("ed_nurse", "medical", "You are an Emergency Department nurse."),
    ("ed_physician_bold", "medical", "You are a bold Emergency Department physician."),
    ("ed_physician_cautious", "medical", "You are a cautious Emergency Department physician."),
]


def test_study_personas_are_the_six_conditions_in_order_with_exact_declarations() -> None:
    assert [(p.id, p.group, p.declaration) for p in STUDY_PERSONAS] == EXPECTED_STUDY


def test_only_the_baseline_sends_no_declaration() -> None:
    baselines = [p for p in STUDY_PERSONAS if p.is_baseline]
    assert [p.id for p in baselines] == [BASELINE]
    assert all(p.declaration and p.declaration.startswith("You are ") and p.declaration.endswith(".")
               for p in STUDY_PERSONAS if not p.is_baseline)


def test_is_medical_follows_the_group() -> None:
    assert {p.id for p in STUDY_PERSONAS if p.is_medical} == {
        "ed_physician", "ed_nurse", "ed_physician_bold", "ed_physician_cautious"}
    assert all(p.group in GROUPS for p in STUDY_PERSONAS)


def test_every_persona_but_the_baseline_has_three_distinct_wordings_and_the_placebo_no_role() -> None:
    for persona in DEFAULT_PERSONAS:
        if persona.is_baseline:
            assert persona.all_wordings == ()
            continue
        assert len(persona.all_wordings) == 3 and len(set(persona.all_wordings)) == 3
        assert persona.all_wordings[0] == persona.declaration
        assert persona.worded(2).declaration == persona.wordings[0] and persona.worded(2).id == persona.id
    placebo = next(p for p in DEFAULT_PERSONAS if p.id == PLACEBO)
    assert placebo.group == "control" and not placebo.is_medical
    # No role, and about a persona declaration's length (the study's are 28-52 characters).
    for sentence in placebo.all_wordings:
        assert "You are" not in sentence and 28 <= len(sentence) <= 56, sentence
    with pytest.raises(ValueError, match="has 3 wording"):
        placebo.worded(4)


def test_user_wordings_are_read(tmp_path: Path) -> None:
    path = _write(tmp_path, "personas:\n  - id: gp\n    role: GP\n    wordings:\n      - You work as a GP.\n")
    assert load_personas(path).get("gp").all_wordings == ("You are a GP.", "You work as a GP.")


def test_persona_is_immutable() -> None:
    with pytest.raises(AttributeError):
        STUDY_PERSONAS[2].declaration = "You are a pirate."  # type: ignore[misc]


@pytest.mark.parametrize(("phrase", "article"), [
    ("Emergency Department physician", "an"),
    ("emergency physician", "an"),
    ("bold Emergency Department physician", "a"),
    ("helpful assistant", "a"),
    ("cautious physician", "a"),
    ("ED nurse", "an"),
    ("MD", "an"),
    ("GP", "a"),
    ("RN", "an"),
    ("ICU nurse", "an"),
    ("university doctor", "a"),
    ("urgent care physician", "an"),
    ("honest broker", "an"),
    ("hour-long shift worker", "an"),
    ("hospital doctor", "a"),
    ("European doctor", "a"),
    ("one-person practice", "a"),
    ("oncologist", "an"),
    ("  internist  ", "an"),
    ("", "a"),
])
def test_indefinite_article(phrase: str, article: str) -> None:
    assert indefinite_article(phrase) == article


def test_personas_module_doctests_pass() -> None:
    result = doctest.testmod(personas_module)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.parametrize(("role", "sentence"), [
    ("Emergency Department nurse", "You are an Emergency Department nurse."),
    ("  primary care physician ", "You are a primary care physician."),
    ("ICU nurse", "You are an ICU nurse."),
    ("GP", "You are a GP."),
])
def test_declaration_for(role: str, sentence: str) -> None:
    assert declaration_for(role) == sentence


# --- the registry ------------------------------------------------------------------------------------


def test_default_registry_holds_the_baseline_the_placebo_and_the_study_personas_in_order() -> None:
    registry = PersonaRegistry()
    assert registry.ids == ["no_persona", "placebo", *(p.id for p in STUDY_PERSONAS[1:])]
    assert [p.id for p in DEFAULT_PERSONAS] == registry.ids
    assert len(registry) == 7
    assert "ed_nurse" in registry
    assert "pirate" not in registry
    assert registry.get("ed_nurse") is STUDY_PERSONAS[3]


def test_unknown_persona_is_a_config_error_with_did_you_mean_and_the_list() -> None:
    registry = PersonaRegistry()
    with pytest.raises(ConfigError) as caught:
        registry.get("ed_physican")
    message = str(caught.value)
    assert "unknown persona 'ed_physican'" in message
    assert "Did you mean 'ed_physician'" in message
    assert "Known: " + ", ".join(sorted(registry.ids)) in message
    assert isinstance(caught.value, PersonaEvalError)


def test_unknown_name_without_close_match_lists_what_exists_only() -> None:
    message = unknown_name_message("persona", "zzz", ["ed_nurse", "no_persona"])
    assert message == "unknown persona 'zzz'. Known: ed_nurse, no_persona."
    assert unknown_name_message("model", "x", []) == "unknown model 'x'. Known: (none)."


def test_adding_a_persona_twice_is_a_config_error() -> None:
    registry = PersonaRegistry()
    with pytest.raises(ConfigError, match="'ed_nurse' is defined twice"):
        registry.add(Persona("ed_nurse", "Another nurse", "medical", "You are a nurse."))


def test_select_none_gives_every_persona_in_registry_order() -> None:
    registry = PersonaRegistry()
    assert registry.select(None) == list(DEFAULT_PERSONAS)


@pytest.mark.parametrize(("ids", "expected"), [
    (["ed_nurse"], ["no_persona", "placebo", "ed_nurse"]),
    (["ed_physician_cautious", "helpful_assistant"],
     ["no_persona", "placebo", "helpful_assistant", "ed_physician_cautious"]),
    (["ed_nurse", "no_persona", "ed_nurse"], ["no_persona", "placebo", "ed_nurse"]),
    (["no_persona"], ["no_persona", "placebo"]),
    ([], ["no_persona", "placebo"]),
])
def test_select_keeps_the_baseline_the_placebo_and_registry_order(ids: list[str], expected: list[str]) -> None:
    assert [p.id for p in PersonaRegistry().select(ids)] == expected


def test_select_rejects_an_unknown_id() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'ed_nurse'"):
        PersonaRegistry().select(["ed_nurse", "ed_nures"])


# --- user YAML personas ------------------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "personas.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_personas_without_a_file_gives_the_default_personas() -> None:
    assert load_personas(None).ids == [p.id for p in DEFAULT_PERSONAS]


def test_load_personas_appends_user_personas_after_the_study_ones(tmp_path: Path) -> None:
    path = _write(tmp_path, """
personas:
  - id: primary_care_physician
    name: Primary care physician
    group: medical
    role: primary care physician
  - id: ed_physician_senior
    role: "  ED physician with 20 years of experience "
  - id: pirate
    group: non_medical
    declaration: "  Arr, you be a pirate.  "
""")
    registry = load_personas(path)
    assert registry.ids == [*(p.id for p in DEFAULT_PERSONAS), "primary_care_physician", "ed_physician_senior",
                            "pirate"]
    assert registry.get("primary_care_physician") == Persona(
        "primary_care_physician", "Primary care physician", "medical", "You are a primary care physician.")
    senior = registry.get("ed_physician_senior")
    assert senior.declaration == "You are an ED physician with 20 years of experience."
    assert senior.group == "medical"  # the default group
    assert senior.name == "Ed physician senior"
    pirate = registry.get("pirate")
    assert pirate.declaration == "Arr, you be a pirate."
    assert pirate.group == "non_medical"
    assert not pirate.is_medical
    # The baseline stays first, so select() keeps it for user personas too.
    assert [p.id for p in registry.select(["pirate"])] == ["no_persona", "placebo", "pirate"]


@pytest.mark.parametrize(("entries", "where", "fragment"), [
    pytest.param("  - id: ed_nurse\n    role: nurse\n", "2: personas[0].id",
                 "persona 'ed_nurse' is defined twice: it is one of the default personas", id="duplicate-of-study"),
    pytest.param("  - id: my_nurse\n    role: nurse\n  - id: my_nurse\n    role: nurse\n", "4: personas[1].id",
                 "persona 'my_nurse' is defined twice (first on line 2)", id="duplicate-in-file"),
    pytest.param("  - id: Bad-Id\n    role: nurse\n", "2: personas[0].id",
                 "'Bad-Id' is not a persona id: use lowercase letters, digits and '_', starting with a letter; "
                 "did you mean 'bad_id'?", id="bad-id"),
    pytest.param("  - id: 1nurse\n    role: nurse\n", "2: personas[0].id", "did you mean 'nurse'?",
                 id="id-starts-with-digit"),
    pytest.param("  - id: 12\n    role: nurse\n", "2: personas[0].id", "12 is not a persona id",
                 id="id-a-number"),
    pytest.param("  - role: nurse\n", "2: personas[0]", "missing field 'id'", id="missing-id"),
    pytest.param("  - id: ok\n    role: nurse\n  - id: nurse_x\n    group: clinical\n    role: nurse\n",
                 "5: personas[1].group", "unknown group 'clinical'", id="bad-group"),
    pytest.param("  - id: nurse_x\n    group: medcal\n    role: nurse\n", "3: personas[0].group",
                 "unknown group 'medcal'. Did you mean 'medical'", id="near-miss-group"),
    pytest.param("  - id: nurse_x\n    group: baseline\n    role: nurse\n", "3: personas[0].group",
                 "'baseline' is the group of no_persona alone", id="baseline-group"),
    pytest.param("  - id: nurse_x\n    group: control\n    role: nurse\n", "3: personas[0].group",
                 "'control' is the group of the placebo alone", id="control-group"),
    pytest.param("  - id: nurse_x\n    role: nurse\n    wordings: You are a nurse.\n", "4: personas[0].wordings",
                 "'wordings' must be a list of sentences", id="wordings-not-a-list"),
    pytest.param("  - id: nurse_x\n    role: nurse\n    wordings: ['', x]\n", "4: personas[0].wordings[0]",
                 "each wording must be a non-empty sentence", id="blank-wording"),
    pytest.param("  - id: nurse_x\n    role: nurse\n    wordings: [You are a nurse.]\n", "4: personas[0].wordings[0]",
                 "repeats the declaration or another wording", id="wording-repeats-declaration"),
    pytest.param("  - id: nurse_x\n    role: nurse\n    wording: [You work as a nurse.]\n", "4: personas[0].wording",
                 "unknown field 'wording'. Did you mean 'wordings'?", id="near-miss-wordings"),
    pytest.param("  - id: nurse_x\n    group: [medical]\n    role: nurse\n", "3: personas[0].group",
                 "expected 'medical' or 'non_medical', got ['medical']", id="group-not-text"),
    pytest.param("  - id: nurse_x\n    role: nurse\n    declaration: You are a nurse.\n", "2: personas[0]",
                 "persona 'nurse_x': give exactly one of 'role'", id="both-role-and-declaration"),
    pytest.param("  - id: nurse_x\n    name: Nurse\n", "2: personas[0]", "exactly one of 'role'",
                 id="neither-role-nor-declaration"),
    pytest.param("  - id: nurse_x\n    role: '   '\n", "3: personas[0].role", "'role' must be non-empty text",
                 id="blank-role"),
    pytest.param("  - id: nurse_x\n    declaration: [You are a nurse.]\n", "3: personas[0].declaration",
                 "'declaration' must be non-empty text", id="declaration-not-text"),
    pytest.param("  - id: nurse_x\n    role: nurse\n    persona: x\n", "4: personas[0].persona",
                 "unknown field 'persona'", id="unknown-field"),
    pytest.param("  - id: nurse_x\n    roles: nurse\n", "3: personas[0].roles",
                 "unknown field 'roles'. Did you mean 'role'?", id="near-miss-field"),
    pytest.param("  - id: nurse_x\n    role: nurse\n    name: 3\n", "4: personas[0].name", "field 'name'",
                 id="name-not-text"),
    pytest.param("  - id: nurse_x\n    role: nurse\n    role: doctor\n", "4: personas[0].role",
                 "duplicate key 'role' (first given on line 3)", id="duplicate-key"),
    pytest.param("  - just a string\n", "2: personas[0]", "must be a mapping", id="entry-not-mapping"),
])
def test_invalid_user_persona_names_the_file_line_and_field(tmp_path: Path, entries: str, where: str,
                                                             fragment: str) -> None:
    path = _write(tmp_path, "personas:\n" + entries)
    with pytest.raises(ConfigError) as caught:
        load_personas(path)
    message = str(caught.value)
    assert fragment in message, message
    assert message.startswith(f"{path}:{where}: "), message
    assert "\n" not in message


@pytest.mark.parametrize(("text", "start", "fragment"), [
    pytest.param("personas: [unclosed\n", ":2: ", "not valid YAML", id="not-yaml"),
    pytest.param("- id: x\n  role: nurse\n", ": ", "top-level key 'personas'", id="top-level-list"),
    pytest.param("personas:\n  id: x\n", ":1: personas: ", "top-level key 'personas'", id="personas-not-a-list"),
    pytest.param("", ": ", "top-level key 'personas'", id="empty-file"),
    pytest.param("persona:\n  - {id: x, role: nurse}\n", ":1: persona: ",
                 "unknown top-level key 'persona'. Did you mean 'personas'?", id="near-miss-top-level-key"),
])
def test_malformed_personas_file_is_a_config_error_naming_the_file(tmp_path: Path, text: str, start: str,
                                                                   fragment: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_personas(path)
    assert str(caught.value).startswith(f"{path}{start}"), str(caught.value)
    assert fragment in str(caught.value)


def test_an_empty_personas_list_adds_nothing(tmp_path: Path) -> None:
    assert load_personas(_write(tmp_path, "personas: []\n")).ids == [p.id for p in DEFAULT_PERSONAS]


def test_missing_personas_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="cannot read personas file") as caught:
        load_personas(path)
    assert str(path) in str(caught.value)
