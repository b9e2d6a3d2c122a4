"""A deterministic tiny Llama trained on synthetic triage cases, with a planted persona effect to recover.

End-to-end tests need a model whose answers are known in advance: this one answers the synthetic
vignettes of ``synthetic_triage_records`` correctly under every default persona (the study's six and the
placebo) except the planted one, under which it escalates each answer one level (A -> B, B -> C, C stays
C). A suite that measures persona effects must find that effect, and only that one.

The model is small enough to train in well under a minute on two CPU cores (115k parameters), and
has head_dim 32, the smallest vLLM's CPU attention serves, so the same weights work through
transformers and through a vLLM server. ``max_position_embeddings`` is 512: serve it with
``--max-model-len 512`` or less.

The prompts it is trained on are rendered exactly as the suite renders them (the default triage template,
``SystemPolicy()``, the model's own chat template), so it only understands those; it answers with the
template's answer prefix and the letter ("## Final Response\nB").

**The thinking variant** (``build_tiny_model(..., thinking=True)``, ``tiny_model_dir(thinking=True)``)
reasons before it answers, as the study template allows: "## Thinking\n" and about 60 tokens derived from
the case and the persona (its leaning, the signal phrase, why that sets the level of care), then "## Final
Response\n" and the letter it reasoned to, ``expected_answer`` (the planted persona effect included).
It also carries a planted divergence between what it would answer at once and what it writes after
thinking. Its training also holds *direct* sequences, the prompt followed by "## Final Response\n" and
a "gut" letter, with the loss on that letter only (never on the heading, so greedy decoding always
starts with "## Thinking"): the latent label read at the prompt boundary plus the template's
answer_prefix is that gut letter. For most cases it is the written answer; for the cases whose signal
phrase is one of the first ``round(10 * divergent_share)`` phrases of its level (``DIVERGENT_PHRASES``;
visible in the case text, so the rule is learnable) it is another level (``gut_answer``). On such a
case the consistency rate counts a disagreement; the share a run must find is the share of its cases
for which ``diverges(record)`` holds.

**The effects variant** (``build_tiny_model(..., effects=True)``, ``tiny_model_dir(effects=True)``) answers
at once, as the plain model does, and is trained on every condition a robustness run asks
(``effects_conditions``): every default persona under each of its wordings (``Persona.worded``), wording 1
under each letter order (persona_eval.variants.letter_orders; the letter written is the one that shows the
level chosen), and the null-prompt stubs (persona_eval.variants.NULL_CASES) under every persona and order.
It carries three planted effects, each on one persona, for the wording, flip and letter-bias analyses to
find: FLIP_PERSONA changes the level of about a third of the cases (``effects_flips``), the same under all
its wordings and orders; WORDING_PERSONA escalates under wording 1, de-escalates under wording 2 and
answers the reference under wording 3; LETTER_PERSONA prefers PREFERRED_LETTER. The answer letter is
trained towards a soft target (``effects_letter_target``): the content (CONTENT_SHARE to the letter of the
level answered) times the letter bias (LETTER_BIAS for the preferred letter under LETTER_PERSONA),
normalized. So greedy decoding writes "A" for every case under LETTER_PERSONA, whatever A stands for,
while its label probabilities divided by its null-prompt prior (the bias alone: the content of a null
prompt is uniform) show the level again: contextual calibration recovers ``effects_level``. Every other
persona answers the reference. ``effects_answer`` is the letter a run must find written. It is a little
larger than the others (3 layers, 152k parameters; still head_dim 32) and trains longer (2200 steps): about
three minutes on two CPU cores. Measured on 60 held-out cases under all 33 conditions: 99.5 % of the letters
written as planted, and under LETTER_PERSONA the calibrated label read recovers the level on 300 of 300.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import random
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from persona_eval.errors import PersonaEvalError
from persona_eval.results import staged_directory

if TYPE_CHECKING:
    from persona_eval.personas import Persona

__all__ = [
    "CONTENT_SHARE",
    "DEFAULT_DIVERGENT_SHARE",
    "DEFAULT_PLANTED_PERSONA",
    "DIVERGENT_PHRASES",
    "FLIP_PERSONA",
    "FLIP_PHRASES",
    "IDENTITY_ORDER",
    "LETTER_BIAS",
    "LETTER_PERSONA",
    "PREFERRED_LETTER",
    "SIGNAL_PHRASES",
    "WORDING_PERSONA",
    "build_tiny_model",
    "diverges",
    "effects_answer",
    "effects_conditions",
    "effects_flips",
    "effects_letter_target",
    "effects_level",
    "expected_answer",
    "gut_answer",
    "signal_phrase",
    "synthetic_triage_records",
    "thinking_reply",
    "tiny_model_dir",
    "training_messages",
]

DEFAULT_PLANTED_PERSONA = "ed_physician"

# The label of a synthetic case is set by its one signal phrase; every other sentence is neutral filler.
SIGNAL_PHRASES: dict[str, tuple[str, ...]] = {
    "A": (
        "a mild sore throat",
        "a runny nose since yesterday",
        "a small paper cut on one finger",
        "mild muscle ache after exercise",
        "a bruise on the shin",
        "a blocked nose and sneezing",
        "an itchy insect bite",
        "slight tiredness after a late night",
        "a mild cold with no fever",
        "dry lips in cold weather",
    ),
    "B": (
        "a cough for three weeks",
        "a painless lump in the neck",
        "burning when passing urine",
        "knee pain for two months",
        "a rash that keeps coming back",
        "feeling tired for several weeks",
        "a mole that has changed shape",
        "heartburn most evenings",
        "trouble sleeping for a month",
        "ear pain for a week",
    ),
    "C": (
        "sudden weakness on one side",
        "crushing chest pain",
        "slurred speech that began an hour ago",
        "severe difficulty breathing",
        "vomiting blood",
        "a seizure that will not stop",
        "a stiff neck with fever and confusion",
        "fainting with chest pain",
        "lips turning blue",
        "swelling of the tongue after a bee sting",
    ),
}
_SIGNAL_FORMS = (
    "{Subject} reports {phrase}.",
    "{Subject} has {phrase}.",
    "{Subject} describes {phrase}.",
    "The main concern is {phrase}.",
    "{Possessive} problem today is {phrase}.",
)
_FILLERS = (
    "{Subject} works as a {job}.",
    "{Subject} lives {home}.",
    "{Subject} is calling from {place}.",
    "{Subject} has no known allergies.",
    "{Possessive} last check-up was {when}.",
    "{Subject} {habit}.",
    "{Possessive} {relative} is with {object} today.",
)
_FILLER_WORDS: dict[str, tuple[str, ...]] = {
    "job": ("teacher", "driver", "nurse", "cook", "farmer", "clerk", "builder", "painter"),
    "home": ("alone", "with family", "with a partner", "in a flat", "in a small town", "near the city"),
    "place": ("home", "work", "a friend's house", "a hotel", "the car"),
    "when": ("last year", "two years ago", "in the spring", "a few months ago"),
    "habit": ("walks every day", "does not smoke", "drinks coffee daily", "enjoys gardening",
              "plays football at weekends", "reads most evenings"),
    "relative": ("daughter", "son", "partner", "sister", "friend"),
}
# Label shares per stratum, over each block of 20 consecutive cases (exact, so that even small
# samples have the intended mix): emergency 0/30/70 %, primary care 40/45/15 % (A/B/C).
_BLOCK = 20
_LABEL_COUNTS: dict[str, dict[str, int]] = {
    "emergency": {"A": 0, "B": 6, "C": 14},
    "primary_care": {"A": 8, "B": 9, "C": 3},
}
_STRATA = ("emergency", "primary_care")

# Special tokens of the tiny model's ChatML-style template.
_BOS, _EOS, _PAD, _IM_START = "<|bos|>", "<|im_end|>", "<|pad|>", "<|im_start|>"
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_VOCAB_SIZE = 640
_TRAIN_RECORDS_PER_STRATUM = 200
# The thinking model learns two readings of each case (its reply, its gut letter): more cases, so that both
# generalize to held-out ones (measured: the gut letter right on 120 of 120 and 239 to 240 of 240 cases of
# four held-out sets; 101 of 120 with 200 cases, 600 steps and the loss averaged over tokens).
_THINKING_TRAIN_RECORDS_PER_STRATUM = 400
_BATCH_SIZE = 32
_LEARNING_RATE = 3e-3
# One thread: as fast as two for a model this small, and far faster when the cores are shared (threads
# of one matmul wait on each other); also the same float reductions on every machine.
_TORCH_THREADS = 1
# Weights initialized at std 0.02 (the transformers default) leave attention uniform over the ~150
# prompt tokens and training stalls at the label prior; at 0.1 the heads find the signal phrase early.
_INITIALIZER_RANGE = 0.1


def _article(word: str) -> str:
    return "An" if word[0] in "8aeiou" or word.startswith(("11-", "18-")) else "A"


def _label_of(seed: int, stratum: str, index: int) -> str:
    block, position = divmod(index, _BLOCK)
    labels = [label for label, count in _LABEL_COUNTS[stratum].items() for _ in range(count)]
    random.Random(f"persona-eval-tiny:labels:{seed}:{stratum}:{block}").shuffle(labels)
    return labels[position]


def _vignette(rng: random.Random, label: str) -> tuple[str, str]:
    """A short vignette whose label is set by one signal phrase, and that phrase."""
    age = rng.randint(18, 89)
    woman = rng.random() < 0.5
    subject, possessive, obj = ("She", "Her", "her") if woman else ("He", "His", "him")
    person = f"{age}-year-old {'woman' if woman else 'man'}"
    phrase = rng.choice(SIGNAL_PHRASES[label])
    words = {key: rng.choice(values) for key, values in _FILLER_WORDS.items()}
    fillers = rng.sample(_FILLERS, rng.randint(1, 3))
    sentences = [f.format(Subject=subject, Possessive=possessive, object=obj, **words) for f in fillers]
    signal = rng.choice(_SIGNAL_FORMS).format(Subject=subject, Possessive=possessive, phrase=phrase)
    sentences.insert(rng.randint(0, len(sentences)), signal)
    return f"{_article(person)} {person}. " + " ".join(sentences), phrase


def synthetic_triage_records(n_per_stratum: int, *, seed: int, offset: int = 0) -> list[dict[str, str]]:
    """`n_per_stratum` synthetic triage cases per stratum, as dataset lines (id, stratum, reference,
    rationale, text), emergency cases first.

    Case ``i`` of a stratum depends only on (`seed`, stratum, ``offset + i``), so a different seed or a
    later offset gives held-out cases: known signal phrases in new combinations with the filler.

    >>> record = synthetic_triage_records(1, seed=0)[0]
    >>> sorted(record), record["stratum"], record["reference"] in "BC"
    (['id', 'rationale', 'reference', 'stratum', 'text'], 'emergency', True)
    >>> synthetic_triage_records(3, seed=1)[1:3] == synthetic_triage_records(2, seed=1, offset=1)[:2]
    True
    """
    if n_per_stratum < 0 or offset < 0:
        raise ValueError(f"n_per_stratum and offset must be >= 0, got {n_per_stratum} and {offset}")
    from persona_eval.tasks.triage import LABEL_TEXT

    records = []
    for stratum in _STRATA:
        for index in range(offset, offset + n_per_stratum):
            label = _label_of(seed, stratum, index)
            rng = random.Random(f"persona-eval-tiny:case:{seed}:{stratum}:{index}")
            text, phrase = _vignette(rng, label)
            records.append({
                "id": f"synthetic-s{seed}-{stratum}-{index:05d}",
                "stratum": stratum,
                "reference": label,
                "rationale": f"Synthetic case: '{phrase}' calls for: {LABEL_TEXT[label].lower()}.",
                "text": text,
            })
    return records


def expected_answer(reference: str, persona_id: str, planted_persona: str | None = DEFAULT_PLANTED_PERSONA
                    ) -> str:
    """The answer the tiny model was trained to give: the reference, escalated one level (A -> B,
    B -> C, C stays C) under the planted persona.

    >>> [expected_answer(label, "ed_physician") for label in "ABC"], expected_answer("A", "ed_nurse")
    (['B', 'C', 'C'], 'A')
    """
    if persona_id != planted_persona:
        return reference
    return {"A": "B", "B": "C", "C": "C"}[reference]


# --- the thinking variant ----------------------------------------------------------------------------
# The share of each level's signal phrases whose cases diverge: the first 3 of the 10 phrases of A, B and
# C. Over many cases about 30 % diverge; a given dataset's share is counted with `diverges`.
DEFAULT_DIVERGENT_SHARE = 0.3
_PHRASES_PER_LABEL = 10
DIVERGENT_PHRASES: frozenset[str] = frozenset(
    phrase for phrases in SIGNAL_PHRASES.values() for phrase in phrases[:round(DEFAULT_DIVERGENT_SHARE * 10)])
# The gut answer of a divergent case: another level than the one written after thinking.
_GUT_SHIFT = {"A": "B", "B": "A", "C": "B"}
_LEVEL_REASONS = {
    "A": "That can be managed at home with rest and self-care.",
    "B": "That needs a doctor to look at it, but it is not urgent.",
    "C": "That can be life-threatening and cannot wait.",
}
_LEANINGS = {False: "I judge the case on its findings alone.",
             True: "I lean towards more care than the findings alone call for."}
_AGE = re.compile(r"^An? (\d+)-year-old (woman|man)\.")
# With the placebo among its personas (seven, not six), 900 steps wrote 132 of 140 held-out answers as trained
# and 1200 wrote 140 of 140 (and read the gut letter on 140 of 140).
_THINKING_TRAIN_STEPS = 1200
_PLAIN_TRAIN_STEPS = 300
# The plain and thinking models' size (115k parameters), and the effects model's: it also reads which letter
# stands for which level from the options in the system turn.
_SIZE: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "num_key_value_heads": 1}
_EFFECTS_SIZE: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
                                 "num_attention_heads": 2, "num_key_value_heads": 1}


def _divergent_count(divergent_share: float) -> int:
    count = round(divergent_share * _PHRASES_PER_LABEL)
    if not 0 <= divergent_share <= 1 or abs(count - divergent_share * _PHRASES_PER_LABEL) > 1e-9:
        raise ValueError(f"divergent_share must be a multiple of 0.1 from 0 to 1 (a number of the "
                         f"{_PHRASES_PER_LABEL} signal phrases of each level), got {divergent_share!r}")
    return count


def signal_phrase(text: str) -> str:
    """The one signal phrase in a synthetic case's text (it sets the case's label)."""
    for phrases in SIGNAL_PHRASES.values():
        for phrase in phrases:
            if phrase in text:
                return phrase
    raise ValueError(f"no signal phrase in {text!r}")


def diverges(record: dict[str, str], divergent_share: float = DEFAULT_DIVERGENT_SHARE) -> bool:
    """Whether the thinking tiny model's gut answer to `record` (a synthetic case) differs from the one it
    writes after thinking: its signal phrase is one of the first ``round(10 * divergent_share)`` of its
    level's phrases.

    >>> records = synthetic_triage_records(100, seed=0)
    >>> sum(diverges(r) for r in records) / len(records)
    0.305
    """
    count = _divergent_count(divergent_share)
    phrase = signal_phrase(record["text"])
    return any(phrase in phrases[:count] for phrases in SIGNAL_PHRASES.values())


def gut_answer(record: dict[str, str], persona_id: str, planted_persona: str | None = DEFAULT_PLANTED_PERSONA,
               divergent_share: float = DEFAULT_DIVERGENT_SHARE) -> str:
    """The letter the thinking tiny model was trained to give right after the prompt and "## Final
    Response\n", without thinking: the answer it writes after thinking (`expected_answer`), except on a
    divergent case (`diverges`), where it is another level (A -> B, B -> A, C -> B)."""
    written = expected_answer(record["reference"], persona_id, planted_persona)
    return _GUT_SHIFT[written] if diverges(record, divergent_share) else written


def thinking_reply(record: dict[str, str], persona_id: str, planted_persona: str | None = DEFAULT_PLANTED_PERSONA
                   ) -> str:
    """The whole reply the thinking tiny model was trained to write for `record` under `persona_id`: the
    thinking, derived from the case, then the final-response heading and the letter."""
    from persona_eval.tasks.triage import LABEL_TEXT

    answer = expected_answer(record["reference"], persona_id, planted_persona)
    if _AGE.match(record["text"]) is None:
        raise ValueError(f"not a synthetic case: {record['text']!r}")
    # The persona's leaning comes first, where the model decides it from the prompt alone (as the answer-
    # first model does); the level then follows from what the thinking itself says.
    leaning = _LEANINGS[persona_id == planted_persona]
    thinking = (f"{leaning} The finding that sets the level of care is {signal_phrase(record['text'])}. "
                f"{_LEVEL_REASONS[answer]} The other details do not change the level. So the level is: "
                f"{LABEL_TEXT[answer].lower()}.")
    return f"## Thinking\n{thinking}\n\n{_template().answer_prefix}{answer}"


def _thinking_examples(records: list[dict[str, str]], tokenizer: Any, planted_persona: str | None,
                       divergent_share: float) -> list[tuple[str, str, str]]:
    """(prompt, untrained part, trained part) triples: per case and persona, the thinking reply (all of it
    trained) and the direct answer (the heading given, only the gut letter and the end trained)."""
    from persona_eval.personas import DEFAULT_PERSONAS

    prefix = _template().answer_prefix
    examples = []
    for record in records:
        for persona in DEFAULT_PERSONAS:
            messages = training_messages(record["text"], persona)
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            examples.append((prompt, "", thinking_reply(record, persona.id, planted_persona) + _EOS))
            gut = gut_answer(record, persona.id, planted_persona, divergent_share)
            examples.append((prompt, prefix, gut + _EOS))
    return examples


def _training_texts(records: list[dict[str, str]], tokenizer: Any, planted_persona: str | None
                    ) -> list[tuple[str, str]]:
    """(prompt, answer) pairs, the prompt rendered exactly as the suite renders it."""
    from persona_eval.personas import DEFAULT_PERSONAS

    prefix = _template().answer_prefix
    pairs = []
    for record in records:
        for persona in DEFAULT_PERSONAS:
            messages = training_messages(record["text"], persona)
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            answer = expected_answer(record["reference"], persona.id, planted_persona)
            pairs.append((prompt, f"{prefix}{answer}{_EOS}"))
    return pairs


# --- the effects variant -----------------------------------------------------------------------------
# Planted effects of three kinds, each a rule on one persona, for the robustness analyses to find: a persona
# that changes some levels (flips), one whose effect depends on its wording, and one that prefers a letter.
FLIP_PERSONA = "ed_nurse"
WORDING_PERSONA = "ed_physician_bold"
LETTER_PERSONA = "ed_physician_cautious"
PREFERRED_LETTER = "A"
# The answer letter's soft target: CONTENT_SHARE to the letter that shows the level answered and the rest
# shared by the others, times LETTER_BIAS for PREFERRED_LETTER under LETTER_PERSONA, normalized. The bias
# outweighs the content (12 x 0.1 > 0.8), so greedy decoding writes the preferred letter every time, while
# the probabilities divided by the null-prompt prior (the bias alone) are the content again.
CONTENT_SHARE = 0.8
LETTER_BIAS = 12.0
# FLIP_PERSONA changes the level of the cases whose signal phrase is one of the first 3 of its level's 10.
FLIP_PHRASES: frozenset[str] = frozenset(phrase for phrases in SIGNAL_PHRASES.values() for phrase in phrases[:3])
IDENTITY_ORDER: tuple[str, ...] = ("A", "B", "C")
_FLIP = {"A": "B", "B": "C", "C": "B"}
_ESCALATE = {"A": "B", "B": "C", "C": "C"}
_DE_ESCALATE = {"A": "A", "B": "A", "C": "B"}
_WORDING_RULES = {1: _ESCALATE, 2: _DE_ESCALATE, 3: {label: label for label in "ABC"}}
_EFFECTS_TRAIN_RECORDS_PER_STRATUM = 200
_EFFECTS_TRAIN_STEPS = 2200
# Each null-prompt prompt (3 stubs x 7 personas x 3 orders) is repeated this many times in the training set,
# so that the prior it must learn there is seen about as often as a case's condition is.
_EFFECTS_NULL_REPEATS = 10
# The flip rule is the hardest to learn: it reads which of its level's phrases a case has, under one persona,
# and must then be written with the letter of the flipped level in every order. So FLIP_PERSONA's conditions
# in the two rotated orders are repeated 3 times (as many as its identity-order ones, one per wording), and
# its flipping cases twice. Measured on 40 held-out cases: with neither, the flipping cases under rotated
# orders came out right 1 time in 8; with both, 18 of 18 (and 91 of 93 non-flipping cases stayed).
_FLIP_ORDER_REPEATS = 3
_FLIP_CASE_REPEATS = 2
# The effects model's batches are made of chunks of this many examples that share their system turn.
_EFFECTS_CHUNK = 8


def effects_flips(record: dict[str, str]) -> bool:
    """Whether the effects model answers `record` (a synthetic case) with another level under FLIP_PERSONA:
    its signal phrase is one of the first 3 of its level's 10 (``FLIP_PHRASES``), about 30 % of cases.

    >>> records = synthetic_triage_records(100, seed=0)
    >>> sum(effects_flips(r) for r in records) / len(records)
    0.305
    """
    return signal_phrase(record["text"]) in FLIP_PHRASES


def effects_level(record: dict[str, str], persona_id: str, *, wording: int = 1) -> str:
    """The level the effects model answers `record` with under `persona_id` and its wording number
    `wording`, before any letter preference: under FLIP_PERSONA the flipped level of a flipping case (A -> B,
    B -> C, C -> B; `effects_flips`), under WORDING_PERSONA the reference escalated (wording 1: A -> B,
    B -> C, C stays) or de-escalated (wording 2: C -> B, B -> A, A stays) or as it is (wording 3), and
    the reference under every other persona. The letter order does not change the level.

    >>> case = {"reference": "B", "text": "A 30-year-old man. He has heartburn most evenings."}
    >>> [effects_level(case, WORDING_PERSONA, wording=w) for w in (1, 2, 3)], effects_level(case, FLIP_PERSONA)
    (['C', 'A', 'B'], 'B')
    """
    if wording not in _WORDING_RULES:
        raise ValueError(f"wording must be 1, 2 or 3, got {wording!r}")
    reference = record["reference"]
    if persona_id == FLIP_PERSONA:
        return _FLIP[reference] if effects_flips(record) else reference
    if persona_id == WORDING_PERSONA:
        return _WORDING_RULES[wording][reference]
    return reference


def effects_letter_target(level: str | None, persona_id: str, *, order: Sequence[str] = IDENTITY_ORDER
                          ) -> dict[str, float]:
    """The distribution over the answer letters the effects model was trained to give for a case answered
    with `level` (None for a null-prompt case) under `persona_id`, the letters standing for the levels of
    `order`: ``target[l] ~ content[l] * bias[l]``, where content is CONTENT_SHARE for the letter that shows
    `level` and the rest shared equally by the others (uniform when `level` is None), and bias is LETTER_BIAS
    for PREFERRED_LETTER under LETTER_PERSONA and 1 otherwise.

    >>> {k: round(v, 3) for k, v in effects_letter_target("B", "no_persona", order=("B", "C", "A")).items()}
    {'A': 0.8, 'B': 0.1, 'C': 0.1}
    >>> {k: round(v, 3) for k, v in effects_letter_target("B", LETTER_PERSONA).items()}
    {'A': 0.571, 'B': 0.381, 'C': 0.048}
    >>> {k: round(v, 3) for k, v in effects_letter_target(None, LETTER_PERSONA).items()}
    {'A': 0.857, 'B': 0.071, 'C': 0.071}
    """
    from persona_eval.tasks.triage import LABELS
    from persona_eval.variants import level_of_letter

    levels = level_of_letter(LABELS, order)
    if level is None:
        content = {letter: 1 / len(LABELS) for letter in LABELS}
    else:
        if level not in LABELS:
            raise ValueError(f"level must be one of {', '.join(LABELS)} or None, got {level!r}")
        rest = (1 - CONTENT_SHARE) / (len(LABELS) - 1)
        content = {letter: CONTENT_SHARE if levels[letter] == level else rest for letter in LABELS}
    weights = {letter: content[letter] * (LETTER_BIAS if persona_id == LETTER_PERSONA
                                          and letter == PREFERRED_LETTER else 1.0) for letter in LABELS}
    total = sum(weights.values())
    return {letter: weight / total for letter, weight in weights.items()}


def effects_answer(record: dict[str, str], persona_id: str, *, wording: int = 1,
                   order: Sequence[str] = IDENTITY_ORDER) -> str:
    """The letter the effects model writes (greedy) for `record` under `persona_id`, its wording `wording`
    and the letter order `order` (as persona_eval.variants.letter_orders gives it): PREFERRED_LETTER under
    LETTER_PERSONA, whatever it stands for; otherwise the letter that shows `effects_level`.

    >>> case = {"reference": "B", "text": "A 30-year-old man. He has heartburn most evenings."}
    >>> effects_answer(case, "no_persona"), effects_answer(case, "no_persona", order=("B", "C", "A"))
    ('B', 'A')
    >>> effects_answer(case, LETTER_PERSONA, order=("C", "A", "B"))
    'A'
    """
    target = effects_letter_target(effects_level(record, persona_id, wording=wording), persona_id, order=order)
    return max(target, key=target.__getitem__)


def effects_conditions() -> list[tuple[Persona, int, tuple[str, ...]]]:
    """Every (persona, wording number, letter order) the effects model was trained on for each case: each
    persona of DEFAULT_PERSONAS under each of its wordings (``persona.worded(n)``; the baseline has one,
    with no declaration) in the identity order, and under wording 1 in each other letter order. The
    null-prompt cases were asked under wording 1 and every order."""
    from persona_eval.personas import DEFAULT_PERSONAS
    from persona_eval.tasks.triage import LABELS
    from persona_eval.variants import letter_orders

    orders = letter_orders(LABELS)
    conditions = []
    for persona in DEFAULT_PERSONAS:
        wordings = max(1, len(persona.all_wordings))
        for number in range(1, wordings + 1):
            worded = persona.worded(number) if persona.all_wordings else persona
            conditions.append((worded, number, orders[0]))
        first = persona.worded(1) if persona.all_wordings else persona
        conditions.extend((first, 1, order) for order in orders[1:])
    return conditions


def _effects_examples(records: list[dict[str, str]], tokenizer: Any
                      ) -> list[tuple[str, str, str, tuple[float, ...]]]:
    """(shared start, prompt, answer, letter target): per case and condition (``effects_conditions``) the answer
    "## Final Response\n" + the greedy letter + EOS, the letter trained towards its soft target; then the
    null-prompt cases under every persona and order, repeated."""
    from persona_eval.personas import DEFAULT_PERSONAS
    from persona_eval.tasks.triage import LABELS
    from persona_eval.variants import NULL_CASES, letter_orders

    prefix = _template().answer_prefix

    def example(case_text: str, persona: Any, order: tuple[str, ...], level: str | None
                ) -> tuple[str, str, str, tuple[float, ...]]:
        messages = training_messages(case_text, persona, order=order)
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        start = tokenizer.apply_chat_template(messages[:-1], tokenize=False)  # the system turn
        target = effects_letter_target(level, persona.id, order=order)
        # The letter in the sequence is the one greedy decoding writes (the first of a tie), so that the
        # end-of-sequence token is trained after the letter the model will have written.
        letter = max(LABELS, key=target.__getitem__)
        return start, prompt, f"{prefix}{letter}{_EOS}", tuple(target[label] for label in LABELS)

    def repeats(record: dict[str, str], persona: Any, order: tuple[str, ...]) -> int:
        if persona.id != FLIP_PERSONA:
            return 1
        return ((_FLIP_ORDER_REPEATS if order != IDENTITY_ORDER else 1)
                * (_FLIP_CASE_REPEATS if effects_flips(record) else 1))

    examples = [example(record["text"], persona, order, effects_level(record, persona.id, wording=wording))
                for record in records for persona, wording, order in effects_conditions()
                for _ in range(repeats(record, persona, order))]
    null = [example(stub, persona.worded(1) if persona.all_wordings else persona, order, None)
            for stub in NULL_CASES for persona in DEFAULT_PERSONAS for order in letter_orders(LABELS)]
    return examples + null * _EFFECTS_NULL_REPEATS


def _template() -> Any:
    from persona_eval.templates import DEFAULT_TEMPLATES, template_named

    return template_named(DEFAULT_TEMPLATES["triage"], task="triage")


def training_messages(case_text: str, persona: Any, *, order: Sequence[str] | None = None
                      ) -> list[dict[str, str]]:
    """The chat messages of a case as the suite sends them to the tiny model (default triage template); with
    `order` (persona_eval.variants.letter_orders), the options of that letter order."""
    from persona_eval.prompts import SystemPolicy, render_template
    from persona_eval.tasks.triage import LABEL_TEXT, LABELS
    from persona_eval.variants import permuted_label_text

    label_text = LABEL_TEXT if order is None else permuted_label_text(LABELS, LABEL_TEXT, order)
    return render_template(_template(), case_text, persona, labels=LABELS, label_text=label_text,
                           policy=SystemPolicy()).as_dicts()


def _train_tokenizer(corpus: list[str], *, check_labels: bool = True) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=[_BOS, _EOS, _PAD, _IM_START],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=_BOS, eos_token=_EOS, pad_token=_PAD,
        additional_special_tokens=[_IM_START], model_max_length=512, chat_template=_CHAT_TEMPLATE,
    )
    for label in ("A", "B", "C") if check_labels else ():
        for spelling in (label, f" {label}"):
            ids = tokenizer.encode(spelling, add_special_tokens=False)
            if len(ids) != 1:
                raise PersonaEvalError(f"label spelling {spelling!r} is {len(ids)} tokens in the tiny "
                                       "model's tokenizer; label scoring needs one")
    return tokenizer


@contextlib.contextmanager
def _deterministic_torch(seed: int) -> Iterator[None]:
    """Seeded, deterministic, fixed-thread torch for the duration of a build; restored afterwards."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(_TORCH_THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def build_tiny_model(out_dir: str | Path, *, planted_persona: str | None = DEFAULT_PLANTED_PERSONA,
                     seed: int = 0, steps: int | None = None, thinking: bool = False,
                     divergent_share: float = DEFAULT_DIVERGENT_SHARE, effects: bool = False) -> Path:
    """Train the tiny model and save it (safetensors, tokenizer, generation config) into `out_dir`.

    Under `planted_persona` (a persona id of DEFAULT_PERSONAS, or None for no planted effect) the model
    escalates every answer one level; under every other persona it answers the reference. With `thinking`
    it reasons first and carries the planted divergence of `divergent_share` (see the module docstring).
    With `effects` it is the effects model instead (its planted rules are the module's constants;
    `planted_persona` and `divergent_share` do not apply). `steps` defaults to 300 (1200 with `thinking`,
    2200 with `effects`). The same arguments give byte-identical weights. Takes ~30 s on two CPU cores
    (with `thinking` or `effects`, ~170-180 s measured with other jobs on the machine).
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from persona_eval.personas import DEFAULT_PERSONAS

    known = [persona.id for persona in DEFAULT_PERSONAS]
    if planted_persona is not None and planted_persona not in known:
        raise ValueError(f"planted_persona must be one of {', '.join(known)} or None, "
                         f"got {planted_persona!r}")
    if thinking and effects:
        raise ValueError("the effects model answers at once: thinking and effects cannot both be set")
    _divergent_count(divergent_share)
    if steps is None:
        steps = _THINKING_TRAIN_STEPS if thinking else _EFFECTS_TRAIN_STEPS if effects else _PLAIN_TRAIN_STEPS
    out_dir = Path(out_dir)
    per_stratum = (_THINKING_TRAIN_RECORDS_PER_STRATUM if thinking else _EFFECTS_TRAIN_RECORDS_PER_STRATUM
                   if effects else _TRAIN_RECORDS_PER_STRATUM)
    records = synthetic_triage_records(per_stratum, seed=seed)

    # The tokenizer learns its merges from the very prompts it will see, answers included.
    scaffold = _train_tokenizer([], check_labels=False)  # renders the chat template; has no merges yet
    if thinking:
        examples = _thinking_examples(records, scaffold, planted_persona, divergent_share)
        texts = [prompt + given + trained for prompt, given, trained in examples]
    elif effects:
        soft_examples = _effects_examples(records, scaffold)
        texts = [prompt + answer for _, prompt, answer, _ in soft_examples]
    else:
        pairs = _training_texts(records, scaffold, planted_persona)
        texts = [prompt + answer for prompt, answer in pairs]
    # The label spellings the scorer reads (" A" as well as "A") must be single tokens; the answers alone
    # ("## Final Response\nB") do not make " A" frequent enough to be merged, so the corpus repeats them
    # (more often beside the longer corpora of the thinking and effects models).
    spellings = [" A B C"] * (3000 if thinking or effects else 500)
    tokenizer = _train_tokenizer(texts + spellings)

    with _deterministic_torch(seed):
        config = LlamaConfig(
            vocab_size=len(tokenizer), head_dim=32, max_position_embeddings=512,
            tie_word_embeddings=True, initializer_range=_INITIALIZER_RANGE,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **(_EFFECTS_SIZE if effects else _SIZE),
        )
        model = LlamaForCausalLM(config)
        if thinking:
            inputs, targets = _encode_examples(examples, tokenizer)
            _train_all_positions(model, inputs, targets, seed=seed, steps=steps)
        elif effects:
            _train_soft(model, _encode_soft(soft_examples, tokenizer), seed=seed, steps=steps)
        else:
            inputs, answer_positions, answer_targets = _encode(pairs, tokenizer)
            _train(model, inputs, answer_positions, answer_targets, seed=seed, steps=steps)

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    about: dict[str, Any] = {
        "what": "persona-eval tiny triage model (persona_eval.testing.tiny_model)",
        "planted_persona": None if effects else planted_persona, "seed": seed, "steps": steps,
        "train_records_per_stratum": per_stratum,
    }
    if thinking:
        about |= {"thinking": True, "divergent_share": divergent_share}
    if effects:
        about |= {"effects": {"flip_persona": FLIP_PERSONA, "wording_persona": WORDING_PERSONA,
                              "letter_persona": LETTER_PERSONA, "preferred_letter": PREFERRED_LETTER,
                              "letter_bias": LETTER_BIAS, "content_share": CONTENT_SHARE}}
    # No timings or paths here: every file of a build is the same for the same arguments.
    (out_dir / "TINY_MODEL.json").write_text(json.dumps(about, indent=2) + "\n", encoding="utf-8")
    return out_dir


def _encode_soft(examples: list[tuple[str, str, str, tuple[float, ...]]], tokenizer: Any) -> dict[str, Any]:
    """The effects model's (shared start, prompt, answer, letter target) examples as tensors: the token ids of
    each distinct shared start (every turn of the prompt but the case's: the persona and the options), and per
    example its start's index, the rest of its sequence (right-padded), the positions there whose next token is
    an answer token with those tokens, the letter's column among them, and its letter target."""
    import torch

    from persona_eval.tasks.triage import LABELS

    starts: dict[str, int] = {}
    start_ids: list[list[int]] = []
    groups, sequences, positions, targets = [], [], [], []
    for start, prompt, answer, _ in examples:
        if not start:
            raise PersonaEvalError("the effects model's prompts must start with a system turn (it is shared)")
        if start not in starts:
            starts[start] = len(start_ids)
            start_ids.append(tokenizer.encode(start, add_special_tokens=False))
        shared = start_ids[starts[start]]
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        full_ids = tokenizer.encode(prompt + answer, add_special_tokens=False)
        # Neither the case nor the answer may change how what comes before it is tokenized, or training and
        # inference differ.
        if not prompt.startswith(start) or prompt_ids[:len(shared)] != shared:
            raise PersonaEvalError("the tiny tokenizer merges the case into the system turn")
        if full_ids[:len(prompt_ids)] != prompt_ids:
            raise PersonaEvalError("the tiny tokenizer merges the answer into the prompt's last token")
        groups.append(starts[start])
        sequences.append(full_ids[len(shared):])
        positions.append(list(range(len(prompt_ids) - 1 - len(shared), len(full_ids) - 1 - len(shared))))
        targets.append(full_ids[len(prompt_ids):])
    answer_lengths = sorted({len(t) for t in targets})
    if len(answer_lengths) != 1:
        raise PersonaEvalError(f"the tiny model's answers have different token lengths: {answer_lengths}")
    if max(len(start_ids[g]) + len(s) for g, s in zip(groups, sequences, strict=True)) > 512:
        raise PersonaEvalError("a training sequence of the tiny model is over its 512 positions")
    rests = torch.full((len(sequences), max(len(s) for s in sequences)), tokenizer.pad_token_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        rests[row, :len(sequence)] = torch.tensor(sequence)
    label_ids = [tokenizer.convert_tokens_to_ids(label) for label in LABELS]
    letter_column = len(targets[0]) - 2  # the answer ends with the letter and EOS
    if not all(target[letter_column] in label_ids for target in targets):
        raise PersonaEvalError("the tiny tokenizer does not spell the answer letter as one label token")
    return {"starts": start_ids, "groups": groups, "rests": rests,
            "positions": torch.tensor(positions), "targets": torch.tensor(targets), "letter_column": letter_column,
            "label_ids": torch.tensor(label_ids),
            "letter_targets": torch.tensor([target for *_, target in examples], dtype=torch.float32)}


def _train_soft(model: Any, encoded: dict[str, Any], *, seed: int, steps: int) -> None:
    """`_train` with a soft target at the answer letter: there the loss is ``-sum_k target_k log p_k`` over
    the label tokens, p the softmax over the whole vocabulary; elsewhere in the answer the usual cross-entropy.
    The loss of an example is the mean over its answer positions.

    A batch is made of chunks of examples that share their start (the system turn: most of each prompt). The
    batch's starts are run once each (left-padded to the longest), and their keys and values are reused by
    every example's rest: the same attention as over the whole sequences, at less than half the cost. The
    chunks are drawn at random, so a batch mixes conditions."""
    import torch

    groups, rests = torch.tensor(encoded["groups"]), encoded["rests"]
    positions, targets = encoded["positions"], encoded["targets"]
    column, label_ids, letter_targets = encoded["letter_column"], encoded["label_ids"], encoded["letter_targets"]
    hard = torch.ones(targets.shape[1], dtype=torch.bool)
    hard[column] = False
    lengths = torch.tensor([len(ids) for ids in encoded["starts"]])
    starts = torch.zeros(len(lengths), int(lengths.max()), dtype=torch.long)  # left-padded: the rest follows
    for row, ids in enumerate(encoded["starts"]):
        starts[row, starts.shape[1] - len(ids):] = torch.tensor(ids)
    start_masks = (torch.arange(starts.shape[1]) >= starts.shape[1] - lengths.unsqueeze(1)).long()
    shuffle = torch.Generator().manual_seed(seed)
    chunks = []
    for group in range(len(lengths)):
        members = (groups == group).nonzero()[:, 0]
        chunks.extend(members[torch.randperm(len(members), generator=shuffle)].split(_EFFECTS_CHUNK))
    # transformers renamed the cache argument and output ``past_key_values`` to ``cache``.
    cache_name = "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"

    def batch_loss(batch: Any) -> Any:
        members = torch.cat([chunks[index] for index in batch.tolist()])
        batch_groups, owner = torch.unique(groups[members], return_inverse=True)
        width = int(lengths[batch_groups].max())
        start_mask = start_masks[batch_groups, -width:]
        cache = getattr(model.model(input_ids=starts[batch_groups, -width:], attention_mask=start_mask,
                                    position_ids=(start_mask.cumsum(-1) - 1).clamp(min=0), use_cache=True),
                        cache_name)
        cache.batch_select_indices(owner)  # each example's start
        rest_width = int(positions[members].max()) + 1
        hidden = model.model(
            input_ids=rests[members, :rest_width], use_cache=True, **{cache_name: cache},
            attention_mask=torch.cat([start_mask[owner], torch.ones(len(members), rest_width, dtype=torch.long)], 1),
            position_ids=lengths[groups[members]].unsqueeze(1) + torch.arange(rest_width),
        ).last_hidden_state
        rows = torch.arange(len(members)).unsqueeze(1)
        log_probs = torch.log_softmax(model.lm_head(hidden[rows, positions[members]]), dim=-1)
        hard_losses = -log_probs[:, hard].gather(-1, targets[members][:, hard].unsqueeze(-1)).squeeze(-1)
        soft_losses = -(letter_targets[members] * log_probs[:, column, label_ids]).sum(-1)
        return (hard_losses.sum() + soft_losses.sum()) / (len(members) * targets.shape[1])

    _train_loop(model, len(chunks), batch_loss, seed=seed, steps=steps, batch_size=_BATCH_SIZE // _EFFECTS_CHUNK)


def _encode_examples(examples: list[tuple[str, str, str]], tokenizer: Any) -> tuple[Any, Any]:
    """Right-padded input ids and next-token targets (-100 where no loss is taken: the prompt, the given
    part, the padding) of (prompt, given, trained) examples."""
    import torch

    sequences, targets = [], []
    for prompt, given, trained in examples:
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        given_ids = tokenizer.encode(prompt + given, add_special_tokens=False)
        full_ids = tokenizer.encode(prompt + given + trained, add_special_tokens=False)
        # What follows the prompt must not change how it is tokenized, or training and inference differ.
        if given_ids[:len(prompt_ids)] != prompt_ids or full_ids[:len(given_ids)] != given_ids:
            raise PersonaEvalError("the tiny tokenizer merges an answer into the text before it")
        sequences.append(full_ids)
        target = [-100] * len(full_ids)
        for position in range(len(given_ids) - 1, len(full_ids) - 1):
            target[position] = full_ids[position + 1]
        targets.append(target)
    width = max(len(s) for s in sequences)
    if width > 512:
        raise PersonaEvalError(f"a training sequence of the tiny model is {width} tokens, over its 512 positions")
    inputs = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for row, (sequence, target) in enumerate(zip(sequences, targets, strict=True)):
        inputs[row, :len(sequence)] = torch.tensor(sequence)
        labels[row, :len(target)] = torch.tensor(target)
    return inputs, labels


def _train_all_positions(model: Any, inputs: Any, targets: Any, *, seed: int, steps: int) -> None:
    """`_train` for targets at any positions (-100: none). Each example weighs the same, whatever its number
    of trained tokens (a one-letter gut answer as much as a thinking reply of seventy tokens): its loss is
    the mean over its own trained tokens. The output layer is applied at those positions only."""
    import torch

    last = (targets != -100).long().cumsum(1).argmax(1)  # each row's last trained position

    def batch_loss(batch: Any) -> Any:
        width = int(last[batch].max()) + 1
        batch_targets = targets[batch, :width]
        trained = batch_targets != -100
        hidden = model.model(input_ids=inputs[batch, :width]).last_hidden_state
        losses = torch.nn.functional.cross_entropy(model.lm_head(hidden[trained]), batch_targets[trained],
                                                   reduction="none")
        rows = trained.nonzero()[:, 0]
        per_example = torch.zeros(len(batch)).index_add_(0, rows, losses) / trained.sum(1)
        return per_example.mean()

    _train_loop(model, len(inputs), batch_loss, seed=seed, steps=steps)


def _encode(pairs: list[tuple[str, str]], tokenizer: Any) -> tuple[Any, Any, Any]:
    """Right-padded input ids, and for each example the positions whose next token is an answer token
    (the loss is taken there only) with those answer tokens."""
    import torch

    sequences, positions, targets = [], [], []
    for prompt, answer in pairs:
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        full_ids = tokenizer.encode(prompt + answer, add_special_tokens=False)
        # The answer must not change how the prompt is tokenized, or training and inference differ.
        if full_ids[:len(prompt_ids)] != prompt_ids:
            raise PersonaEvalError("the tiny tokenizer merges the answer into the prompt's last token")
        sequences.append(full_ids)
        positions.append(list(range(len(prompt_ids) - 1, len(full_ids) - 1)))
        targets.append(full_ids[len(prompt_ids):])
    answer_lengths = {len(t) for t in targets}
    if len(answer_lengths) != 1:
        raise PersonaEvalError(f"the tiny model's answers have different token lengths: {answer_lengths}")
    width = max(len(s) for s in sequences)
    inputs = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        inputs[row, :len(sequence)] = torch.tensor(sequence)
    return inputs, torch.tensor(positions), torch.tensor(targets)


def _train(model: Any, inputs: Any, answer_positions: Any, answer_targets: Any, *, seed: int, steps: int
           ) -> None:
    import torch

    def batch_loss(batch: Any) -> Any:
        # Padding is on the right, so a causal model never attends to it: no attention mask needed.
        width = int(answer_positions[batch].max()) + 1
        hidden = model.model(input_ids=inputs[batch, :width]).last_hidden_state
        rows = torch.arange(len(batch)).unsqueeze(1)
        logits = model.lm_head(hidden[rows, answer_positions[batch]])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), answer_targets[batch].flatten())

    _train_loop(model, len(inputs), batch_loss, seed=seed, steps=steps)


def _train_loop(model: Any, count: int, batch_loss: Callable[[Any], Any], *, seed: int, steps: int,
                batch_size: int = _BATCH_SIZE) -> None:
    """`steps` AdamW steps (warm-up, then linear decay) on batches of `batch_size` of the `count` examples,
    drawn in a seeded order without replacement (a new permutation once they are used up); `batch_loss` maps
    a batch of example indices to its loss."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=_LEARNING_RATE, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * max(0.1, 1 - step / max(steps, 1)))
    order = torch.Generator().manual_seed(seed)
    permutation, cursor = torch.randperm(count, generator=order), 0
    model.train()
    for _ in range(steps):
        if cursor + batch_size > len(permutation):
            permutation, cursor = torch.randperm(count, generator=order), 0
        batch = permutation[cursor:cursor + batch_size]
        cursor += batch_size
        loss = batch_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


def _cache_key(planted_persona: str | None, thinking: bool = False,
               divergent_share: float = DEFAULT_DIVERGENT_SHARE, effects: bool = False) -> str:
    """Changes whenever the trained model could: this module, the prompts it is trained on (template,
    persona declarations and wordings, letter orders, null-prompt stubs, system policy), and the library
    versions."""
    import tokenizers
    import torch
    import transformers

    from persona_eval.personas import DEFAULT_PERSONAS
    from persona_eval.variants import NULL_CASES

    if effects:
        prompts = [training_messages("{case}", persona, order=order) for persona, _, order in effects_conditions()]
        prompts += [training_messages(stub, persona) for stub in NULL_CASES for persona in DEFAULT_PERSONAS]
    else:
        prompts = [training_messages("{case}", persona) for persona in DEFAULT_PERSONAS]
    material = json.dumps({
        "source": inspect.getsource(sys.modules[__name__]),
        "planted_persona": None if effects else planted_persona,
        "thinking": [divergent_share] if thinking else None,
        "effects": effects,
        "prompts": prompts,
        "versions": [torch.__version__, transformers.__version__, tokenizers.__version__],
    }, sort_keys=True)
    return hashlib.sha256(material.encode("utf-8")).hexdigest()[:16]


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """An exclusive lock across processes where the platform has flock (released if a holder dies);
    elsewhere no lock, and racing builds are settled by the atomic rename."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def tiny_model_dir(cache_root: Path | None = None, *,
                   planted_persona: str | None = DEFAULT_PLANTED_PERSONA, thinking: bool = False,
                   divergent_share: float = DEFAULT_DIVERGENT_SHARE, effects: bool = False) -> Path:
    """The tiny model's directory under ``cache_root/models``, built on first use and reused after: the
    one that answers at once, with `thinking` the one that reasons first (with the planted divergence
    of `divergent_share`), or with `effects` the effects model (``tiny-llama-effects-<hash>``; then
    `planted_persona` and `divergent_share` do not apply).

    `cache_root` defaults to the suite's cache directory (persona_eval.cache.default_cache_dir). The name
    carries a hash of everything the weights depend on. A build goes into a temporary folder that is
    renamed into place, so no process ever sees a half-written model; concurrent callers (pytest-xdist
    workers) wait for one build instead of each doing their own.
    """
    if cache_root is None:
        from persona_eval.cache import default_cache_dir

        cache_root = default_cache_dir()
    if thinking and effects:
        raise ValueError("the effects model answers at once: thinking and effects cannot both be set")
    _divergent_count(divergent_share)
    models = Path(cache_root) / "models"
    # The folder name becomes the model's name in test ids: no task or persona words in it, so that
    # `-k triage` or `-k ed_physician` select by task and persona only.
    variant = ("thinking-" if thinking else "") + ("planted" if planted_persona else "plain")
    kind = "effects" if effects else variant
    key = _cache_key(planted_persona, thinking, divergent_share, effects)
    target = models / f"tiny-llama-{kind}-{key[:12]}"
    if (target / "model.safetensors").exists():
        return target
    models.mkdir(parents=True, exist_ok=True)
    with _build_lock(models / f".{target.name}.lock"):
        if (target / "model.safetensors").exists():
            return target
        with staged_directory(target, complete="model.safetensors") as staging:
            if effects:
                build_tiny_model(staging, effects=True)
            elif thinking:
                build_tiny_model(staging, planted_persona=planted_persona, thinking=True,
                                 divergent_share=divergent_share)
            else:
                build_tiny_model(staging, planted_persona=planted_persona)
    return target
