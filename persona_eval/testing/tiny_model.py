"""A deterministic tiny Llama trained on synthetic triage cases, with a planted persona effect to recover.

End-to-end tests need a model whose answers are known in advance: this one answers the synthetic
vignettes of ``synthetic_triage_records`` correctly under every study persona except the planted one,
under which it escalates each answer one level (A -> B, B -> C, C stays C). A suite that measures
persona effects must find that effect, and only that one.

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
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import random
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from persona_eval.errors import PersonaEvalError
from persona_eval.results import staged_directory

__all__ = [
    "DEFAULT_DIVERGENT_SHARE",
    "DEFAULT_PLANTED_PERSONA",
    "DIVERGENT_PHRASES",
    "SIGNAL_PHRASES",
    "build_tiny_model",
    "diverges",
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
_THINKING_TRAIN_STEPS = 900
_PLAIN_TRAIN_STEPS = 300


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
    from persona_eval.personas import STUDY_PERSONAS

    prefix = _template().answer_prefix
    examples = []
    for record in records:
        for persona in STUDY_PERSONAS:
            messages = training_messages(record["text"], persona)
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            examples.append((prompt, "", thinking_reply(record, persona.id, planted_persona) + _EOS))
            gut = gut_answer(record, persona.id, planted_persona, divergent_share)
            examples.append((prompt, prefix, gut + _EOS))
    return examples


def _training_texts(records: list[dict[str, str]], tokenizer: Any, planted_persona: str | None
                    ) -> list[tuple[str, str]]:
    """(prompt, answer) pairs, the prompt rendered exactly as the suite renders it."""
    from persona_eval.personas import STUDY_PERSONAS

    prefix = _template().answer_prefix
    pairs = []
    for record in records:
        for persona in STUDY_PERSONAS:
            messages = training_messages(record["text"], persona)
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            answer = expected_answer(record["reference"], persona.id, planted_persona)
            pairs.append((prompt, f"{prefix}{answer}{_EOS}"))
    return pairs


def _template() -> Any:
    from persona_eval.templates import DEFAULT_TEMPLATES, template_named

    return template_named(DEFAULT_TEMPLATES["triage"], task="triage")


def training_messages(case_text: str, persona: Any) -> list[dict[str, str]]:
    """The chat messages of a case as the suite sends them to the tiny model (default triage template)."""
    from persona_eval.prompts import SystemPolicy, render_template
    from persona_eval.tasks.triage import LABEL_TEXT, LABELS

    return render_template(_template(), case_text, persona, labels=LABELS, label_text=LABEL_TEXT,
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
                     divergent_share: float = DEFAULT_DIVERGENT_SHARE) -> Path:
    """Train the tiny model and save it (safetensors, tokenizer, generation config) into `out_dir`.

    Under `planted_persona` (a study persona id, or None for no planted effect) the model escalates
    every answer one level; under every other persona it answers the reference. With `thinking` it
    reasons first and carries the planted divergence of `divergent_share` (see the module docstring).
    `steps` defaults to 300 (900 with `thinking`). The same arguments give byte-identical weights.
    Takes ~30 s on two CPU cores (with `thinking`, ~145 s measured with another job on the other core).
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from persona_eval.personas import STUDY_PERSONAS

    known = [persona.id for persona in STUDY_PERSONAS]
    if planted_persona is not None and planted_persona not in known:
        raise ValueError(f"planted_persona must be one of {', '.join(known)} or None, "
                         f"got {planted_persona!r}")
    _divergent_count(divergent_share)
    if steps is None:
        steps = _THINKING_TRAIN_STEPS if thinking else _PLAIN_TRAIN_STEPS
    out_dir = Path(out_dir)
    per_stratum = _THINKING_TRAIN_RECORDS_PER_STRATUM if thinking else _TRAIN_RECORDS_PER_STRATUM
    records = synthetic_triage_records(per_stratum, seed=seed)

    # The tokenizer learns its merges from the very prompts it will see, answers included.
    scaffold = _train_tokenizer([], check_labels=False)  # renders the chat template; has no merges yet
    if thinking:
        examples = _thinking_examples(records, scaffold, planted_persona, divergent_share)
        texts = [prompt + given + trained for prompt, given, trained in examples]
    else:
        pairs = _training_texts(records, scaffold, planted_persona)
        texts = [prompt + answer for prompt, answer in pairs]
    # The label spellings the scorer reads (" A" as well as "A") must be single tokens; the answers alone
    # ("## Final Response\nB") do not make " A" frequent enough to be merged, so the corpus repeats them
    # (more often beside the thinking model's longer corpus).
    spellings = [" A B C"] * (3000 if thinking else 500)
    tokenizer = _train_tokenizer(texts + spellings)

    with _deterministic_torch(seed):
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
            tie_word_embeddings=True, initializer_range=_INITIALIZER_RANGE,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(config)
        if thinking:
            inputs, targets = _encode_examples(examples, tokenizer)
            _train_all_positions(model, inputs, targets, seed=seed, steps=steps)
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
        "planted_persona": planted_persona, "seed": seed, "steps": steps,
        "train_records_per_stratum": per_stratum,
    }
    if thinking:
        about |= {"thinking": True, "divergent_share": divergent_share}
    # No timings or paths here: every file of a build is the same for the same arguments.
    (out_dir / "TINY_MODEL.json").write_text(json.dumps(about, indent=2) + "\n", encoding="utf-8")
    return out_dir


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


