"""Tests of persona_eval.testing.tiny_model: the synthetic cases, the tokenizer, the planted effects (plain,
thinking and effects variants), the cache."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from persona_eval.personas import DEFAULT_PERSONAS, PLACEBO, Persona
from persona_eval.tasks.triage import LABELS
from persona_eval.testing import tiny_model
from persona_eval.testing.tiny_model import (
    DEFAULT_PLANTED_PERSONA,
    DIVERGENT_PHRASES,
    FLIP_PERSONA,
    LETTER_PERSONA,
    PREFERRED_LETTER,
    SIGNAL_PHRASES,
    WORDING_PERSONA,
    build_tiny_model,
    diverges,
    effects_answer,
    effects_conditions,
    effects_flips,
    effects_letter_target,
    effects_level,
    expected_answer,
    gut_answer,
    signal_phrase,
    synthetic_triage_records,
    thinking_reply,
    tiny_model_dir,
    training_messages,
)
from persona_eval.variants import NULL_CASES, letter_orders, level_of_letter

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HELD_OUT_SEED = 20261128
_ANSWER = re.compile(r"## Final Response\n([ABC])")


# -- the synthetic cases ------------------------------------------------------------------------------

def test_records_have_the_dataset_fields_and_unique_ids() -> None:
    records = synthetic_triage_records(30, seed=0)
    assert len(records) == 60
    assert all(set(r) == {"id", "stratum", "reference", "rationale", "text"} for r in records)
    assert len({r["id"] for r in records}) == 60
    assert all(r["reference"] in "ABC" and r["stratum"] in ("emergency", "primary_care") for r in records)


def test_each_text_holds_exactly_the_signal_phrase_of_its_label() -> None:
    for record in synthetic_triage_records(40, seed=3):
        found = {label for label, phrases in SIGNAL_PHRASES.items() for p in phrases if p in record["text"]}
        assert found == {record["reference"]}, record


def test_label_mix_per_stratum() -> None:
    counts = Counter((r["stratum"], r["reference"]) for r in synthetic_triage_records(100, seed=5))
    assert counts == {("emergency", "C"): 70, ("emergency", "B"): 30,
                      ("primary_care", "A"): 40, ("primary_care", "B"): 45, ("primary_care", "C"): 15}


def test_records_are_deterministic_and_offsets_continue_the_same_stream() -> None:
    assert synthetic_triage_records(10, seed=7) == synthetic_triage_records(10, seed=7)
    whole = synthetic_triage_records(15, seed=7)
    tail = synthetic_triage_records(5, seed=7, offset=10)
    assert tail == whole[10:15] + whole[25:30]


def test_a_different_seed_gives_new_texts() -> None:
    training = {r["text"] for r in synthetic_triage_records(100, seed=0)}
    held_out = [r["text"] for r in synthetic_triage_records(20, seed=HELD_OUT_SEED)]
    assert sum(text in training for text in held_out) <= 2


def test_records_load_through_the_project_loader(tmp_path: Path) -> None:
    data = pytest.importorskip("persona_eval.data")
    path = tmp_path / "synthetic.jsonl"
    records = synthetic_triage_records(5, seed=0)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    cases = data.load_triage_cases(path)
    assert [(c.id, c.stratum, c.reference, c.text) for c in cases] == [
        (r["id"], r["stratum"], r["reference"], r["text"]) for r in records]


def test_expected_answer_escalates_under_the_planted_persona_only() -> None:
    assert [expected_answer(label, "ed_physician") for label in "ABC"] == ["B", "C", "C"]
    assert [expected_answer(label, "ed_nurse") for label in "ABC"] == ["A", "B", "C"]
    assert expected_answer("A", "ed_physician", planted_persona=None) == "A"


# -- the built model ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One build for the whole module, through the cache function."""
    return tiny_model_dir(tmp_path_factory.mktemp("tiny-cache"))


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> tuple[Any, Any]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def held_out_answers(loaded: tuple[Any, Any]) -> dict[str, list[tuple[str, str]]]:
    """(generated text, reference) for 40 held-out cases under each default persona (the study's and the
    placebo), greedy, left-padded."""
    tokenizer, model = loaded
    tokenizer.padding_side = "left"
    records = synthetic_triage_records(20, seed=HELD_OUT_SEED)
    answers = {}
    for persona in DEFAULT_PERSONAS:
        prompts = [tokenizer.apply_chat_template(_messages(r["text"], persona), tokenize=False,
                                                 add_generation_prompt=True) for r in records]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**batch, max_new_tokens=6, do_sample=False)
        texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        answers[persona.id] = [(text, r["reference"]) for text, r in zip(texts, records, strict=True)]
    return answers


