"""The transformers backend on the tiny trained model: stop sequences end an answer as an OpenAI-compatible
server ends it, and the thinking switch reaches the chat template, or is refused where the template has
none."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from persona_eval.backends.base import GenerationConfig, LabelScoring
from persona_eval.backends.hf import HFBackend
from persona_eval.errors import ConfigError
from persona_eval.personas import STUDY_PERSONAS
from persona_eval.prompts import RenderedMessages
from persona_eval.templates import render_case
from persona_eval.testing.tiny_model import synthetic_triage_records, tiny_model_dir

SCORING = LabelScoring(answer_prefix="## Final Response\n")
# A switch as reasoning models' templates have it: thinking off opens the answer with an empty trace.
SWITCH = ("{% if enable_thinking is defined and not enable_thinking %}"
          "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return tiny_model_dir()


@pytest.fixture(scope="module")
def backend(model_dir: Path) -> HFBackend:
    return HFBackend("tiny", str(model_dir), batch_size=16)


def requests(n_per_stratum: int = 4) -> list[RenderedMessages]:
    """Synthetic cases as the suite sends them (the default template, no persona)."""
    return [render_case(record["text"], STUDY_PERSONAS[0]) for record in
            synthetic_triage_records(n_per_stratum, seed=20261128)]


def test_a_stop_sequence_ends_the_answer_before_it_row_by_row(backend: HFBackend) -> None:
    batch = requests()
    plain = backend.generate(batch, GenerationConfig(max_new_tokens=16), SCORING)
    assert all(g.finish_reason == "stop" and g.text.startswith("## Final Response\n") for g in plain)
    assert {g.text[-1] for g in plain} >= {"C"} and {g.text[-1] for g in plain} - {"C"}, [g.text for g in plain]
    # "C" ends only the answers that write it: those rows end before it, the others as they were.
    stopped = backend.generate(batch, GenerationConfig(max_new_tokens=16, stop=("C",)), SCORING)
    for before, after in zip(plain, stopped, strict=True):
        assert after.finish_reason == "stop"
        if before.text.endswith("C"):
            assert after.text == before.text[:-1] == "## Final Response\n"
            # The letter's token was generated (and is counted), but it is not part of the answer.
            assert after.tokens is not None and before.tokens is not None
            assert [t.token for t in after.tokens] == [t.token for t in before.tokens][:-1]
            assert after.usage["completion_tokens"] == before.usage["completion_tokens"]
        else:
            assert after.text == before.text and after.usage == before.usage
    # A stop sequence is no truncation, even when it ends the answer at its first token.
    early = backend.generate(batch, GenerationConfig(max_new_tokens=16, stop=("##",)), SCORING)
    assert all(g.text == "" and g.finish_reason == "stop" for g in early)


def test_the_decoding_record_names_the_stop_sequences(backend: HFBackend) -> None:
    assert backend.decoding(GenerationConfig(stop=("C",)), None)["stop"] == ["C"]
    assert backend.decoding(GenerationConfig(), None)["stop"] is None


def test_reasoning_switch_is_refused_where_the_chat_template_has_none(model_dir: Path) -> None:
    switched = HFBackend("tiny", str(model_dir), reasoning=False)
    with pytest.raises(ConfigError, match="has no such switch; leave 'reasoning' out"):
        switched.render_prompt(requests(1)[0])


def test_reasoning_switch_reaches_a_template_that_has_one(model_dir: Path, tmp_path: Path) -> None:
    switchable = tmp_path / "switchable"
    shutil.copytree(model_dir, switchable)
    template = switchable / "chat_template.jinja"
    template.write_text(template.read_text() + SWITCH)
    request = requests(1)[0]
    default = HFBackend("t", str(switchable)).render_prompt(request)
    on = HFBackend("t", str(switchable), reasoning=True).render_prompt(request)
    off = HFBackend("t", str(switchable), reasoning=False).render_prompt(request)
    assert default == on and off == on + "<think>\n\n</think>\n\n"
    # The prompt is the cache key's: the prompt lengths count what is sent.
    assert HFBackend("t", str(switchable), reasoning=False).count_prompt_tokens([request])[0] > \
        HFBackend("t", str(switchable)).count_prompt_tokens([request])[0]


def _forward_tokens(backend: HFBackend) -> list[int]:
    """Records the number of input tokens of every forward pass of the backend's model (rows x columns)."""
    model = backend._load()
    backend._cache_argument()  # the model's own parameters are read before the counting wrapper
    seen: list[int] = []
    forward = model.forward

    def counting(*args: object, **kwargs: object) -> object:
        ids = kwargs.get("input_ids")
        seen.append(int(ids.numel()) if ids is not None else 0)  # type: ignore[attr-defined]
        return forward(*args, **kwargs)

    model.forward = counting
    return seen


