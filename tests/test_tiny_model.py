"""Tests of persona_eval.testing.tiny_model: the synthetic cases, the tokenizer, the planted effect, the cache."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from persona_eval.personas import STUDY_PERSONAS, Persona
from persona_eval.testing import tiny_model
from persona_eval.testing.tiny_model import (
    DEFAULT_PLANTED_PERSONA,
    DIVERGENT_PHRASES,
    SIGNAL_PHRASES,
    build_tiny_model,
    diverges,
    expected_answer,
    gut_answer,
    signal_phrase,
    synthetic_triage_records,
    thinking_reply,
    tiny_model_dir,
    training_messages,
)

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
    """(generated text, reference) for 40 held-out cases under each study persona, greedy, left-padded."""
    tokenizer, model = loaded
    tokenizer.padding_side = "left"
    records = synthetic_triage_records(20, seed=HELD_OUT_SEED)
    answers = {}
    for persona in STUDY_PERSONAS:
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


@pytest.mark.parametrize("persona_id", [p.id for p in STUDY_PERSONAS])
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
        for persona in STUDY_PERSONAS:
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
    for persona in STUDY_PERSONAS:
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
    # Measured: 120 of 120 gut letters on these cases, and 120 of 120 written answers.
    assert gut >= 0.95 * total, (gut, total)


@pytest.mark.slow
def test_the_thinking_model_builds_byte_identical_weights(thinking_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again", thinking=True)
    assert (again / "model.safetensors").read_bytes() == (thinking_dir / "model.safetensors").read_bytes()
    assert (again / "tokenizer.json").read_bytes() == (thinking_dir / "tokenizer.json").read_bytes()
    assert thinking_dir.name.startswith("tiny-llama-thinking-planted-")