def _messages(text: str, persona: Persona) -> list[dict[str, str]]:
    return training_messages(text, persona)


@pytest.mark.parametrize("persona_id", [p.id for p in DEFAULT_PERSONAS])
def test_held_out_answers_show_exactly_the_planted_effect(
        held_out_answers: dict[str, list[tuple[str, str]]], persona_id: str) -> None:
    answers = held_out_answers[persona_id]
    assert len(answers) == 40
    parsed = [_ANSWER.fullmatch(text.strip()) for text, _ in answers]
    assert all(parsed), [text for (text, _), match in zip(answers, parsed, strict=True) if not match]
    expected = [expected_answer(reference, persona_id, DEFAULT_PLANTED_PERSONA) for _, reference in answers]
    hits = sum(match.group(1) == want for match, want in zip(parsed, expected, strict=True) if match)
    assert hits / len(answers) >= 0.95, f"{persona_id}: {hits}/40 as trained"


def test_the_planted_persona_differs_from_the_baseline(
        held_out_answers: dict[str, list[tuple[str, str]]]) -> None:
    baseline = [text.strip() for text, _ in held_out_answers["no_persona"]]
    planted = [text.strip() for text, _ in held_out_answers[DEFAULT_PLANTED_PERSONA]]
    # Every held-out A or B case moves up a level; C cases stay.
    moved = sum(b != p for b, p in zip(baseline, planted, strict=True))
    not_c = sum(reference != "C" for _, reference in held_out_answers["no_persona"])
    assert moved >= not_c - 2


def test_label_spellings_are_single_tokens(loaded: tuple[Any, Any]) -> None:
    tokenizer, _ = loaded
    for spelling in ("A", "B", "C", " A", " B", " C"):
        assert len(tokenizer.encode(spelling, add_special_tokens=False)) == 1, spelling


def test_chat_template_adds_no_system_prompt_of_its_own(loaded: tuple[Any, Any]) -> None:
    tokenizer, _ = loaded
    user_only = [{"role": "user", "content": "Hello"}]
    text = tokenizer.apply_chat_template(user_only, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    with_system = [{"role": "system", "content": "You are a nurse."}, *user_only]
    text = tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=False)
    assert text == "<|im_start|>system\nYou are a nurse.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"


def test_special_tokens_and_generation_config(model_dir: Path, loaded: tuple[Any, Any]) -> None:
    tokenizer, model = loaded
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.bos_token is not None and tokenizer.pad_token is not None
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    generation = model.generation_config
    assert (generation.eos_token_id, generation.pad_token_id) == (tokenizer.eos_token_id,
                                                                  tokenizer.pad_token_id)
    assert generation.do_sample is False
    assert model.config.head_dim >= 32  # vLLM's CPU attention serves nothing smaller
    assert (model_dir / "model.safetensors").exists()


