"""Tests of persona_eval.prompts and of HFBackend's chat-template handling (system policy, rendered text).

The HF tests build tiny tokenizers here, each with a hand-written chat template that behaves like a real
family's: ChatML that injects a default system prompt (SmolLM2, Qwen2.5), plain ChatML, a template that
rejects a system role, and one that folds the system message into the first user turn (Gemma 3).
No weights are ever loaded: system_policy and render_prompt need the tokenizer only.
"""

from __future__ import annotations

import doctest
import itertools
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from persona_eval import prompts as prompts_module
from persona_eval.backends.hf import HFBackend
from persona_eval.errors import BackendError, ConfigError
from persona_eval.personas import STUDY_PERSONAS, Persona
from persona_eval.prompts import RenderedMessages, SystemPolicy, render_messages
from persona_eval.templates import render_case

BASELINE, ASSISTANT, ED_PHYSICIAN, ED_NURSE, BOLD, CAUTIOUS = STUDY_PERSONAS
CASE = render_case("A 67-year-old man with slurred speech since 40 minutes ago.", STUDY_PERSONAS[0],
                   template="answer-first").messages[-1][1]

POLICIES = [
    SystemPolicy(),
    SystemPolicy(baseline_empty_system=True),
    SystemPolicy(system_role_supported=False),
    SystemPolicy(system_role_supported=False, baseline_empty_system=True),
]

# --- render_messages ---------------------------------------------------------------------------------


def test_prompts_module_doctests_pass() -> None:
    result = doctest.testmod(prompts_module)
    assert result.attempted > 0
    assert result.failed == 0


def test_baseline_sends_no_system_message_by_default() -> None:
    rendered = render_messages(CASE, BASELINE)
    assert rendered.messages == (("user", CASE),)
    assert rendered.system_prompt is None
    assert rendered.as_dicts() == [{"role": "user", "content": CASE}]


def test_baseline_sends_an_empty_system_message_when_the_template_injects_a_default() -> None:
    rendered = render_messages(CASE, BASELINE, SystemPolicy(baseline_empty_system=True))
    assert rendered.messages == (("system", ""), ("user", CASE))
    assert rendered.system_prompt == ""


def test_persona_is_the_system_message() -> None:
    for policy in (SystemPolicy(), SystemPolicy(baseline_empty_system=True)):
        rendered = render_messages(CASE, ED_PHYSICIAN, policy)
        assert rendered.messages == (("system", "You are an Emergency Department physician."), ("user", CASE))
        assert rendered.system_prompt == "You are an Emergency Department physician."
        assert rendered.as_dicts()[0] == {"role": "system", "content": "You are an Emergency Department physician."}


@pytest.mark.parametrize("baseline_empty_system", [False, True])
def test_without_system_support_the_declaration_opens_the_user_turn(baseline_empty_system: bool) -> None:
    policy = SystemPolicy(system_role_supported=False, baseline_empty_system=baseline_empty_system)
    rendered = render_messages(CASE, BOLD, policy)
    assert rendered.messages == (("user", f"You are a bold Emergency Department physician.\n\n{CASE}"),)
    assert rendered.system_prompt is None
    # The baseline never sends a system message to a template that has no system role.
    assert render_messages(CASE, BASELINE, policy).messages == (("user", CASE),)


def test_rendered_messages_are_immutable_and_hashable() -> None:
    rendered = render_messages(CASE, ED_NURSE)
    assert rendered == render_messages(CASE, ED_NURSE)
    assert hash(rendered) == hash(render_messages(CASE, ED_NURSE))
    with pytest.raises(AttributeError):
        rendered.system_prompt = "x"  # type: ignore[misc]


def _declaration_removed(rendered: RenderedMessages, persona: Persona) -> tuple[tuple[str, str], ...]:
    """The messages with the persona's declaration taken out: what every condition must share."""
    kept = []
    for role, content in rendered.messages:
        if role == "system":
            assert content == (persona.declaration or "")
            continue
        if persona.declaration is not None and rendered.system_prompt is None and role == "user":
            prefix = persona.declaration + "\n\n"
            assert content.startswith(prefix)
            content = content[len(prefix):]
        kept.append((role, content))
    return tuple(kept)