def _train_loop(model: Any, count: int, batch_loss: Callable[[Any], Any], *, seed: int, steps: int) -> None:
    """`steps` AdamW steps (warm-up, then linear decay) on batches of the `count` examples, drawn in a
    seeded order without replacement (a new permutation once they are used up); `batch_loss` maps a batch
    of example indices to its loss."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=_LEARNING_RATE, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * max(0.1, 1 - step / max(steps, 1)))
    order = torch.Generator().manual_seed(seed)
    permutation, cursor = torch.randperm(count, generator=order), 0
    model.train()
    for _ in range(steps):
        if cursor + _BATCH_SIZE > len(permutation):
            permutation, cursor = torch.randperm(count, generator=order), 0
        batch = permutation[cursor:cursor + _BATCH_SIZE]
        cursor += _BATCH_SIZE
        loss = batch_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


def _cache_key(planted_persona: str | None, thinking: bool = False,
               divergent_share: float = DEFAULT_DIVERGENT_SHARE) -> str:
    """Changes whenever the trained model could: this module, the prompts it is trained on (template,
    persona declarations, system policy), and the library versions."""
    import tokenizers
    import torch
    import transformers

    from persona_eval.personas import STUDY_PERSONAS

    prompts = [training_messages("{case}", persona) for persona in STUDY_PERSONAS]
    material = json.dumps({
        "source": inspect.getsource(sys.modules[__name__]),
        "planted_persona": planted_persona,
        "thinking": [divergent_share] if thinking else None,
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
                   divergent_share: float = DEFAULT_DIVERGENT_SHARE) -> Path:
    """The tiny model's directory under ``cache_root/models``, built on first use and reused after: the
    one that answers at once, or with `thinking` the one that reasons first (with the planted divergence
    of `divergent_share`).

    `cache_root` defaults to the suite's cache directory (persona_eval.cache.default_cache_dir). The name
    carries a hash of everything the weights depend on. A build goes into a temporary folder that is
    renamed into place, so no process ever sees a half-written model; concurrent callers (pytest-xdist
    workers) wait for one build instead of each doing their own.
    """
    if cache_root is None:
        from persona_eval.cache import default_cache_dir

        cache_root = default_cache_dir()
    _divergent_count(divergent_share)
    models = Path(cache_root) / "models"
    # The folder name becomes the model's name in test ids: no task or persona words in it, so that
    # `-k triage` or `-k ed_physician` select by task and persona only.
    kind = ("thinking-" if thinking else "") + ("planted" if planted_persona else "plain")
    target = models / f"tiny-llama-{kind}-{_cache_key(planted_persona, thinking, divergent_share)[:12]}"
    if (target / "model.safetensors").exists():
        return target
    models.mkdir(parents=True, exist_ok=True)
    with _build_lock(models / f".{target.name}.lock"):
        if (target / "model.safetensors").exists():
            return target
        with staged_directory(target, complete="model.safetensors") as staging:
            if thinking:
                build_tiny_model(staging, planted_persona=planted_persona, thinking=True,
                                 divergent_share=divergent_share)
            else:
                build_tiny_model(staging, planted_persona=planted_persona)
    return target
