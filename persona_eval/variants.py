"""The variants a classification task can run besides its main condition, to tell a persona's effect apart
from effects of wording and of answer letters.

* **Wordings** (``--pe-wordings``): the persona's declaration said in other words (Persona.wordings). Each
  wording after the first runs the task once more; the main condition is wording 1.
* **Letter orders** (``--pe-letter-bias``): which letter stands for which answer. The task's labels stay the
  letters the prompt lists (A, B, C), but letter ``labels[i]`` shows the text of level
  ``labels[(i + r) % k]`` in order ``r``: the k cyclic rotations, the identity first, form a Latin square,
  so over the rotations every level is shown under every letter exactly once. A model with no preference
  for a letter then writes each letter for exactly 1/k of its answers, whatever its answers are, and a
  persona's effect on the levels it chooses, averaged over the rotations, is free of any letter preference.
* **The null prompt** (``--pe-letter-bias``): the label distribution with the patient information replaced by
  neutral stubs (``NULL_CASES``), averaged over the stubs: the model's prior over the letters under a persona
  and an order, when there is nothing to triage. Dividing a case's label probabilities by it and
  renormalizing is contextual calibration (Zhao et al., 2021, "Calibrate before use"): a preference for a
  letter that does not depend on the case is removed.

Variant records are the records of persona_eval.evaluation with a ``variant`` field and the answers given
as levels (the task's canonical labels, as the main records give them): ``generated_letter`` keeps the
letter the model wrote. They are written to variants.jsonl, never to cases.jsonl, so the main comparisons,
the gate and an approved baseline see the main condition only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "LETTERS",
    "NULL_CASES",
    "NULL_PROMPT",
    "WORDING",
    "calibrate",
    "letter_orders",
    "level_of_letter",
    "null_prior",
    "permuted_label_text",
    "to_levels",
]

WORDING = "wording"
LETTERS = "letters"
NULL_PROMPT = "null_prompt"
# Patient information with nothing in it, in three forms (a model may read one of them as a case).
NULL_CASES: tuple[str, ...] = ("N/A", "No information was given.", "[no details]")


def letter_orders(labels: Sequence[str]) -> list[tuple[str, ...]]:
    """The k cyclic rotations of `labels`, the identity first: order ``r`` lists, for each letter in
    `labels`' order, the level that letter stands for.

    >>> letter_orders("ABC")
    [('A', 'B', 'C'), ('B', 'C', 'A'), ('C', 'A', 'B')]
    """
    labels = tuple(labels)
    return [labels[r:] + labels[:r] for r in range(len(labels))]


def level_of_letter(labels: Sequence[str], order: Sequence[str]) -> dict[str, str]:
    """{letter: level} of `order` (as :func:`letter_orders` gives it).

    >>> level_of_letter("ABC", ("B", "C", "A"))
    {'A': 'B', 'B': 'C', 'C': 'A'}
    """
    if sorted(order) != sorted(labels):
        raise ValueError(f"a letter order must hold each of {', '.join(labels)} once, got {''.join(order)}")
    return dict(zip(labels, order, strict=True))


def permuted_label_text(labels: Sequence[str], label_text: Mapping[str, str], order: Sequence[str]
                        ) -> dict[str, str]:
    """The options of `order`: each letter with the text of the level it stands for.

    >>> permuted_label_text("AB", {"A": "Home", "B": "Hospital"}, ("B", "A"))
    {'A': 'Hospital', 'B': 'Home'}
    """
    return {letter: label_text[level] for letter, level in level_of_letter(labels, order).items()}


def _levels(distribution: Mapping[str, float] | None, mapping: Mapping[str, str]) -> dict[str, float] | None:
    if distribution is None:
        return None
    return {mapping[letter]: value for letter, value in distribution.items()}


def to_levels(record: dict[str, Any], labels: Sequence[str], order: Sequence[str]) -> dict[str, Any]:
    """`record` (of a case asked with the letters of `order`) with its answers given as levels: the labels
    and the label distributions mapped from letters to levels, the letter written kept as
    ``generated_letter``, the order as ``letter_order``. In place, and returned."""
    mapping = level_of_letter(labels, order)
    record["generated_letter"] = record.get("generated_label")
    record["letter_order"] = "".join(order)
    for field in ("generated_label", "logit_label", "latent_label"):
        if record.get(field) is not None:
            record[field] = mapping[record[field]]
    for field in ("label_probs", "latent_probs"):
        record[field] = _levels(record.get(field), mapping)
    return record


def null_prior(records: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> dict[str, float] | None:
    """The mean label distribution (``label_probs``) of the null-prompt records, by level; None when none
    of them has one.

    >>> null_prior([{"label_probs": {"A": 0.6, "B": 0.2, "C": 0.2}},
    ...             {"label_probs": {"A": 0.8, "B": 0.1, "C": 0.1}}], "ABC")
    {'A': 0.7, 'B': 0.15000000000000002, 'C': 0.15000000000000002}
    """
    present = [r["label_probs"] for r in records if r.get("label_probs") is not None]
    if not present:
        return None
    return {label: sum(float(p[label]) for p in present) / len(present) for label in labels}


def calibrate(probs: Mapping[str, float] | None, prior: Mapping[str, float] | None, labels: Sequence[str]
              ) -> dict[str, float] | None:
    """Contextual calibration: ``q[l] = (p[l] / prior[l]) / sum_m (p[m] / prior[m])``. None when either is
    missing or a prior probability is 0 (a letter the model never writes cannot be reweighted).

    >>> calibrate({"A": 0.5, "B": 0.25, "C": 0.25}, {"A": 0.5, "B": 0.25, "C": 0.25}, "ABC")
    {'A': 0.3333333333333333, 'B': 0.3333333333333333, 'C': 0.3333333333333333}
    """
    if probs is None or prior is None or any(not prior[label] > 0 for label in labels):
        return None
    weights = {label: float(probs[label]) / float(prior[label]) for label in labels}
    total = sum(weights.values())
    if not total > 0 or not math.isfinite(total):
        return None
    return {label: weights[label] / total for label in labels}
