"""The patient-safety task end to end: one condition's responses, the judge panel on them, the summary.

``evaluate_safety`` answers the queries under one (model, persona) and returns its response records;
``judge_model_responses`` (from persona_eval.judges) ranks one model's responses of every persona with
each judge and criterion; ``safety_summary`` turns both into the ``safety`` block of summary.json.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from persona_eval.backends.base import GenerationConfig
from persona_eval.judges import (
    ALL,
    POOLED,
    SAFETY_CRITERIA,
    first_showings,
    judge_model_responses,
    mrr_table,
    panel_summary,
)
from persona_eval.lengths import TRUNCATED, check_prompt_lengths, finish_share, too_long_error
from persona_eval.parsing import split_reasoning
from persona_eval.personas import BASELINE, Persona
from persona_eval.prompts import render_messages
from persona_eval.runner import Progress, Runner
from persona_eval.tasks import safety

__all__ = [
    "evaluate_safety",
    "judge_model_responses",
    "persona_safety_metrics",
    "prefetch_safety",
    "responses_by_persona",
    "safety_summary",
]


def evaluate_safety(queries: Sequence[safety.SafetyQuery], persona: Persona, runner: Runner, *, run_id: str,
                    model: str, max_new_tokens: int, pressure_suffix: str | None = None,
                    progress: Progress | None = None, max_prompt_tokens: int | None = None,
                    stop: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The response records of `persona` on `queries` (in query order), through the runner's cache; each
    answer at most `max_new_tokens` long, ending before the first of the `stop` sequences it writes.

    Each record: run_id, task ("safety"), model, persona, persona_group, query_id, category (1-5),
    category_name, query (the query as written in the data), pressure_suffix (None when off),
    system_prompt, prompt (the exact text the model saw), response (the whole reply), reasoning (its
    reasoning trace, None without one), final_response (what follows the trace: what the judges see),
    finish_reason, secrets_masked (the names of secrets masked in the response; normally empty), cached,
    template_version.
    """
    requests = _checked_requests(queries, persona, runner, max_new_tokens=max_new_tokens,
                                 pressure_suffix=pressure_suffix, max_prompt_tokens=max_prompt_tokens)
    generations = runner.generate(requests, GenerationConfig(max_new_tokens=max_new_tokens, stop=tuple(stop)),
                                  None, progress=progress)
    suffix = pressure_suffix.strip() if pressure_suffix is not None and pressure_suffix.strip() else None
    records = []
    for query, request, result in zip(queries, requests, generations, strict=True):
        reasoning, final_response = split_reasoning(result.generation.text)
        records.append({
            "run_id": run_id,
            "task": safety.TASK,
            "model": model,
            "persona": persona.id,
            "persona_group": persona.group,
            "query_id": query.id,
            "category": query.category,
            "category_name": query.category_name,
            "query": query.content,
            "pressure_suffix": suffix,
            "system_prompt": request.system_prompt,
            "prompt": result.prompt,
            "response": result.generation.text,
            "reasoning": reasoning,
            "final_response": final_response,
            "finish_reason": result.generation.finish_reason,
            "secrets_masked": result.generation.masked,
            "cached": result.cached,
            "template_version": safety.TEMPLATE_VERSION,
        })
    return records


def prefetch_safety(queries: Sequence[safety.SafetyQuery], persona: Persona, runner: Runner, *,
                    max_new_tokens: int, pressure_suffix: str | None = None, max_prompt_tokens: int | None = None,
                    stop: Sequence[str] = ()) -> int:
    """Queue `persona`'s answers to `queries` in the runner's pool without waiting (Runner.prefetch), for a
    later :func:`evaluate_safety` with the same arguments; how many were queued (none without a pool)."""
    if not runner.pooled:
        return 0
    requests = _checked_requests(queries, persona, runner, max_new_tokens=max_new_tokens,
                                 pressure_suffix=pressure_suffix, max_prompt_tokens=max_prompt_tokens)
    return runner.prefetch(requests, GenerationConfig(max_new_tokens=max_new_tokens, stop=tuple(stop)), None)


def _checked_requests(queries: Sequence[safety.SafetyQuery], persona: Persona, runner: Runner, *,
                      max_new_tokens: int, pressure_suffix: str | None, max_prompt_tokens: int | None) -> list[Any]:
    """`persona`'s requests for `queries`. A query that does not fit the model is a data error naming its
    line (the panel ranks every persona's answer to every query, so a query cannot be left out of one
    persona's run)."""
    backend = runner.backend
    policy = backend.system_policy()
    requests = [render_messages(safety.user_message(query.content, pressure_suffix), persona, policy)
                for query in queries]
    lengths = check_prompt_lengths(requests, backend=backend, max_new_tokens=max_new_tokens,
                                   max_prompt_tokens=max_prompt_tokens, sources=[query.source for query in queries])
    too_long = [length for length in lengths if not length.fits]
    if too_long:
        raise too_long_error(too_long, can_record=False)
    return requests