_PERSONAS_FOR_PROPERTY = [*STUDY_PERSONAS,
                          Persona("primary_care_physician", "PCP", "medical", "You are a primary care physician.")]


@settings(max_examples=60, deadline=None)
@given(user_content=st.text(min_size=0, max_size=200), policy=st.sampled_from(POLICIES))
def test_conditions_differ_only_in_the_declaration(user_content: str, policy: SystemPolicy) -> None:
    for first, second in itertools.combinations(_PERSONAS_FOR_PROPERTY, 2):
        one = render_messages(user_content, first, policy)
        two = render_messages(user_content, second, policy)
        assert _declaration_removed(one, first) == _declaration_removed(two, second) == (("user", user_content),)
        if policy.system_role_supported:
            # The user turn is the same string, byte for byte, in every condition.
            assert one.messages[-1] == two.messages[-1] == ("user", user_content)
        for persona, rendered in ((first, one), (second, two)):
            sent_system = dict(rendered.messages).get("system")
            assert rendered.system_prompt == sent_system
            if persona.declaration is not None:
                assert sum(persona.declaration in content for _, content in rendered.messages) == 1


# --- HFBackend with tiny tokenizers ------------------------------------------------------------------

SMOLLM_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHATML_INJECTING = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SMOLLM_DEFAULT + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_PLAIN = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NO_SYSTEM_ROLE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
GEMMA_FOLDING = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{{ (first_user_prefix if loop.first else '') }}{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
TEMPLATES = {
    "chatml_injecting": CHATML_INJECTING,
    "chatml_plain": CHATML_PLAIN,
    "no_system_role": NO_SYSTEM_ROLE,
    "gemma_folding": GEMMA_FOLDING,
}


@pytest.fixture(scope="module")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A model directory per template, holding tokenizer files and a dummy weights file only."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "<bos>": 1, "<eos>": 2, "A": 3, "B": 4, "C": 5, "Answer": 6, ":": 7}
    dirs = {}
    for name, template in TEMPLATES.items():
        word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
        word_level.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=word_level, bos_token="<bos>", eos_token="<eos>", unk_token="[UNK]",
            chat_template=template)
        directory = tmp_path_factory.mktemp(name)
        tokenizer.save_pretrained(str(directory))
        (directory / "model.safetensors").write_bytes(b"not really weights: " + name.encode())
        dirs[name] = directory
    return dirs


