"""The patient-safety task: response records, the pressure suffix, and the summary recomputed from the
judgment records (MRR, paired t-tests against scipy)."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from scipy import stats as scipy_stats

from persona_eval.cache import NullCache, ResultCache
from persona_eval.data import load_safety_queries
from persona_eval.judges import POOLED
from persona_eval.personas import STUDY_PERSONAS
from persona_eval.prompts import SystemPolicy
from persona_eval.runner import Runner
from persona_eval.safety_eval import evaluate_safety, judge_model_responses, responses_by_persona, safety_summary
from persona_eval.tasks import safety

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "safety" / "queries.jsonl"
PERSONAS = [p.id for p in STUDY_PERSONAS]
_RESPONSE = re.compile(r"Response (\d+):\n<<<\n(.*?)\n>>>", re.DOTALL)


@pytest.fixture(scope="module")
def queries() -> list[safety.SafetyQuery]:
    return load_safety_queries(FIXTURE)


def tagged_reply(prompt: str) -> str:
    """A scripted model whose answer names the system prompt it was given (for the judges to find)."""
    system = re.search(r"<system>(.*?)</system>", prompt)
    return f"[{system.group(1) if system else 'none'}] take care"


def test_records_of_one_condition(make_backend: Any, queries: list[safety.SafetyQuery]):
    backend = make_backend(tagged_reply)
    nurse = STUDY_PERSONAS[3]
    records = evaluate_safety(queries[:3], nurse, Runner(backend, NullCache()), run_id="run-1", model="m",
                              max_new_tokens=64)
    assert [r["query_id"] for r in records] == [q.id for q in queries[:3]]
    record = records[0]
    assert {"run_id", "task", "model", "persona", "persona_group", "query_id", "category", "system_prompt", "prompt",
            "response", "cached", "template_version"} <= set(record)
    assert (record["run_id"], record["task"], record["model"], record["persona"], record["persona_group"]) == \
        ("run-1", "safety", "m", "ed_nurse", "medical")
    assert record["category"] == queries[0].category and record["category_name"] == queries[0].category_name
    assert record["system_prompt"] == "You are an Emergency Department nurse."
    # the persona is the system message, the query verbatim is the whole user turn
    assert record["prompt"] == f"<system>{nurse.declaration}</system><user>{queries[0].content}</user>"
    assert record["response"] == f"[{nurse.declaration}] take care"
    assert record["reasoning"] is None and record["final_response"] == record["response"]
    assert record["template_version"] == "safety-v1" and record["pressure_suffix"] is None
    assert record["cached"] is False
    json.dumps(records, allow_nan=False)


def test_a_reasoning_reply_is_recorded_whole_with_its_trace_and_final_response_apart(
        make_backend: Any, queries: list[safety.SafetyQuery]):
    backend = make_backend(lambda prompt: "## Thinking\nIs it urgent?\n\n## Final Response\nSee a doctor today.")
    (record,) = evaluate_safety(queries[:1], STUDY_PERSONAS[3], Runner(backend, NullCache()), run_id="r", model="m",
                                max_new_tokens=64)
    assert record["response"] == "## Thinking\nIs it urgent?\n\n## Final Response\nSee a doctor today."
    assert (record["reasoning"], record["final_response"]) == ("Is it urgent?", "See a doctor today.")


def test_the_baseline_sends_an_empty_system_message_where_the_template_would_insert_one(
        make_backend: Any, queries: list[safety.SafetyQuery]):
    backend = make_backend(tagged_reply, policy=SystemPolicy(baseline_empty_system=True))
    record = evaluate_safety(queries[:1], STUDY_PERSONAS[0], Runner(backend, NullCache()), run_id="r", model="m",
                             max_new_tokens=8)[0]
    assert record["system_prompt"] == "" and record["prompt"] == f"<system></system><user>{queries[0].content}</user>"


def test_the_pressure_suffix_is_off_by_default_and_appended_when_given(make_backend: Any, tmp_path: Path,
                                                                       queries: list[safety.SafetyQuery]):
    cache = ResultCache(tmp_path / "cache.sqlite")
    backend = make_backend(tagged_reply)
    persona = STUDY_PERSONAS[2]
    plain = evaluate_safety(queries[:2], persona, Runner(backend, cache), run_id="r", model="m", max_new_tokens=8)
    pressed = evaluate_safety(queries[:2], persona, Runner(backend, cache), run_id="r", model="m", max_new_tokens=8,
                              pressure_suffix=safety.PRESSURE_SUFFIX)
    assert pressed[0]["prompt"].endswith(f"{queries[0].content}\n\n{safety.PRESSURE_SUFFIX}</user>")
    assert pressed[0]["pressure_suffix"] == safety.PRESSURE_SUFFIX and pressed[0]["query"] == queries[0].content
    assert not any(r["cached"] for r in pressed)  # a different prompt: never the cached plain answers
    again = evaluate_safety(queries[:2], persona, Runner(backend, cache), run_id="r", model="m", max_new_tokens=8)
    assert all(r["cached"] for r in again) and [r["response"] for r in again] == [r["response"] for r in plain]
    assert "access to" in safety.PRESSURE_SUFFIX and "brief" in safety.PRESSURE_SUFFIX
    assert safety.user_message(" Q? ", "  ") == "Q?"


# -- the whole task with scripted judges, and the summary recomputed from the records --------------------

def prefers_declaration(word: str) -> Callable[[str], str]:
    """A judge that ranks first the responses whose persona declaration contains `word`, others after,
    in shown order."""
    def reply(prompt: str) -> str:
        texts = [text for _, text in _RESPONSE.findall(prompt)]
        numbers = list(range(1, len(texts) + 1))
        best = [n for n, text in zip(numbers, texts, strict=True) if word in text.split("]")[0]]
        return json.dumps({"ranking": best + [n for n in numbers if n not in best]})
    return reply


def contrary(prompt: str) -> str:
    """A judge that reverses the shown order, and fails (twice) on the questions about vaccines."""
    texts = _RESPONSE.findall(prompt)
    if "vaccin" in prompt.split("Response 1:")[0].lower():
        return "I cannot rank these."
    return json.dumps({"ranking": list(range(len(texts), 0, -1))})


@pytest.fixture
def panel_run(make_backend: Any, queries: list[safety.SafetyQuery]) -> dict[str, Any]:
    model = Runner(make_backend(tagged_reply), NullCache())
    records = []
    for persona in STUDY_PERSONAS:
        records += evaluate_safety(queries, persona, model, run_id="r", model="m", max_new_tokens=32)
    judges = [("physician_fan", Runner(make_backend(prefers_declaration("physician"), name="j1"), NullCache())),
              ("contrary", Runner(make_backend(contrary, name="j2"), NullCache())),
              ("cautious_fan", Runner(make_backend(prefers_declaration("cautious"), name="j3"), NullCache()))]
    judgments = judge_model_responses(responses_by_persona(records, "m", PERSONAS), judges, ["safety", "helpfulness"],
                                      seed=0)
    return {"records": records, "judgments": judgments, "summary": safety_summary(records, judgments)}


def test_the_summary_is_plain_json_with_the_run_layout(panel_run: dict[str, Any]):
    summary = panel_run["summary"]
    json.dumps(summary, allow_nan=False)
    assert summary["personas"] == PERSONAS and summary["persona_groups"]["ed_nurse"] == "medical"
    assert summary["categories"] == {str(k): v for k, v in safety.CATEGORIES.items()}
    assert summary["judges"] == ["physician_fan", "contrary", "cautious_fan"]
    assert summary["criteria"] == ["safety", "helpfulness"]
    assert summary["templates"]["safety"]["version"] == "judge-safety-v1"
    assert summary["responses"]["m"]["ed_nurse"] == {"n": 60, "truncated": 0, "cached": 0}
    assert summary["n_judgments"] == 3 * 2 * 60
    assert list(summary["mrr"]["m"]["safety"]) == ["physician_fan", "contrary", "cautious_fan", POOLED]
    assert list(summary["mrr"]["m"]["safety"][POOLED]) == ["all", "1", "2", "3", "4", "5"]


def test_mrr_recomputed_from_the_judgment_records_equals_the_summary(panel_run: dict[str, Any]):
    judgments = json.loads(json.dumps(panel_run["judgments"]))  # as read back from judgments.jsonl
    values: dict[tuple[str, str, str, str], list[float]] = defaultdict(list)
    for j in judgments:
        if not j["valid"]:
            continue
        for rank, persona in enumerate(j["ranking"], start=1):
            for judge in (j["judge"], POOLED):
                for category in (str(j["category"]), "all"):
                    values[(j["criterion"], judge, category, persona)].append(1 / rank)
    mrr = panel_run["summary"]["mrr"]["m"]
    seen = 0
    for (criterion, judge, category, persona), ranks in values.items():
        cell = mrr[criterion][judge][category][persona]
        assert cell["n"] == len(ranks)
        assert cell["mrr"] == pytest.approx(sum(ranks) / len(ranks), rel=1e-12)
        seen += 1
    assert seen == sum(len(cells) for judges in mrr.values() for categories in judges.values()
                       for cells in categories.values())
    assert mrr["safety"]["physician_fan"]["all"]["no_persona"]["mrr"] < 0.5 < \
        mrr["safety"]["physician_fan"]["all"]["ed_physician"]["mrr"]


def test_invalid_rankings_are_counted_and_excluded(panel_run: dict[str, Any]):
    invalid = [j for j in panel_run["judgments"] if not j["valid"]]
    assert invalid and all(j["judge"] == "contrary" and j["attempts"] == 2 and j["ranking"] == [] for j in invalid)
    counts = panel_run["summary"]["invalid"]
    assert counts["contrary"]["invalid"] == len(invalid) and counts["physician_fan"]["invalid"] == 0
    assert counts["contrary"]["share"] == pytest.approx(len(invalid) / 120)
    agreement = panel_run["summary"]["agreement"]["m"]["safety"]["all"]
    assert agreement["n_all_valid"] == 60 - len(invalid) // 2


def test_paired_t_in_the_summary_matches_scipy(panel_run: dict[str, Any]):
    by_query: dict[str, dict[str, float]] = {}
    for j in panel_run["judgments"]:
        if j["judge"] == "cautious_fan" and j["criterion"] == "safety" and j["category"] == 3:
            by_query[j["query_id"]] = {p: 1 / (j["ranking"].index(p) + 1) for p in PERSONAS}
    queries = sorted(by_query)
    tests = panel_run["summary"]["tests"]["m"]["safety"]["cautious_fan"]["3"]
    for baseline in ("no_persona", "helpful_assistant"):
        for persona, entry in tests[baseline].items():
            expected = scipy_stats.ttest_rel([by_query[q][persona] for q in queries],
                                             [by_query[q][baseline] for q in queries])
            if math.isfinite(expected.statistic):
                assert entry["statistic"] == pytest.approx(expected.statistic, rel=1e-9)
                assert entry["pvalue"] == pytest.approx(expected.pvalue, rel=1e-9)
    cautious = tests["no_persona"]["ed_physician_cautious"]
    assert cautious["mean_difference"] > 0 and cautious["pvalue_holm"] < 0.001 and cautious["n"] == 12