def responses_by_persona(responses: Sequence[Mapping[str, Any]], model: str,
                         personas: Sequence[str] | None = None) -> dict[str, list[Mapping[str, Any]]]:
    """One model's response records grouped by persona (in `personas` order, else first-seen order):
    the first argument of ``judge_model_responses``."""
    grouped: dict[str, list[Mapping[str, Any]]] = {}
    for record in responses:
        if record["model"] == model:
            grouped.setdefault(record["persona"], []).append(record)
    if personas is None:
        return grouped
    return {p: grouped[p] for p in personas if p in grouped} | {p: r for p, r in grouped.items()
                                                                 if p not in personas}


def safety_summary(responses: Sequence[Mapping[str, Any]], judgments: Sequence[Mapping[str, Any]]
                   ) -> dict[str, Any]:
    """The ``safety`` block of summary.json (JSON-able; undefined values are None).

    From the response records: ``template_version``, ``pressure_suffix``, ``categories`` ({"1": name}),
    ``personas`` (ids in run order), ``persona_groups``, ``responses`` ({model: {persona: {"n",
    "truncated", "cached"}}}). From the safety judgments: everything of persona_eval.judges.panel_summary
    (``mrr``, ``tests``, ``agreement``, ``invalid``, ``templates``, ...), keyed by category number as
    text with "all" for every category, and "pooled" for all judges together.
    """
    rows = [r for r in responses if r.get("task", safety.TASK) == safety.TASK]
    personas = list(dict.fromkeys(r["persona"] for r in rows))
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for record in rows:
        cell = counts.setdefault(record["model"], {}).setdefault(
            record["persona"], {"n": 0, "truncated": 0, "cached": 0})
        cell["n"] += 1
        cell["truncated"] += record.get("finish_reason") == TRUNCATED
        cell["cached"] += bool(record.get("cached"))
    suffixes = sorted({r["pressure_suffix"] for r in rows if r.get("pressure_suffix")})
    judged = [j for j in judgments if j.get("task", safety.TASK) == safety.TASK]
    return {
        "task": safety.TASK,
        "template_version": safety.TEMPLATE_VERSION,
        "pressure_suffix": suffixes[0] if len(suffixes) == 1 else (suffixes or None),
        "categories": {str(number): name for number, name in safety.CATEGORIES.items()},
        "personas": personas,
        "persona_groups": {r["persona"]: r["persona_group"] for r in rows},
        "responses": counts,
        **panel_summary(judged, personas=personas),
    }


def persona_safety_metrics(judgments: Sequence[Mapping[str, Any]], *, model: str, persona: str,
                           personas: Sequence[str], responses: Sequence[Mapping[str, Any]] = ()
                           ) -> dict[str, dict[str, Any]]:
    """The safety metrics of one persona of `model`, per stratum ("all" and each category key), in the
    shape of evaluation.triage_metrics: {stratum: {"n", "metrics", "notes"}}.

    ``safety_mrr``: the persona's mean reciprocal rank under the safety criterion, pooled over judges;
    ``<criterion>_mrr_delta``: that MRR minus no_persona's (positive: the judges prefer the persona);
    ``invalid_ranking_share``: the share of the panel's rankings of this model that were invalid (the
    same for every persona of the model); ``truncated_rate``: the share of the persona's `responses` (its
    response records) cut at the token budget, None without them."""
    own = [j for j in first_showings(judgments) if j["model"] == model and j.get("task", safety.TASK) == safety.TASK]
    table = mrr_table(own, personas=personas).get(model, {})
    invalid_share = (sum(1 for j in own if not j.get("valid")) / len(own)) if own else None
    out: dict[str, dict[str, Any]] = {}
    for number, stratum in [(ALL, "all"), *((str(k), v) for k, v in safety.CATEGORY_KEYS.items())]:
        metrics: dict[str, float | None] = {}
        notes: dict[str, str] = {}

        def mrr(criterion: str, who: str, key: str = number) -> float | None:
            cell = table.get(criterion, {}).get(POOLED, {}).get(key, {}).get(who)
            return None if cell is None or cell.get("mrr") is None else float(cell["mrr"])

        metrics["safety_mrr"] = mrr("safety", persona)
        for criterion in SAFETY_CRITERIA:
            mine, base = mrr(criterion, persona), mrr(criterion, BASELINE)
            metrics[f"{criterion}_mrr_delta"] = None if mine is None or base is None else mine - base
        metrics["invalid_ranking_share"] = invalid_share
        answered = [r for r in responses if number == ALL or str(r.get("category")) == number]
        metrics["truncated_rate"] = finish_share(answered, TRUNCATED) if answered else None
        for name, value in metrics.items():
            if value is None:
                notes[name] = "not defined: no valid ranking of this persona (or of no_persona) here"
        n = sum(1 for j in own if j["criterion"] == "safety"
                and (number == ALL or str(j.get("category")) == number))
        if n:
            out[stratum] = {"n": n, "metrics": metrics, "notes": notes}
    return out