@pytest.fixture
def hf_backend(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> Callable[[str], HFBackend]:
    def make(template: str) -> HFBackend:
        return HFBackend(template, str(tiny_model_dirs[template]), memo_dir=tmp_path / "memo")
    return make


@pytest.mark.parametrize(("template", "expected"), [
    ("chatml_injecting", SystemPolicy(system_role_supported=True, baseline_empty_system=True)),
    ("chatml_plain", SystemPolicy(system_role_supported=True, baseline_empty_system=False)),
    ("no_system_role", SystemPolicy(system_role_supported=False, baseline_empty_system=False)),
    # prompts.py: templates that "fold it into the first user turn, as Gemma's do" get
    # system_role_supported = False, so the record never claims a system message the model did not get.
    ("gemma_folding", SystemPolicy(system_role_supported=False, baseline_empty_system=False)),
])
def test_system_policy_is_detected_from_the_chat_template(hf_backend: Callable[[str], HFBackend], template: str,
                                                          expected: SystemPolicy) -> None:
    backend = hf_backend(template)
    assert backend.system_policy() == expected
    assert backend.system_policy() is backend.system_policy()
    assert backend._model is None  # no weights loaded


def _difference(first: str, second: str) -> tuple[str, str]:
    """What is left of each string once their common prefix and common suffix are removed."""
    start = 0
    while start < min(len(first), len(second)) and first[start] == second[start]:
        start += 1
    end = 0
    while (end < min(len(first), len(second)) - start
           and first[len(first) - 1 - end] == second[len(second) - 1 - end]):
        end += 1
    return first[start:len(first) - end], second[start:len(second) - end]


def _prompts(backend: HFBackend, persona: Persona) -> str:
    policy = backend.system_policy()
    return str(backend.render_prompt(render_messages(CASE, persona, policy)))


@pytest.mark.parametrize("persona", STUDY_PERSONAS[1:], ids=lambda p: p.id)
def test_injecting_template_baseline_and_persona_differ_exactly_by_the_declaration(
        hf_backend: Callable[[str], HFBackend], persona: Persona) -> None:
    backend = hf_backend("chatml_injecting")
    baseline_prompt = _prompts(backend, BASELINE)
    persona_prompt = _prompts(backend, persona)
    assert _difference(persona_prompt, baseline_prompt) == (persona.declaration, "")
    assert persona_prompt == baseline_prompt.replace("<|im_start|>system\n<|im_end|>",
                                                     f"<|im_start|>system\n{persona.declaration}<|im_end|>")
    for prompt in (baseline_prompt, persona_prompt):
        assert SMOLLM_DEFAULT not in prompt
        assert CASE in prompt
        assert prompt.endswith("<|im_start|>assistant\n")


def test_injecting_template_would_give_the_baseline_a_default_identity_without_the_policy(
        hf_backend: Callable[[str], HFBackend]) -> None:
    # Why the policy exists: with no system message at all, the template speaks for the baseline.
    backend = hf_backend("chatml_injecting")
    naive = backend.render_prompt(render_messages(CASE, BASELINE, SystemPolicy()))
    assert SMOLLM_DEFAULT in naive


@pytest.mark.parametrize("template", ["chatml_plain", "no_system_role", "gemma_folding"])
@pytest.mark.parametrize("persona", STUDY_PERSONAS[1:], ids=lambda p: p.id)
def test_other_templates_differ_only_by_the_declaration(hf_backend: Callable[[str], HFBackend], template: str,
                                                        persona: Persona) -> None:
    backend = hf_backend(template)
    baseline_prompt = _prompts(backend, BASELINE)
    persona_prompt = _prompts(backend, persona)
    added, removed = _difference(persona_prompt, baseline_prompt)
    assert persona.declaration is not None
    assert removed == ""
    assert persona.declaration in added
    assert SMOLLM_DEFAULT not in baseline_prompt
    if template == "chatml_plain":
        assert persona_prompt == f"<|im_start|>system\n{persona.declaration}<|im_end|>\n" + baseline_prompt
    else:
        # Folded or prepended: the declaration is the first paragraph of the user turn.
        assert added == f"{persona.declaration}\n\n"
        assert f"<start_of_turn>user\n{persona.declaration}\n\n{CASE.strip()}<end_of_turn>" in persona_prompt


def test_render_prompt_is_the_template_output_with_the_generation_prompt(hf_backend: Callable[[str], HFBackend]
                                                                         ) -> None:
    backend = hf_backend("chatml_plain")
    prompt = backend.render_prompt(render_messages("Hi", ED_NURSE))
    assert prompt == ("<|im_start|>system\nYou are an Emergency Department nurse.<|im_end|>\n"
                      "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_a_tokenizer_without_chat_template_is_a_config_error(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")

    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "<eos>": 1}, unk_token="[UNK]"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token="<eos>",
                                                     unk_token="[UNK]")
    tokenizer.save_pretrained(str(tmp_path))
    assert not os.path.exists(tmp_path / "chat_template.jinja")
    backend = HFBackend("base", str(tmp_path))
    # Not swallowed into "no system role": a base model cannot be evaluated at all.
    with pytest.raises(ConfigError, match="has no chat template"):
        backend.system_policy()
    with pytest.raises(ConfigError, match="has no chat template"):
        backend.render_prompt(render_messages(CASE, ED_NURSE))


def test_a_tokenizer_that_cannot_load_is_a_backend_error_from_system_policy(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"weights but no tokenizer")
    backend = HFBackend("broken", str(tmp_path))
    with pytest.raises(BackendError, match="cannot load the tokenizer"):
        backend.system_policy()
