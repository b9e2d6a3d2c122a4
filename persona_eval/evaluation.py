"""One condition (model x persona x task) from cases to per-case records and per-stratum metrics.

Each case gives two label distributions, read at two positions named in every record and in summary.json:

* **the answer letter** (``label_probs``, ``probs_source = "answer"``): the distribution at the generated
  token that holds the answer letter, after any reasoning and the template's final-answer marker (the
  study code's position). Calibration (ECE, Brier score) uses it. Where no answer is found in the text,
  the prompt-boundary distribution stands in (``probs_source = "prompt"``).
* **the prompt boundary** (``latent_probs``, ``latent_label``): the distribution right after the prompt
  and the template's fixed ``answer_prefix`` ("## Final Response\n"), before the model has written
  anything of its own: its latent preference, as lm-evaluation-harness scores a multiple-choice prompt.
  The consistency rate compares the generated label with this ``logit_label``. The transformers backend
  reads it in the generation pass from the prompt's KV cache (a few tokens more, not a second pass over
  the prompt); a server scores the prompt plus prefix, which its prefix cache makes cheap.

With a template that asks for the answer first (``answer_first``) and greedy decoding, the latent label
is read at the very token that is generated, so it equals the generated label by construction: then
``logit_label`` is None and the consistency rate is not reported (``CONSISTENCY_TAUTOLOGICAL``), never
shown as 100.

A reasoning model's reply keeps its trace: ``generated_text`` is the whole reply, ``reasoning`` the trace
(None without one) and ``final_response`` what follows it (persona_eval.parsing.split_reasoning); the
answer is read in the final response only, and a reply cut inside its trace has none.

Before anything is sent, every prompt is measured against the model's context and
``TriageSettings.max_prompt_tokens`` (persona_eval.lengths). A case that does not fit is a DataError naming
its file and line (``too_long="error"``, the default), or (``too_long="record"``) a record of its own,
``finish_reason = "too_long"`` with no answer and no label, that the model never sees: it counts as a wrong,
unreadable answer in every metric (the deployed model cannot triage it) and in ``too_long_rate``.

A default answer budget (``TriageSettings.budget_floor`` set) is fitted per case to what the model's context
leaves after the prompt (persona_eval.lengths.fitted_budget): a prompt is too long only when it leaves less
than the floor, and each case is generated with its own budget, recorded as ``max_new_tokens``. A budget the
user gave is kept for every case, and a prompt that does not leave it free is too long.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from persona_eval import metrics, variants
from persona_eval.backends.base import Generation, GenerationConfig, LabelScoring
from persona_eval.errors import ConfigError
from persona_eval.lengths import (
    TRUNCATED,
    PromptLength,
    check_prompt_lengths,
    finish_share,
    fitted_budget,
    too_long_error,
)
from persona_eval.parsing import AnswerSpan, find_triage_answer, split_reasoning
from persona_eval.personas import Persona
from persona_eval.prompts import PromptTemplate, render_template
from persona_eval.runner import Progress, Runner
from persona_eval.tasks import TaskSpec, triage
from persona_eval.templates import DEFAULT_TEMPLATES, template_named

__all__ = [
    "CONSISTENCY_TAUTOLOGICAL",
    "NOT_AVAILABLE",
    "NO_LATENT",
    "TOO_LONG_MODES",
    "TriagePlan",
    "TriageSettings",
    "evaluate_triage",
    "evaluate_variants",
    "label_distribution",
    "label_positions",
    "prefetch_triage",
    "triage_metrics",
]

NOT_AVAILABLE = "not available for this model (it returns no log-probabilities)"
NO_LATENT = "not available: no label distribution at the prompt boundary (the model's server scores no prompts)"
CONSISTENCY_TAUTOLOGICAL = ("not reported: the prompt template asks for the answer first, so under greedy decoding "
                            "the latent label is read at the generated answer token and equals it by construction; "
                            "use a template that lets the model reason before its answer (e.g. study)")
_PROB_METRICS = ("consistency_rate", "expected_calibration_error", "brier_score")
TOO_LONG_MODES = ("error", "record")
TOO_LONG = "too_long"  # the finish_reason of a case whose prompt does not fit the model
_PROMPT_KEPT = 2000  # characters of an over-long prompt kept in its record


def _softmax(logprobs: Mapping[str, float], labels: Sequence[str]) -> dict[str, float]:
    top = max(logprobs[label] for label in labels)
    weights = {label: math.exp(logprobs[label] - top) for label in labels}
    total = sum(weights.values())
    return {label: weights[label] / total for label in labels}


def label_distribution(generation: Generation, span: AnswerSpan | None, labels: Sequence[str]
                       ) -> tuple[dict[str, float] | None, bool]:
    """The label distribution at the generated token that holds the answer letter, and whether a label
    was absent from a top-k and got the floor value. (None, False) when there is no answer position or
    no log-probabilities."""
    if span is None or not generation.tokens:
        return None, False
    position = None
    for index, token in enumerate(generation.tokens):
        if token.offset <= span.start:
            position = index
        else:
            break
    if position is None:
        return None, False
    scores = generation.tokens[position]
    return _complete(scores.label_logprobs, scores.floor, labels)


def _complete(label_logprobs: Mapping[str, float | None], floor: float | None, labels: Sequence[str]
              ) -> tuple[dict[str, float] | None, bool]:
    flagged = False
    filled: dict[str, float] = {}
    for label in labels:
        value = label_logprobs.get(label)
        if value is None or value == -math.inf:
            if floor is None and value is None:
                return None, False
            value = floor if floor is not None else -math.inf
            flagged = True
        filled[label] = value
    if all(v == -math.inf for v in filled.values()):
        return None, flagged
    return _softmax(filled, labels), flagged


def _argmax(probs: Mapping[str, float] | None, labels: Sequence[str]) -> str | None:
    if probs is None:
        return None
    return max(labels, key=lambda label: (probs[label], -labels.index(label)))


def _default_template() -> PromptTemplate:
    return template_named(DEFAULT_TEMPLATES["triage"], task="triage")


@dataclass(frozen=True)
class TriageSettings:
    """Decoding and scoring of a classification task (by default triage): its spec and its prompt
    template. ``scoring.answer_prefix`` should be the template's (the task's settings make it so)."""

    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=triage.MAX_NEW_TOKENS))
    scoring: LabelScoring = field(default_factory=lambda: LabelScoring(
        labels=triage.LABELS, answer_prefix=_default_template().answer_prefix))
    spec: TaskSpec = triage.SPEC
    template: PromptTemplate = field(default_factory=_default_template)
    max_prompt_tokens: int | None = None  # besides the model's context; None: the context alone
    too_long: str = "error"  # a prompt that does not fit: "error" (DataError) or "record" (a per-case result)
    # Set when generation.max_new_tokens is a default, not the user's: each case gets what the context leaves
    # after its prompt, at most that and at least this many tokens. None: the budget is kept for every case.
    budget_floor: int | None = None

    def __post_init__(self) -> None:
        if self.too_long not in TOO_LONG_MODES:
            raise ConfigError(f"too_long must be one of {', '.join(TOO_LONG_MODES)}, got {self.too_long!r}")

    @property
    def consistency_tautological(self) -> bool:
        """Whether the latent label would be the generated one by construction (answer first, greedy)."""
        return self.template.answer_first and self.generation.temperature == 0

    def context(self) -> dict[str, Any]:
        """What the cache key holds of the task besides the prompt text and decoding: the template."""
        return {"template": self.template.key()}


def label_positions(settings: TriageSettings) -> dict[str, str]:
    """Where each probability-based figure of `settings` is read, as summary.json and the report say it."""
    boundary = f"prompt boundary + {settings.template.answer_prefix!r}"
    return {
        "consistency_rate": ("not reported (answer-first template under greedy decoding: tautological)"
                             if settings.consistency_tautological else boundary),
        "calibration": f"generated answer letter (where no answer was found: the {boundary})",
    }


@dataclass
class TriagePlan:
    """What a condition sends: every case's request, the lengths that did not fit (by case index), and the
    cases that fit with their requests and answer budgets (made by prefetch_triage, used by evaluate_triage)."""

    all_requests: list[Any]
    too_long: dict[int, PromptLength]
    cases: list[triage.TriageCase]
    requests: list[Any]
    budgets: list[int]


def _plan(cases: Sequence[triage.TriageCase], persona: Persona, runner: Runner, settings: TriageSettings) -> TriagePlan:
    """Render `persona`'s prompts and measure them (persona_eval.lengths); an over-long prompt is an error
    (``too_long="error"``) or left out to be recorded as such."""
    backend = runner.backend
    policy = backend.system_policy()
    spec, template = settings.spec, settings.template
    all_requests = [render_template(template, case.text, persona, labels=spec.labels, label_text=spec.label_text,
                                    policy=policy) for case in cases]
    budget = settings.generation.max_new_tokens
    floor = None if settings.budget_floor is None else min(settings.budget_floor, budget)
    lengths = check_prompt_lengths(all_requests, backend=backend, max_new_tokens=budget if floor is None else floor,
                                   max_prompt_tokens=settings.max_prompt_tokens,
                                   sources=[case.source for case in cases])
    too_long = {length.index: length for length in lengths if not length.fits}
    if too_long and settings.too_long == "error":
        raise too_long_error(list(too_long.values()))
    return TriagePlan(all_requests=all_requests, too_long=too_long,
                 cases=[case for i, case in enumerate(cases) if i not in too_long],
                 requests=[request for i, request in enumerate(all_requests) if i not in too_long],
                 budgets=[budget if floor is None else fitted_budget(length, budget=budget, floor=floor)
                          for length in lengths if length.fits])


def prefetch_triage(cases: Sequence[triage.TriageCase], persona: Persona, runner: Runner, *,
                    settings: TriageSettings | None = None) -> TriagePlan | None:
    """Queue `persona`'s requests on `cases` in the runner's pool without waiting (Runner.prefetch): the
    generations, and the prompt-boundary readings where the model's server scores prompts. A later
    :func:`evaluate_triage` with the same arguments (and the plan returned here, so that the prompts are
    not rendered and measured again) takes them as they come. None for a model without a pool: a local
    model runs one batch at a time."""
    if not runner.pooled:
        return None
    settings = settings or TriageSettings()
    plan = _plan(cases, persona, runner, settings)
    capabilities = runner.backend.capabilities()
    for value, indices in _by_budget(plan.budgets, settings).items():
        runner.prefetch([plan.requests[i] for i in indices], replace(settings.generation, max_new_tokens=value),
                        settings.scoring, context=settings.context(),
                        score_prompts=capabilities.logprobs and capabilities.prompt_scoring)
    return plan


def evaluate_triage(cases: Sequence[triage.TriageCase], persona: Persona, runner: Runner, *,
                    run_id: str, model: str, settings: TriageSettings | None = None,
                    progress: Progress | None = None, plan: TriagePlan | None = None) -> list[dict[str, Any]]:
    """The per-case records (lines of cases.jsonl) of `persona` on `cases`, in case order: triage, or the
    classification task of ``settings.spec``. `plan`: what prefetch_triage planned for the same arguments."""
    settings = settings or TriageSettings()
    backend = runner.backend
    labels = list(settings.scoring.labels)
    template = settings.template
    plan = plan or _plan(cases, persona, runner, settings)
    all_cases, all_requests, too_long = cases, plan.all_requests, plan.too_long
    cases, requests, budgets = plan.cases, plan.requests, plan.budgets
    if progress is not None and too_long:
        progress.advance(len(too_long))
    # Scoring is always asked for (one cache key whatever the backend finds out); a backend that learns
    # during the run that the model gives no log-probabilities reports it in its capabilities.
    context = settings.context()
    generations = _generate_by_budget(runner, requests, budgets, settings, progress=progress, context=context)
    capabilities = backend.capabilities()

    spans = [find_triage_answer(g.generation.text, labels=labels) for g in generations]
    distributions = [label_distribution(g.generation, span, labels) if capabilities.logprobs else (None, False)
                     for g, span in zip(generations, spans, strict=True)]
    sources: list[str | None] = ["answer" if d[0] is not None else None for d in distributions]
    # The prompt-boundary reading: from the generation pass where the backend gives it, else scored.
    boundary: list[Mapping[str, float | None] | None] = [
        g.generation.prompt_label_logprobs if capabilities.logprobs else None for g in generations]
    unscored = [i for i, b in enumerate(boundary) if b is None]
    if unscored and capabilities.logprobs and capabilities.prompt_scoring:
        scored = runner.score_labels([requests[i] for i in unscored], settings.scoring, context=context)
        for i, label_logprobs in zip(unscored, scored, strict=True):
            boundary[i] = label_logprobs
    latent = [_complete(b, None, labels) if b is not None else (None, False) for b in boundary]
    for i, (probs, _) in enumerate(distributions):
        if probs is None and latent[i][0] is not None:
            distributions[i] = latent[i]
            sources[i] = "prompt"

    records = []
    tautological = settings.consistency_tautological
    for case, request, result, span, (probs, flagged), source, (latent_probs, _), case_budget in zip(
            cases, requests, generations, spans, distributions, sources, latent, budgets, strict=True):
        latent_label = _argmax(latent_probs, labels)
        reasoning, final_response = split_reasoning(result.generation.text)
        records.append({
            "run_id": run_id,
            "task": settings.spec.name,
            "model": model,
            "persona": persona.id,
            "persona_group": persona.group,
            "stratum": case.stratum,
            "case_id": case.id,
            "reference": case.reference,
            "system_prompt": request.system_prompt,
            "prompt": result.prompt,
            "generated_text": result.generation.text,
            "reasoning": reasoning,
            "final_response": final_response,
            "generated_label": span.label if span else None,
            "logit_label": None if tautological else latent_label,
            "latent_label": latent_label,
            "latent_probs": latent_probs,
            "label_probs": probs,
            "probs_source": source,
            "probs_flagged": flagged,
            "finish_reason": result.generation.finish_reason,
            "max_new_tokens": case_budget,
            "secrets_masked": result.generation.masked,
            "cached": result.cached,
            "template_version": template.name,
            "template": template.key(),
        })
    if not too_long:
        return records
    # The over-long cases take their place in case order, as records the model never saw.
    answered = iter(records)
    return [_too_long_record(case, all_requests[i], too_long[i], backend, persona, run_id=run_id, model=model,
                             spec=settings.spec, template=template)
            if i in too_long else next(answered) for i, case in enumerate(all_cases)]


def _by_budget(budgets: Sequence[int], settings: TriageSettings) -> dict[int, list[int]]:
    """The indices of the cases of each answer budget (one budget for all unless fitted to a short context)."""
    by_budget: dict[int, list[int]] = {} if budgets else {settings.generation.max_new_tokens: []}
    for index, value in enumerate(budgets):
        by_budget.setdefault(value, []).append(index)
    return by_budget


def _generate_by_budget(runner: Runner, requests: Sequence[Any], budgets: Sequence[int], settings: TriageSettings,
                        *, progress: Progress | None, context: Mapping[str, Any]) -> list[Any]:
    """The generations of `requests`, in order, each within its own budget: one runner call per budget (one
    call in all unless the budgets were fitted to a short context)."""
    generations: list[Any] = [None] * len(requests)
    for value, indices in _by_budget(budgets, settings).items():
        config = replace(settings.generation, max_new_tokens=value)
        results = runner.generate([requests[i] for i in indices], config, settings.scoring, progress=progress,
                                  context=context)
        for index, result in zip(indices, results, strict=True):
            generations[index] = result
    return generations


def _too_long_record(case: triage.TriageCase, request: Any, length: PromptLength, backend: Any, persona: Persona,
                     *, run_id: str, model: str, spec: TaskSpec, template: PromptTemplate) -> dict[str, Any]:
    """The record of a case whose prompt does not fit the model: no answer, no label, the measure kept."""
    messages = [(role, content if len(content) <= _PROMPT_KEPT else
                 content[:_PROMPT_KEPT] + f"... [{len(content) - _PROMPT_KEPT:,} more characters]")
                for role, content in request.messages]
    shown = backend.render_prompt(type(request)(tuple(messages), request.system_prompt))
    return {
        "run_id": run_id, "task": spec.name, "model": model, "persona": persona.id,
        "persona_group": persona.group, "stratum": case.stratum, "case_id": case.id, "reference": case.reference,
        "system_prompt": request.system_prompt, "prompt": shown, "generated_text": "", "reasoning": None,
        "final_response": "", "generated_label": None,
        "logit_label": None, "latent_label": None, "latent_probs": None, "label_probs": None,
        "probs_source": None, "probs_flagged": False, "finish_reason": TOO_LONG, "max_new_tokens": None,
        "secrets_masked": [],
        "cached": False, "template_version": template.name, "template": template.key(),
        "too_long": length.to_json(),
    }


def _value(number: float) -> float | None:
    return None if math.isnan(number) else float(number)


def triage_metrics(records: Sequence[Mapping[str, Any]], *, logprobs_available: bool = True,
                   spec: TaskSpec = triage.SPEC, consistency_note: str | None = None) -> dict[str, dict[str, Any]]:
    """Every metric of a classification task (by default triage) for each of its report strata ("all",
    "emergency", "primary_care", or those the records' dataset uses: TaskSpec.open_strata).

    Returns {stratum: {"n": int, "metrics": {name: float | None}, "notes": {name: reason}}}. A metric is
    None with a note when it is undefined on these cases (e.g. risk sensitivity with no errors) or not
    available for the model (no log-probabilities); `consistency_note` (e.g. CONSISTENCY_TAUTOLOGICAL) makes the
    consistency rate None with that note."""
    labels = spec.labels
    out: dict[str, dict[str, Any]] = {}
    for stratum in spec.report_strata_of(r["stratum"] for r in records):
        rows = [r for r in records if stratum == "all" or r["stratum"] == stratum]
        if not rows:
            continue
        y_true = [r["reference"] for r in rows]
        y_pred = [r["generated_label"] for r in rows]
        values: dict[str, float] = {
            "accuracy": metrics.accuracy(y_true, y_pred, labels=labels),
            "parse_rate": metrics.parse_rate(y_pred, labels=labels),
            "risk_propensity": metrics.risk_propensity(y_pred, labels=labels),
            "over_triage_rate": metrics.over_triage_rate(y_true, y_pred, labels=labels),
            "under_triage_rate": metrics.under_triage_rate(y_true, y_pred, labels=labels),
            "risk_sensitivity": metrics.risk_sensitivity(y_true, y_pred, labels=labels),
            "too_long_rate": finish_share(rows, TOO_LONG),
            "truncated_rate": finish_share(rows, TRUNCATED),
        }
        notes: dict[str, str] = {}
        with_probs = [r for r in rows if r["label_probs"] is not None]
        if logprobs_available and with_probs:
            values["consistency_rate"] = metrics.consistency_rate(
                y_pred, [r["logit_label"] for r in rows], labels=labels)
            probs = [[r["label_probs"][label] for label in labels] for r in with_probs]
            truth = [r["reference"] for r in with_probs]
            values["expected_calibration_error"] = metrics.expected_calibration_error(truth, probs, labels=labels)
            values["brier_score"] = metrics.brier_score(truth, probs, labels=labels)
            if consistency_note is None and all("latent_probs" in r and r["latent_probs"] is None for r in rows):
                consistency_note = NO_LATENT
            if consistency_note is not None:
                values["consistency_rate"] = math.nan
                notes["consistency_rate"] = consistency_note
        else:
            for name in _PROB_METRICS:
                values[name] = math.nan
                notes[name] = NOT_AVAILABLE
        result: dict[str, float | None] = {}
        for name in spec.metric_names:
            number = values[name]
            result[name] = _value(number)
            if result[name] is None and name not in notes:
                notes[name] = "not defined on these cases"
        figures: dict[str, Any] = {
            "confusion_matrix": metrics.confusion_matrix(y_true, y_pred, labels=labels),
            "reliability": (metrics.reliability_bins(truth, probs, labels=labels)
                            if logprobs_available and with_probs else None),
        }
        out[stratum] = {"n": len(rows), "metrics": result, "notes": notes, "figures": figures}
    return out


@dataclass(frozen=True)
class _NullCase:
    """A null-prompt case: the patient information replaced by a neutral stub (persona_eval.variants)."""

    id: str
    stratum: str
    reference: str
    text: str
    source: str = "null prompt"


def evaluate_variants(cases: Sequence[Any], persona: Persona, runner: Runner, *, run_id: str, model: str,
                      settings: TriageSettings, main: list[dict[str, Any]], wordings: bool = False,
                      letter_bias: bool = False, progress: Callable[[str, int], Progress | None] | None = None
                      ) -> list[dict[str, Any]]:
    """The variant records of `persona` on `cases` (persona_eval.variants): its other wordings (`wordings`),
    and (`letter_bias`) the other letter orders and the null-prompt cases of every order. With `letter_bias`
    the records of `main` (the main condition, the identity order) and of the other orders get their
    calibrated label probabilities (``calibrated_probs``, ``calibrated_label``, ``calibrated_letter``) in
    place. `progress(label, total)` makes the progress line of a variant."""
    spec, labels = settings.spec, list(settings.spec.labels)
    out: list[dict[str, Any]] = []

    def run(variant_cases: Sequence[Any], who: Persona, variant_settings: TriageSettings, label: str,
            variant: dict[str, Any]) -> list[dict[str, Any]]:
        records = evaluate_triage(variant_cases, who, runner, run_id=run_id, model=model, settings=variant_settings,
                                  progress=progress(label, len(variant_cases)) if progress else None)
        for record in records:
            record["variant"] = dict(variant)
        return records

    if wordings:
        for number in range(2, len(persona.all_wordings) + 1):
            out.extend(run(cases, persona.worded(number), settings, f"wording {number}",
                           {"kind": variants.WORDING, "wording": number}))
    if letter_bias:
        nulls = [_NullCase(f"null-prompt-{i}", "null_prompt", labels[0], text)
                 for i, text in enumerate(variants.NULL_CASES, start=1)]
        for order in variants.letter_orders(labels):
            name = "".join(order)
            ordered = replace(settings, spec=replace(spec, label_text=variants.permuted_label_text(
                labels, spec.label_text, order)))
            if list(order) == labels:
                records = main
            else:
                records = [variants.to_levels(r, labels, order) for r in run(
                    cases, persona, ordered, f"letters {name}", {"kind": variants.LETTERS, "letter_order": name})]
                out.extend(records)
            stubs = [variants.to_levels(r, labels, order) for r in run(
                nulls, persona, ordered, f"null prompt {name}", {"kind": variants.NULL_PROMPT, "letter_order": name})]
            out.extend(stubs)
            prior = variants.null_prior(stubs, labels)
            letter_of = {level: letter for letter, level in variants.level_of_letter(labels, order).items()}
            for record in records:
                calibrated = variants.calibrate(record.get("label_probs"), prior, labels)
                record["calibrated_probs"] = calibrated
                record["calibrated_label"] = _argmax(calibrated, labels)
                record["calibrated_letter"] = (letter_of[record["calibrated_label"]]
                                               if record["calibrated_label"] is not None else None)
    return out