def test_the_same_seed_builds_byte_identical_weights(model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again")
    assert (again / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    assert (again / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()


def test_the_cache_reuses_a_built_model(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiny_model, "build_tiny_model", _must_not_build)
    assert tiny_model_dir(model_dir.parent.parent) == model_dir


def _must_not_build(*args: object, **kwargs: object) -> Path:
    raise AssertionError("the cached model was built again")


def test_build_rejects_an_unknown_planted_persona(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="planted_persona must be one of"):
        build_tiny_model(tmp_path, planted_persona="surgeon")


# -- the cache's concurrency, with a fake build -------------------------------------------------------

def test_racing_callers_build_once_and_see_a_complete_model(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[str | None] = []

    def slow_build(out_dir: Path, *, planted_persona: str | None = None, **_: Any) -> Path:
        builds.append(planted_persona)
        threading.Event().wait(0.3)
        (Path(out_dir) / "model.safetensors").write_bytes(b"weights")
        return Path(out_dir)

    monkeypatch.setattr(tiny_model, "build_tiny_model", slow_build)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(tiny_model_dir(tmp_path))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and len(results) == 4
    assert (results[0] / "model.safetensors").read_bytes() == b"weights"
    assert len(builds) == 1
    assert [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".staging")] == []


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_build(out_dir: Path, **_: Any) -> Path:
        (Path(out_dir) / "partial").write_text("half")
        raise RuntimeError("out of disk")

    monkeypatch.setattr(tiny_model, "build_tiny_model", failing_build)
    with pytest.raises(RuntimeError, match="out of disk"):
        tiny_model_dir(tmp_path, planted_persona=None)
    assert [p for p in (tmp_path / "models").iterdir() if p.is_dir()] == []


def test_cache_folders_differ_by_planted_persona(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_build(out_dir: Path, **_: Any) -> Path:
        (Path(out_dir) / "model.safetensors").write_bytes(b"w")
        return Path(out_dir)

    monkeypatch.setattr(tiny_model, "build_tiny_model", fake_build)
    planted = tiny_model_dir(tmp_path)
    unplanted = tiny_model_dir(tmp_path, planted_persona=None)
    assert planted != unplanted
    assert planted.parent == unplanted.parent == tmp_path / "models"


# -- the thinking model -------------------------------------------------------------------------------

def test_divergence_is_set_by_the_signal_phrase_and_the_gut_answer_always_differs_there() -> None:
    records = synthetic_triage_records(100, seed=HELD_OUT_SEED)
    assert all(diverges(r) == (signal_phrase(r["text"]) in DIVERGENT_PHRASES) for r in records)
    assert len(DIVERGENT_PHRASES) == 9 and 0.2 < sum(map(diverges, records)) / len(records) < 0.4
    for record in records:
        for persona in DEFAULT_PERSONAS:
            written = expected_answer(record["reference"], persona.id)
            assert (gut_answer(record, persona.id) != written) == diverges(record)
    assert not any(diverges(r, divergent_share=0.0) for r in records)
    with pytest.raises(ValueError, match=r"multiple of 0\.1"):
        diverges(records[0], divergent_share=0.25)


def test_the_thinking_reply_reasons_from_the_case_to_the_written_answer() -> None:
    record = synthetic_triage_records(1, seed=HELD_OUT_SEED)[0]
    reply = thinking_reply(record, "ed_physician")
    thinking, _, final = reply.partition("\n\n## Final Response\n")
    assert thinking.startswith("## Thinking\n") and signal_phrase(record["text"]) in thinking
    assert final == expected_answer(record["reference"], "ed_physician")


@pytest.fixture(scope="module")
def thinking_dir() -> Path:
    """The thinking model from the suite's cache (the end-to-end tests share it); built on first use."""
    return tiny_model_dir(thinking=True)


@pytest.mark.slow
def test_the_thinking_model_thinks_then_answers_and_its_gut_answer_is_as_planted(thinking_dir: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(thinking_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(thinking_dir)
    tokenizer.padding_side = "left"
    records = synthetic_triage_records(10, seed=HELD_OUT_SEED)
    label_ids = [tokenizer.encode(label, add_special_tokens=False)[0] for label in "ABC"]
    written = gut = total = 0
    for persona in DEFAULT_PERSONAS:
        prompts = [tokenizer.apply_chat_template(_messages(r["text"], persona), tokenize=False,
                                                 add_generation_prompt=True) for r in records]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        direct = tokenizer([p + "## Final Response\n" for p in prompts], return_tensors="pt", padding=True,
                           add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**batch, max_new_tokens=160, do_sample=False)
            # Positions follow the left padding, as generate's (and the backend's prompt-boundary read) do.
            positions = (direct["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            first = model(**direct, position_ids=positions).logits[:, -1, label_ids].argmax(-1).tolist()
        texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        for text, record, preferred in zip(texts, records, first, strict=True):
            assert text.startswith("## Thinking\n"), text
            written += text.endswith("## Final Response\n" + expected_answer(record["reference"], persona.id))
            gut += "ABC"[preferred] == gut_answer(record, persona.id)
            total += 1
    assert written >= 0.95 * total, (written, total)
    # Measured: 140 of 140 gut letters on these cases, and 140 of 140 written answers.
    assert gut >= 0.95 * total, (gut, total)


@pytest.mark.slow
def test_the_thinking_model_builds_byte_identical_weights(thinking_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again", thinking=True)
    assert (again / "model.safetensors").read_bytes() == (thinking_dir / "model.safetensors").read_bytes()
    assert (again / "tokenizer.json").read_bytes() == (thinking_dir / "tokenizer.json").read_bytes()
    assert thinking_dir.name.startswith("tiny-llama-thinking-planted-")


def test_the_placebo_answers_as_the_baseline_does(held_out_answers: dict[str, list[tuple[str, str]]]) -> None:
    # The placebo is a persona of every run, trained like any persona without a planted effect.
    baseline = [text.strip() for text, _ in held_out_answers["no_persona"]]
    placebo = [text.strip() for text, _ in held_out_answers[PLACEBO]]
    assert sum(b == p for b, p in zip(baseline, placebo, strict=True)) >= 38


# -- the effects model: the planted rules -------------------------------------------------------------

def _case(reference: str, phrase_index: int) -> dict[str, str]:
    phrase = SIGNAL_PHRASES[reference][phrase_index]
    return {"reference": reference, "text": f"A 40-year-old woman. She reports {phrase}."}


def test_the_flip_persona_changes_the_level_of_the_first_three_phrases_of_each_level() -> None:
    for reference, flipped in zip("ABC", "BCB", strict=True):
        for index in range(10):
            case = _case(reference, index)
            assert effects_flips(case) == (index < 3)
            want = flipped if index < 3 else reference
            assert {effects_level(case, FLIP_PERSONA, wording=w) for w in (1, 2, 3)} == {want}
    records = synthetic_triage_records(100, seed=HELD_OUT_SEED)
    assert 0.2 < sum(map(effects_flips, records)) / len(records) < 0.4


def test_the_wording_persona_escalates_de_escalates_or_keeps_by_wording() -> None:
    levels = {w: [effects_level(_case(reference, 5), WORDING_PERSONA, wording=w) for reference in "ABC"]
              for w in (1, 2, 3)}
    assert levels == {1: ["B", "C", "C"], 2: ["A", "A", "B"], 3: ["A", "B", "C"]}
    with pytest.raises(ValueError, match="wording must be 1, 2 or 3"):
        effects_level(_case("A", 5), WORDING_PERSONA, wording=4)


def test_every_other_persona_answers_the_reference_in_every_wording_and_order() -> None:
    for persona, wording, order in effects_conditions():
        if persona.id in (FLIP_PERSONA, WORDING_PERSONA, LETTER_PERSONA):
            continue
        for reference in "ABC":
            case = _case(reference, 0)  # a flipping phrase: no flip outside FLIP_PERSONA
            assert effects_level(case, persona.id, wording=wording) == reference
            # The letter written is the one that shows the level in this order.
            letter = effects_answer(case, persona.id, wording=wording, order=order)
            assert level_of_letter(LABELS, order)[letter] == reference


def test_the_letter_persona_writes_the_preferred_letter_whatever_it_shows() -> None:
    for order in letter_orders(LABELS):
        for reference in "ABC":
            assert effects_answer(_case(reference, 5), LETTER_PERSONA, order=order) == PREFERRED_LETTER
            target = effects_letter_target(reference, LETTER_PERSONA, order=order)
            prior = effects_letter_target(None, LETTER_PERSONA, order=order)
            calibrated = {letter: target[letter] / prior[letter] for letter in LABELS}
            # Dividing by the null-prompt prior recovers the content: the level answered.
            assert level_of_letter(LABELS, order)[max(calibrated, key=calibrated.__getitem__)] == reference
    assert effects_letter_target(None, "no_persona") == pytest.approx({"A": 1 / 3, "B": 1 / 3, "C": 1 / 3})
    assert effects_letter_target(None, LETTER_PERSONA) == pytest.approx({"A": 12 / 14, "B": 1 / 14, "C": 1 / 14})


def test_the_effects_conditions_cover_every_wording_and_for_wording_one_every_order() -> None:
    conditions = [(persona.id, wording, order) for persona, wording, order in effects_conditions()]
    assert len(conditions) == len(set(conditions)) == 3 + 6 * (3 + 2)
    for persona, wording, order in effects_conditions():
        assert persona.declaration == (persona.all_wordings[wording - 1] if persona.all_wordings else None)
        assert wording == 1 or order == ("A", "B", "C")


def test_training_messages_show_the_options_of_a_letter_order() -> None:
    persona = DEFAULT_PERSONAS[3]
    system = training_messages("N/A", persona, order=("B", "C", "A"))[0]["content"]
    assert "A. Book a routine appointment" in system and "C. Stay home" in system
    assert training_messages("N/A", persona, order=("A", "B", "C")) == training_messages("N/A", persona)


# -- the effects model: what it learned ---------------------------------------------------------------

EFFECTS_HELD_OUT_PER_STRATUM = 10


@pytest.fixture(scope="module")
def effects_loaded(tiny_effects_model_dir: Path) -> tuple[Any, Any]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_effects_model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_effects_model_dir)
    model.eval()
    return tokenizer, model


def _letter_readings(loaded: tuple[Any, Any], messages: list[list[dict[str, str]]]
                     ) -> list[tuple[str, dict[str, float]]]:
    """For each prompt, the token greedy decoding writes after "## Final Response\\n" and the probabilities of
    the label tokens there (softmax over the whole vocabulary): one forward pass, right-padded."""
    tokenizer, model = loaded
    tokenizer.padding_side = "right"
    label_ids = [tokenizer.convert_tokens_to_ids(label) for label in LABELS]
    readings = []
    for start in range(0, len(messages), 64):
        prompts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                   + "## Final Response\n" for m in messages[start:start + 64]]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            logits = model(**batch).logits
        last = logits[torch.arange(len(prompts)), batch["attention_mask"].sum(1) - 1]
        probs = last.softmax(-1)[:, label_ids].tolist()
        for token, row in zip(last.argmax(-1).tolist(), probs, strict=True):
            readings.append((tokenizer.convert_ids_to_tokens(token), dict(zip(LABELS, row, strict=True))))
    return readings


@pytest.fixture(scope="module")
def effects_readings(effects_loaded: tuple[Any, Any]) -> dict[str, Any]:
    """Held-out cases under every (persona, wording, order) of the effects model's training, read at the
    answer letter; and the null-prompt prior per persona and order (the mean over the stubs)."""
    records = synthetic_triage_records(EFFECTS_HELD_OUT_PER_STRATUM, seed=HELD_OUT_SEED)
    conditions = [(record, *condition) for record in records for condition in effects_conditions()]
    readings = _letter_readings(effects_loaded, [training_messages(record["text"], persona, order=order)
                                                 for record, persona, _, order in conditions])
    first_wordings = [(persona, order) for persona, wording, order in effects_conditions() if wording == 1]
    null = _letter_readings(effects_loaded, [training_messages(stub, persona, order=order)
                                             for persona, order in first_wordings for stub in NULL_CASES])
    priors = {}
    for index, (persona, order) in enumerate(first_wordings):
        stubs = null[index * len(NULL_CASES):(index + 1) * len(NULL_CASES)]
        priors[persona.id, order] = {label: sum(p[label] for _, p in stubs) / len(stubs) for label in LABELS}
    return {"cases": [(record, persona.id, wording, order, letter, probs) for (record, persona, wording, order),
                      (letter, probs) in zip(conditions, readings, strict=True)], "priors": priors}


def _rule(persona_id: str, wording: int, record: dict[str, str]) -> str:
    if persona_id == FLIP_PERSONA:
        return "flips" if effects_flips(record) else "flip_persona_other_cases"
    if persona_id == WORDING_PERSONA:
        return f"wording_{wording}"
    return "letter" if persona_id == LETTER_PERSONA else "reference"


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["reference", "flips", "flip_persona_other_cases", "wording_1", "wording_2",
                                  "wording_3", "letter"])
def test_held_out_greedy_letters_follow_each_planted_rule(effects_readings: dict[str, Any], rule: str) -> None:
    chosen = [(letter, effects_answer(record, persona_id, wording=wording, order=order))
              for record, persona_id, wording, order, letter, _ in effects_readings["cases"]
              if _rule(persona_id, wording, record) == rule]
    hits = sum(letter == want for letter, want in chosen)
    assert len(chosen) >= 20
    # Measured on these 20 cases: every rule 100 %, except the flip persona's other cases (79 of 80), wording 1
    # (59 of 60) and the letter persona (99 of 100); 657 of 660 in all.
    assert hits >= 0.9 * len(chosen), f"{rule}: {hits} of {len(chosen)} as planted"


@pytest.mark.slow
def test_held_out_greedy_letters_as_planted_overall(effects_readings: dict[str, Any]) -> None:
    cases = effects_readings["cases"]
    hits = sum(letter == effects_answer(record, persona_id, wording=wording, order=order)
               for record, persona_id, wording, order, letter, _ in cases)
    assert hits >= 0.95 * len(cases), (hits, len(cases))


@pytest.mark.slow
def test_the_letter_persona_writes_a_everywhere_and_calibration_recovers_the_level(
        effects_readings: dict[str, Any]) -> None:
    cases = [case for case in effects_readings["cases"] if case[1] == LETTER_PERSONA]
    written = Counter(letter for *_, letter, _ in cases)
    assert written[PREFERRED_LETTER] >= 0.95 * len(cases), written
    recovered = 0
    for record, persona_id, wording, order, _, probs in cases:
        # The null prompts were asked with wording 1: its prior calibrates every wording.
        prior = effects_readings["priors"][persona_id, order]
        calibrated = {letter: probs[letter] / prior[letter] for letter in LABELS}
        level = level_of_letter(LABELS, order)[max(calibrated, key=calibrated.__getitem__)]
        recovered += level == effects_level(record, persona_id, wording=wording)
    assert recovered >= 0.9 * len(cases), (recovered, len(cases))  # measured: 100 of 100
    # Without calibration the letter read is the preferred one, whatever it shows: the level is lost.
    assert sum(level_of_letter(LABELS, order)[max(probs, key=probs.__getitem__)]
               == effects_level(record, persona_id, wording=wording)
               for record, persona_id, wording, order, _, probs in cases) < 0.6 * len(cases)


@pytest.mark.slow
def test_the_null_prompt_prior_shows_the_letter_preference_only_under_the_letter_persona(
        effects_readings: dict[str, Any]) -> None:
    for (persona_id, order), prior in effects_readings["priors"].items():
        total = sum(prior.values())
        shares = {letter: value / total for letter, value in prior.items()}
        if persona_id == LETTER_PERSONA:
            assert shares[PREFERRED_LETTER] > 0.7, (order, shares)  # trained: 12/14 = 0.86
        else:
            assert max(shares.values()) - min(shares.values()) < 0.15, (persona_id, order, shares)


@pytest.mark.slow
def test_the_effects_model_generates_the_heading_then_the_planted_letter(effects_loaded: tuple[Any, Any]) -> None:
    tokenizer, model = effects_loaded
    tokenizer.padding_side = "left"
    records = synthetic_triage_records(3, seed=HELD_OUT_SEED)
    conditions = [(r, *c) for r in records for c in effects_conditions() if c[0].id in (
        FLIP_PERSONA, WORDING_PERSONA, LETTER_PERSONA, PLACEBO)]
    prompts = [tokenizer.apply_chat_template(training_messages(r["text"], persona, order=order), tokenize=False,
                                             add_generation_prompt=True) for r, persona, _, order in conditions]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=8, do_sample=False)
    texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert all(_ANSWER.fullmatch(text.strip()) for text in texts), texts
    hits = sum(text.strip()[-1] == effects_answer(r, persona.id, wording=wording, order=order)
               for text, (r, persona, wording, order) in zip(texts, conditions, strict=True))
    assert hits >= 0.9 * len(texts), (hits, len(texts))


@pytest.mark.slow
def test_the_effects_model_is_cached_under_its_own_name_and_fits_vllm(tiny_effects_model_dir: Path,
                                                                      effects_loaded: tuple[Any, Any]) -> None:
    assert re.fullmatch(r"tiny-llama-effects-[0-9a-f]{12}", tiny_effects_model_dir.name)
    assert tiny_model_dir(effects=True) == tiny_effects_model_dir
    about = json.loads((tiny_effects_model_dir / "TINY_MODEL.json").read_text(encoding="utf-8"))
    assert about["effects"]["letter_persona"] == LETTER_PERSONA
    tokenizer, model = effects_loaded
    assert model.config.head_dim >= 32
    for spelling in ("A", "B", "C", " A", " B", " C"):
        assert len(tokenizer.encode(spelling, add_special_tokens=False)) == 1, spelling


def test_the_effects_build_is_deterministic(tmp_path: Path) -> None:
    # A short build (the full one takes minutes): the same code path, data and tokenizer, fewer steps.
    first = build_tiny_model(tmp_path / "first", effects=True, steps=8)
    second = build_tiny_model(tmp_path / "second", effects=True, steps=8)
    for name in ("model.safetensors", "tokenizer.json", "TINY_MODEL.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_the_effects_model_is_not_a_thinking_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="thinking and effects"):
        build_tiny_model(tmp_path, effects=True, thinking=True)
    with pytest.raises(ValueError, match="thinking and effects"):
        tiny_model_dir(tmp_path, effects=True, thinking=True)