@pytest.mark.parametrize("thinking", [False, True], ids=["plain", "thinking"])
def test_a_shared_prompt_prefix_is_read_once_and_changes_no_answer(thinking: bool) -> None:
    # Prompts of different lengths that share the persona sentence and the instructions, in one batch.
    batch = [render_case(record["text"], STUDY_PERSONAS[2]) for record in
             synthetic_triage_records(6, seed=20261205)]
    config = GenerationConfig(max_new_tokens=90 if thinking else 16)
    results, reads = {}, {}
    for share in (False, True):
        backend = HFBackend("tiny", str(tiny_model_dir(thinking=thinking)), batch_size=len(batch))
        backend.share_prefix = share
        backend.read_rows = 0  # one group: the same padding either way (groups of rows: the next test)
        reads[share] = _forward_tokens(backend)
        results[share] = backend.generate(batch, config, SCORING)
    prompts = backend.tokenizer([backend.render_prompt(r) for r in batch], add_special_tokens=False)["input_ids"]
    assert len({len(p) for p in prompts}) > 1  # the layout with padding between shared and own tokens is used
    shared = 0
    while all(p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    assert shared >= 20, shared
    for without, with_reuse in zip(results[False], results[True], strict=True):
        assert with_reuse.text == without.text
        assert with_reuse.finish_reason == without.finish_reason and with_reuse.usage == without.usage
        assert with_reuse.tokens is not None and without.tokens is not None
        assert [t.token for t in with_reuse.tokens] == [t.token for t in without.tokens]
        for a, b in zip(with_reuse.tokens, without.tokens, strict=True):
            assert a.label_logprobs == pytest.approx(b.label_logprobs, abs=1e-4)
        assert with_reuse.prompt_label_logprobs == pytest.approx(without.prompt_label_logprobs, abs=1e-4)
    # The prompt pass reads the shared tokens once instead of once per row; the rest is the same work.
    assert sum(reads[False]) - sum(reads[True]) == shared * (len(batch) - 1)


def test_rows_read_in_groups_of_similar_length_change_no_answer_and_the_prefix_is_kept() -> None:
    # Twelve prompts of different lengths read in groups of four (each padded to its own longest row),
    # laid side by side for one generate in a cache with room reserved: the same answers as every row
    # reading its whole prompt in one padded pass, generate growing the cache itself.
    batch = [render_case(record["text"], STUDY_PERSONAS[2]) for record in
             synthetic_triage_records(6, seed=20261205)]
    config = GenerationConfig(max_new_tokens=16)
    results, reads = {}, {}
    for name, share, group in (("whole", False, 16), ("one group", True, 0), ("groups", True, 4)):
        backend = HFBackend("tiny", str(tiny_model_dir()), batch_size=len(batch))
        backend.share_prefix, backend.read_rows = share, group
        backend.reserve_room = share  # the reference grows its cache as transformers does
        reads[name] = _forward_tokens(backend)
        results[name] = backend.generate(batch, config, SCORING)
    for name in ("one group", "groups"):
        for reference, result in zip(results["whole"], results[name], strict=True):
            assert result.text == reference.text and result.finish_reason == reference.finish_reason
            assert result.usage == reference.usage
            assert result.tokens is not None and reference.tokens is not None
            assert [t.token for t in result.tokens] == [t.token for t in reference.tokens]
            for a, b in zip(result.tokens, reference.tokens, strict=True):
                assert a.label_logprobs == pytest.approx(b.label_logprobs, abs=1e-4)
            assert result.prompt_label_logprobs == pytest.approx(reference.prompt_label_logprobs, abs=1e-4)
    # Less padding is read in groups (two more groups: two more own-token and label passes each), and
    # generate itself runs once over the whole batch either way.
    assert sum(reads["groups"]) < sum(reads["one group"])
    assert len(reads["groups"]) == len(reads["one group"]) + 4
    # The next batch of the same persona starts from the kept prefix: no one-row pass reads it again.
    first = len(reads["groups"])
    again = backend.generate(batch[::-1], config, SCORING)
    assert len(reads["groups"]) - first == first - 1
    assert [g.text for g in again] == [g.text for g in results["groups"]][::-1]
    for a, b in zip(again, results["groups"][::-1], strict=True):
        assert a.prompt_label_logprobs == pytest.approx(b.prompt_label_logprobs, abs=1e-4)


def test_a_cache_with_room_reserved_holds_what_concatenation_holds() -> None:
    import torch
    from transformers import DynamicCache

    from persona_eval.backends.hf import _reserve

    steps = [torch.randn(2, 3, n, 4) for n in (5, 1, 1, 3, 40)]
    plain, roomy = DynamicCache(), DynamicCache()
    for cache in (plain, roomy):
        cache.update(steps[0], steps[0] + 1, 0)
    _reserve(roomy, 2)  # room for two tokens: the later steps outgrow it, and room is made again
    for step in steps[1:]:
        expected = plain.update(step, step + 1, 0)
        got = roomy.update(step, step + 1, 0)
        assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    roomy.crop(-10)
    plain.crop(-10)
    roomy.batch_select_indices(torch.tensor([1]))
    plain.batch_select_indices(torch.tensor([1]))
    assert all(torch.equal(a, b) for a, b in zip(plain.update(steps[1][:1], steps[1][:1], 0),
                                                 roomy.update(steps[1][:1], steps[1][:1], 0), strict=True))
    assert roomy.get_seq_length() == plain.get_seq_length() == 41


def test_the_default_batch_is_larger_on_a_cpu_where_decoding_reads_the_weights(model_dir: Path) -> None:
    # Nothing is loaded: the batch size is settled when the backend is made.
    assert HFBackend("tiny", str(model_dir)).batch_size == 64
    assert HFBackend("tiny", str(model_dir), device="cuda").batch_size == 16
    assert HFBackend("tiny", str(model_dir), device="cuda", batch_size=8).batch_size == 8
