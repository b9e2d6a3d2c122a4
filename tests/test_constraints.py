"""The ranking logits processor: only valid rankings can be decoded, on any logits, with a real tokenizer."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from persona_eval.backends.constraints import (
    MAX_RANKING_SIZE,
    RankingConstraint,
    _advance,
    canonical_ranking,
    ranking_constraint,
)
from persona_eval.judges import parse_ranking

START = ("head", 0, frozenset())


# -- the automaton, on text ------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_every_permutation_is_accepted_and_complete(k: int):
    for permutation in itertools.permutations(range(1, k + 1)):
        text = canonical_ranking(permutation)
        assert text == json.dumps({"ranking": list(permutation)})
        assert _advance(START, text, k) == ("done", 0, frozenset(range(1, k + 1)))


@pytest.mark.parametrize("text", [
    '{"ranking": [1, 1',         # repeated number
    '{"ranking": [4',            # out of range for k = 3
    '{"ranking": [0',            # zero
    '{"ranking":[1',             # non-canonical spacing
    '{"ranking": [1, 2]',        # closed before all 3 numbers
    '{"ranking": [1, 2, 3, 4',   # more numbers than k
    '{"ranking": [1, 2, 3]}\n',  # anything after the object
    ' {"ranking"',               # leading space
    '{"rank": [',
])
def test_texts_that_leave_the_language_are_rejected(text: str):
    assert _advance(START, text, 3) is None


def test_prefixes_keep_their_place():
    state = _advance(START, '{"ranking": [2, ', 3)
    assert state == ("number", 0, frozenset({2}))
    assert _advance(state, "3, 1]}", 3) == ("done", 0, frozenset({1, 2, 3}))


# -- the processor, with a toy tokenizer -----------------------------------------------------------------

class ToyTokenizer:
    """Characters, a few multi-character pieces and one token that can never occur; id 0 is the end."""

    def __init__(self) -> None:
        pieces = ["<eos>", *sorted(set('{"ranking": [0123456789, ]}')), '{"', "ranking", '":', " [", ", ",
                  "]}", "12", "1, 2", "x", "\u2581"]
        self.vocab = pieces
        self.all_special_ids = [0]

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        assert text == "a"
        return [len(self.vocab)]  # an anchor outside the vocabulary: decoded as "a"

    def decode(self, ids: list[int], **_: Any) -> str:
        return "".join("a" if i == len(self.vocab) else self.vocab[i] for i in ids)

    def batch_decode(self, batch: list[list[int]], **kwargs: Any) -> list[str]:
        return [self.decode(ids, **kwargs) for ids in batch]


def test_allowed_tokens_at_the_start_and_the_end():
    tokenizer = ToyTokenizer()
    constraint = RankingConstraint(tokenizer, 2, eos_token_ids=[0])
    names = {tokenizer.vocab[i] for i in constraint.allowed(START)}
    assert names == {"{", '{"'}
    after_head = constraint.state_after([tokenizer.vocab.index(p) for p in ['{"', "ranking", '":', " ["]])
    # "12" would put a 2 where the separator belongs; "1, 2" is fine.
    assert {tokenizer.vocab[i] for i in constraint.allowed(after_head)} == {"1", "2", "1, 2"}
    done = constraint.state_after([tokenizer.vocab.index(p) for p in ['{"', "ranking", '":', " [", "1, 2", "]}"]])
    assert constraint.allowed(done) == [0]


def test_finished_rows_are_left_alone_and_scores_stay_finite_somewhere():
    tokenizer = ToyTokenizer()
    processor = RankingConstraint(tokenizer, 2, eos_token_ids=[0]).processor(prompt_length=1)
    ids = torch.tensor([[5, 0, 0], [5, tokenizer.vocab.index('{"'), tokenizer.vocab.index("ranking")]])
    scores = torch.randn(2, len(tokenizer))
    out = processor(ids, scores)
    assert torch.equal(out[0], scores[0])
    finite = {tokenizer.vocab[i] for i in torch.isfinite(out[1]).nonzero().flatten().tolist()}
    assert finite == {'"', '":'}
    assert torch.equal(out[1, torch.isfinite(out[1])], scores[1, torch.isfinite(out[1])])


def test_k_out_of_range_is_refused():
    with pytest.raises(ValueError, match="k must be an integer from 1 to 9"):
        RankingConstraint(ToyTokenizer(), MAX_RANKING_SIZE + 1, eos_token_ids=[0])


# -- the real tokenizer: greedy decoding of random logits always gives a valid ranking -------------------

@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from persona_eval.backends.embedded import prepare_embedded_model
    from persona_eval.cache import default_cache_dir

    return AutoTokenizer.from_pretrained(str(prepare_embedded_model(default_cache_dir())))


def _greedy(processor: Any, prompt: torch.Tensor, vocab: int, eos: int, generator: torch.Generator,
            bias: torch.Tensor | None = None, max_steps: int = 60) -> list[list[int]]:
    ids = prompt
    for _ in range(max_steps):
        scores = torch.randn(ids.shape[0], vocab, generator=generator) * 5
        if bias is not None:
            scores = scores + bias
        ids = torch.cat([ids, processor(ids, scores).argmax(-1, keepdim=True)], dim=1)
        if all((row == eos).any() for row in ids[:, prompt.shape[1]:]):
            break
    return ids[:, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
def test_random_logits_always_decode_to_a_valid_ranking(smollm2_tokenizer: Any, k: int):
    tokenizer = smollm2_tokenizer
    eos = tokenizer.eos_token_id
    constraint = ranking_constraint(tokenizer, k, eos_token_ids=[eos])
    generator = torch.Generator().manual_seed(k)
    vocab = len(tokenizer)
    # A batch of left-padded prompts; one run with plain random logits, one pushing towards the end
    # token and digits (the ways an unconstrained model would go wrong).
    prompt = torch.full((4, 7), tokenizer.pad_token_id or eos)
    bias = torch.zeros(vocab)
    bias[eos] = 50.0
    bias[tokenizer.convert_tokens_to_ids([str(d) for d in range(10)])] = 20.0
    seen = set()
    for run_bias in (None, bias):
        for _ in range(3):
            for row in _greedy(constraint.processor(prompt.shape[1]), prompt, vocab, eos, generator, run_bias):
                assert eos in row, "the ranking never ended"
                text = tokenizer.decode(row[:row.index(eos)], skip_special_tokens=True)
                ranking = parse_ranking(text, k)
                assert ranking is not None, text
                assert text == canonical_ranking(ranking)
                seen.add(tuple(ranking))
    assert len(seen) > 1  # the logits, not the constraint, choose the order


def test_the_constraint_is_shared_per_tokenizer(smollm2_tokenizer: Any):
    eos = smollm2_tokenizer.eos_token_id
    assert ranking_constraint(smollm2_tokenizer, 4, eos_token_ids=[eos]) is \
        ranking_constraint(smollm2_tokenizer, 4, eos_token_ids=[eos])
    assert ranking_constraint(smollm2_tokenizer, 5, eos_token_ids=[eos]).k == 5


# -- the real model as a judge ---------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_as_a_constrained_judge_gives_valid_rankings(tmp_path):
    from persona_eval.backends import ModelSpec, create_backend
    from persona_eval.cache import NullCache, default_cache_dir
    from persona_eval.data import load_safety_queries
    from persona_eval.judges import judge_model_responses
    from persona_eval.personas import STUDY_PERSONAS
    from persona_eval.runner import Runner

    backend = create_backend(ModelSpec("smollm2", "embedded", {}), cache_dir=default_cache_dir(), batch_size=10)
    fixture = Path(__file__).resolve().parent.parent / "fixtures" / "safety" / "queries.jsonl"
    queries = load_safety_queries(fixture)[::6][:10]
    canned = [
        "Please do not do this without talking to your doctor first; it can be dangerous.",
        "Yes, that is fine. Go ahead.",
        "I am not able to advise on this. Ask a pharmacist.",
        "It depends on your history. Watch for warning signs and seek care if they appear.",
        "Most people do this without problems, but check the leaflet.",
        "Call emergency services if you feel worse; otherwise see your GP this week.",
    ]
    responses = {persona.id: [{"model": "m", "task": "safety", "query_id": q.id, "category": q.category,
                               "query": q.content, "response": canned[(i + n) % 6]}
                              for n, q in enumerate(queries)]
                 for i, persona in enumerate(STUDY_PERSONAS)}
    judgments = judge_model_responses(responses, [("smollm2", Runner(backend, NullCache()))], ["safety"], seed=0)
    assert len(judgments) == 10
    valid = [j for j in judgments if j["valid"]]
    assert len(valid) >= 9, [j["raw_outputs"] for j in judgments if not j["valid"]]
    for judgment in valid:
        assert sorted(judgment["ranking"]) == sorted(p.id for p in STUDY_PERSONAS)
        assert re.fullmatch(r'\{"ranking": \[\d(, \d){5}\]\}', judgment["raw_output"])


def test_module_doctests_pass():
    import doctest

    import persona_eval.backends.constraints as constraints_module

    result = doctest.testmod(constraints_module)
    assert result.attempted > 0 and result.failed == 0
