"""The judge panel with scripted judges: anonymized balanced presentation, ranking parsing, retries,
caching, and the aggregation (MRR, paired t-tests, agreement, invalid shares) against references."""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.inter_rater import aggregate_raters
from statsmodels.stats.inter_rater import fleiss_kappa as sm_fleiss_kappa

from persona_eval.backends import ModelSpec
from persona_eval.backends.base import GenerationConfig, LabelScoring
from persona_eval.cache import NullCache, ResultCache
from persona_eval.errors import ConfigError, DataError
from persona_eval.judges import (
    CRITERIA,
    POOLED,
    agreement_summary,
    invalid_summary,
    judge_items,
    judge_model_responses,
    judge_template,
    mrr_table,
    paired_tests,
    parse_judge_specs,
    parse_ranking,
    presentation_orders,
    render_judge_prompt,
    williams_rows,
)
from persona_eval.personas import STUDY_PERSONAS
from persona_eval.runner import Runner

PERSONAS = [p.id for p in STUDY_PERSONAS]
_RESPONSE = re.compile(r"Response (\d+):\n<<<\n(.*?)\n>>>", re.DOTALL)


def shown(prompt: str) -> list[str]:
    """The response texts of a judge prompt, in the order shown."""
    return [text for _, text in _RESPONSE.findall(prompt)]


def first_position(prompt: str) -> str:
    """A judge that ranks the responses in the order shown: pure position bias."""
    return json.dumps({"ranking": list(range(1, len(shown(prompt)) + 1))})


def prefers(persona: str) -> Callable[[str], str]:
    """A judge that puts the response written by `persona` first and keeps the others in shown order."""
    def reply(prompt: str) -> str:
        texts = shown(prompt)
        numbers = list(range(1, len(texts) + 1))
        best = next(n for n, text in zip(numbers, texts, strict=True) if text.startswith(f"[{persona}]"))
        return json.dumps({"ranking": [best] + [n for n in numbers if n != best]})
    return reply


def responses(n_queries: int = 12, categories: Sequence[int] = (1, 2, 3, 4, 5), personas: Sequence[str] = PERSONAS,
              model: str = "m") -> dict[str, list[dict[str, Any]]]:
    """Response records of every persona: the text starts with a tag naming the persona (so scripted
    judges can find it; a real response carries no such tag)."""
    return {persona: [{"run_id": "run", "task": "safety", "model": model, "persona": persona,
                       "query_id": f"q{c}-{i}", "category": c, "query": f"Question {c}-{i}?",
                       "response": f"[{persona}] answer to {c}-{i}"}
                      for c in categories for i in range(n_queries)]
            for persona in personas}


@pytest.fixture
def runner(make_backend: Any) -> Callable[..., Runner]:
    """runner(reply, **backend options): a scripted judge behind an uncached runner."""
    def build(reply: Callable[[str], str], **kwargs: Any) -> Runner:
        return Runner(make_backend(reply, **kwargs), NullCache())
    return build


# -- ranking parsing -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "k", "expected"), [
    ('{"ranking": [3, 1, 2]}', 3, [3, 1, 2]),
    ('  {"ranking":[2,1]}\n', 2, [2, 1]),
    ('Here you go:\n```json\n{"ranking": [1, 2]}\n```', 2, [1, 2]),
    ('My ranking is {"ranking": [2, 1]} as asked.', 2, [2, 1]),
    ('{"ranking": [1, 2, 2]}', 3, None),            # repeated
    ('{"ranking": [1, 2]}', 3, None),               # incomplete
    ('{"ranking": [1, 2, 4]}', 3, None),            # out of range
    ('{"ranking": [0, 1, 2]}', 3, None),
    ('{"ranking": [1.0, 2, 3]}', 3, None),          # not integers
    ('{"ranking": [true, 2]}', 2, None),
    ('{"ranking": ["1", "2"]}', 2, None),
    ('{"order": [1, 2]}', 2, None),
    ('[1, 2]', 2, None),
    ('Response 2 is best, then 1.', 2, None),
    ('{"ranking": [1, 2]} {"ranking": [2, 1]}', 2, None),  # two objects: ambiguous
    ('', 2, None),
])
def test_parse_ranking(text: str, k: int, expected: list[int] | None):
    assert parse_ranking(text, k) == expected


# -- the presentation order ------------------------------------------------------------------------------

@pytest.mark.parametrize("k", range(1, 10))
def test_williams_rows_are_latin_squares_balanced_for_neighbours(k: int):
    rows = williams_rows(k)
    assert len(rows) == (2 * k if k % 2 and k > 1 else k)
    for block in range(0, len(rows), k):
        square = rows[block:block + k]
        assert all(sorted(row) == list(range(k)) for row in square)
        assert all(sorted(column) == list(range(k)) for column in zip(*square, strict=True))
    neighbours = Counter((row[i], row[i + 1]) for row in rows for i in range(k - 1))
    assert set(neighbours.values()) <= {len(rows) // k}  # each ordered pair of neighbours equally often
    assert len(neighbours) == k * (k - 1)


def test_presentation_orders_are_balanced_and_deterministic():
    queries = [f"q{i}" for i in range(18)]
    orders = presentation_orders(queries, PERSONAS, seed=7, key=("m", "j", "safety"))
    positions = Counter((persona, order.index(persona)) for order in orders.values() for persona in order)
    assert set(positions.values()) == {3}  # 18 queries, 6 personas: each persona 3 times in each position
    assert presentation_orders(list(reversed(queries)), PERSONAS, seed=7, key=("m", "j", "safety")) == orders
    for other in ({"seed": 8, "key": ("m", "j", "safety")}, {"seed": 7, "key": ("m", "j2", "safety")},
                  {"seed": 7, "key": ("m", "j", "helpfulness")}):
        assert presentation_orders(queries, PERSONAS, **other) != orders


# -- the prompt ------------------------------------------------------------------------------------------

def test_the_prompt_shows_the_responses_anonymized_in_order_and_the_retry_differs():
    prompt = render_judge_prompt("helpfulness", "Can I stop my tablets?", ["Text A", "Text B", "Text C"])
    assert shown(prompt) == ["Text A", "Text B", "Text C"]
    assert "Patient's message:\n<<<\nCan I stop my tablets?\n>>>" in prompt
    assert "Rank all 3 responses by helpfulness" in prompt and '{"ranking": [3, 2, 1]}' in prompt
    retry = render_judge_prompt("helpfulness", "Can I stop my tablets?", ["Text A", "Text B", "Text C"], attempt=2)
    assert retry.startswith(prompt) and retry != prompt and "previous reply was not a valid ranking" in retry
    with pytest.raises(ValueError, match="at least 2 responses"):
        render_judge_prompt("safety", "q", ["only one"])
    with pytest.raises(ConfigError, match="unknown judging criterion 'harm'"):
        render_judge_prompt("harm", "q", ["a", "b"])


@pytest.mark.parametrize("criterion", list(CRITERIA))
def test_every_criterion_has_a_versioned_template(criterion: str):
    spec = CRITERIA[criterion]
    assert spec.template_version == f"judge-{criterion}-v1"
    template = judge_template(criterion)
    assert "{question}" in template and "{k}" in template and "{response_1}" in template


def test_judge_prompts_hide_personas_and_models(make_backend: Any):
    backend = make_backend(first_position)
    records = responses(n_queries=2)
    for rows in records.values():
        for row in rows:
            row["response"] = "a neutral answer"
    judge_model_responses(records, [("j", Runner(backend, NullCache()))], ["safety"], seed=0)
    for prompt in backend.prompts_asked():
        assert not any(p.id in prompt for p in STUDY_PERSONAS)
        assert not any(p.declaration and p.declaration in prompt for p in STUDY_PERSONAS)
        assert "<system></system><user>" in prompt or prompt.startswith("<user>")


# -- the panel -------------------------------------------------------------------------------------------

def test_a_first_position_judge_gives_every_persona_the_same_mrr(runner: Callable[..., Runner]):
    judgments = judge_model_responses(responses(), [("j1", runner(first_position)), ("j2", runner(first_position))],
                                      ["safety", "helpfulness"], seed=3)
    assert len(judgments) == 2 * 2 * 60 and all(j["valid"] for j in judgments)
    table = mrr_table(judgments)
    cells = [cell for criteria in table.values() for judges in criteria.values() for categories in judges.values()
             for cell in categories.values()]
    assert len(cells) == 2 * 3 * 6  # criteria x (j1, j2, pooled) x (all + 5 categories)
    for cell in cells:
        values = {entry["mrr"] for entry in cell.values()}
        assert len(values) == 1, cell  # exactly equal: each persona in each position equally often
        assert values.pop() == pytest.approx(sum(1 / r for r in range(1, 7)) / 6)
    for family in paired_tests(judgments)["m"]["safety"][POOLED]["all"].values():
        assert all(entry["mean_difference"] == pytest.approx(0, abs=1e-12) for entry in family.values())


def _leftover_bound(n: int, k: int = 6) -> float:
    """The largest MRR gap a first-position judge can leave: only the last n mod k queries are unbalanced,
    each persona in distinct positions there."""
    leftover = n % k
    reciprocal = [1 / r for r in range(1, k + 1)]
    return (sum(reciprocal[:leftover]) - sum(reciprocal[k - leftover:])) / n


@pytest.mark.parametrize("seed", range(3))
def test_position_bias_stays_small_when_a_category_is_not_a_multiple_of_k(seed: int, runner: Callable[..., Runner]):
    judgments = judge_model_responses(responses(n_queries=10), [("j", runner(first_position))], ["safety"],
                                      seed=seed)
    for category, cell in mrr_table(judgments)["m"]["safety"]["j"].items():
        values = [entry["mrr"] for entry in cell.values()]
        bound = _leftover_bound(50 if category == "all" else 10)
        assert max(values) - min(values) <= bound + 1e-12
    assert _leftover_bound(50) < 0.025  # over all queries the running counter leaves 2 of 50 unbalanced


def test_rankings_map_back_to_personas_whatever_the_order_shown(runner: Callable[..., Runner]):
    judgments = judge_model_responses(responses(n_queries=6), [("j", runner(prefers("ed_nurse")))],
                                      ["safety"], seed=1)
    assert {tuple(j["order_shown"]) for j in judgments} != {tuple(PERSONAS)}
    for judgment in judgments:
        assert judgment["ranking"][0] == "ed_nurse"
        assert sorted(judgment["ranking"]) == sorted(PERSONAS)
        numbers = json.loads(judgment["raw_output"])["ranking"]
        assert judgment["ranking"] == [judgment["order_shown"][n - 1] for n in numbers]
    table = mrr_table(judgments)["m"]["safety"]["j"]["all"]
    assert table["ed_nurse"] == {"mrr": 1.0, "n": 30}
    test = paired_tests(judgments)["m"]["safety"]["j"]["all"]["no_persona"]["ed_nurse"]
    assert test["mean_difference"] > 0 and test["pvalue_holm"] < 0.001


def test_the_record_has_every_field(runner: Callable[..., Runner]):
    judgments = judge_model_responses(responses(n_queries=1, categories=(2,)), [("j", runner(first_position))],
                                      ["factual_accuracy"], seed=5)
    record = judgments[0]
    assert {"model", "judge", "criterion", "query_id", "category", "ranking", "valid", "raw_output", "order_shown",
            "attempts", "template_version"} <= set(record)
    assert record["model"] == "m" and record["judge"] == "j" and record["criterion"] == "factual_accuracy"
    assert record["query_id"] == "q2-0" and record["category"] == 2 and record["question"] == "Question 2-0?"
    assert record["template_version"] == "judge-factual_accuracy-v1" and record["attempts"] == 1
    assert record["ranking"] == record["order_shown"] and record["valid"] is True
    json.dumps(record, allow_nan=False)


def test_judges_ask_for_constrained_rankings_of_k(make_backend: Any):
    class ConfigRecordingBackend(make_backend):  # type: ignore[misc, valid-type]
        def generate(self, requests: Sequence[Any], config: GenerationConfig, scoring: LabelScoring | None) -> Any:
            self.configs = [*getattr(self, "configs", []), config]
            return super().generate(requests, config, scoring)

    backend = ConfigRecordingBackend(first_position)
    judge_model_responses(responses(n_queries=1, personas=PERSONAS[:4]), [("j", Runner(backend, NullCache()))],
                          ["safety"], seed=0, max_new_tokens=40)
    assert set(backend.configs) == {GenerationConfig(max_new_tokens=40, constrained_ranking=4)}


def test_an_invalid_ranking_is_retried_once_then_recorded_invalid(make_backend: Any):
    def reply(prompt: str) -> str:
        if "Question 1-0?" in prompt:
            return "Response 1 is the best."                      # invalid twice
        if "Question 1-1?" in prompt and "previous reply" not in prompt:
            return '{"ranking": [1, 1, 2, 3, 4, 5]}'               # invalid, then valid on retry
        return first_position(prompt)

    backend = make_backend(reply)
    judgments = judge_model_responses(responses(n_queries=3, categories=(1,)), [("j", Runner(backend, NullCache()))],
                                      ["safety"], seed=0)
    by_query = {j["query_id"]: j for j in judgments}
    never = by_query["q1-0"]
    assert never["valid"] is False and never["ranking"] == [] and never["attempts"] == 2
    assert never["raw_outputs"] == ["Response 1 is the best."] * 2
    retried = by_query["q1-1"]
    assert retried["valid"] is True and retried["attempts"] == 2 and retried["ranking"] == retried["order_shown"]
    assert by_query["q1-2"]["attempts"] == 1
    asked = backend.prompts_asked()
    assert len(asked) == 3 + 2 and len(set(asked)) == 5  # the retries are different prompts
    assert mrr_table(judgments)["m"]["safety"]["j"]["all"]["no_persona"]["n"] == 2  # the invalid one is left out
    counts = invalid_summary(judgments)["j"]
    assert (counts["judgments"], counts["invalid"], counts["retried"]) == (3, 1, 2)
    assert counts["share"] == pytest.approx(1 / 3)
    assert counts["by_model"]["m"]["safety"]["invalid"] == 1


def test_judge_calls_are_cached(tmp_path, make_backend: Any):
    cache = ResultCache(tmp_path / "cache.sqlite")
    first = make_backend(first_position, name="judge")
    records = responses(n_queries=2, categories=(1,))
    before = judge_model_responses(records, [("j", Runner(first, cache))], ["safety", "helpfulness"], seed=0)
    again = make_backend(first_position, name="judge")
    after = judge_model_responses(records, [("j", Runner(again, cache))], ["safety", "helpfulness"], seed=0)
    assert again.calls == [] and all(j["cached"] for j in after)
    assert [{k: v for k, v in j.items() if k != "cached"} for j in after] == \
        [{k: v for k, v in j.items() if k != "cached"} for j in before]


def test_judge_items_need_two_personas_one_model_and_read_triage_records():
    with pytest.raises(DataError, match="at least 2 personas"):
        judge_items(responses(personas=["no_persona"]))
    mixed = responses(n_queries=1, categories=(1,))
    mixed["ed_nurse"] = [dict(mixed["ed_nurse"][0], model="other")]
    with pytest.raises(DataError, match="one model at a time"):
        judge_items(mixed)
    triage = {p: [{"model": "m", "task": "triage", "case_id": "em-001", "stratum": "emergency",
                   "generated_text": f"Answer: C ({p})"}, {"model": "m", "task": "triage", "case_id": "pc-001",
                                                           "stratum": "primary_care", "generated_text": "Answer: A"}]
              for p in PERSONAS[:3]}
    triage["ed_physician"] = triage["ed_physician"][:1]  # pc-001 not answered under every persona: not judged
    items = judge_items(triage, questions={"em-001": "Chest pain.", "pc-001": "Cough."})
    assert [(i.query_id, i.category, i.task, i.question) for i in items] == [("em-001", "emergency", "triage",
                                                                               "Chest pain.")]
    assert items[0].responses["helpful_assistant"] == "Answer: C (helpful_assistant)"
    with pytest.raises(DataError, match="no question text"):
        judge_items(triage)


def test_judge_names_must_be_unique_and_not_pooled(runner: Callable[..., Runner]):
    with pytest.raises(ConfigError, match="unique"):
        judge_model_responses(responses(n_queries=1), [("j", runner(first_position))] * 2, ["safety"], seed=0)
    with pytest.raises(ConfigError, match="unique"):
        judge_model_responses(responses(n_queries=1), [(POOLED, runner(first_position))], ["safety"], seed=0)


def test_parse_judge_specs():
    judges = parse_judge_specs(["smollm2", "big=openai:llama-70b@http://gpu:8000/v1", "hf:/models/qwen"])
    assert [(j.name, j.model.backend) for j in judges] == [("smollm2", "embedded"), ("big", "openai"),
                                                           ("qwen", "hf")]
    assert judges[1].model == ModelSpec("llama-70b", "openai", {"model": "llama-70b",
                                                                "base_url": "http://gpu:8000/v1"})
    with pytest.raises(ConfigError, match="already in the panel"):
        parse_judge_specs(["smollm2", "smollm2"])
    with pytest.raises(ConfigError, match="reserved"):
        parse_judge_specs(["pooled=smollm2"])


# -- aggregation against references ----------------------------------------------------------------------

def judgment(judge: str, query: str, ranking: Sequence[str], *, category: int = 1, valid: bool = True,
             criterion: str = "safety") -> dict[str, Any]:
    return {"model": "m", "judge": judge, "criterion": criterion, "query_id": query, "category": category,
            "ranking": list(ranking) if valid else [], "valid": valid, "attempts": 1 if valid else 2}


def random_judgments(seed: int, judges: Sequence[str] = ("a", "b", "c"), n: int = 20) -> list[dict[str, Any]]:
    import random

    rng = random.Random(seed)
    out = []
    for q in range(n):
        for judge in judges:
            order = list(PERSONAS)
            rng.shuffle(order)
            out.append(judgment(judge, f"q{q}", order, category=1 + q % 2, valid=rng.random() > 0.1))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_paired_t_matches_scipy_and_holm_adjusts_each_family(seed: int):
    judgments = random_judgments(seed)
    tests = paired_tests(judgments)["m"]["safety"]
    for judge in ("a", "b", "c", POOLED):
        for category in ("all", "1", "2"):
            members = [j for j in judgments if j["valid"] and (judge == POOLED or j["judge"] == judge)
                       and (category == "all" or str(j["category"]) == category)]
            per_query: dict[str, list[dict[str, float]]] = {}
            for j in members:
                per_query.setdefault(j["query_id"], []).append({p: 1 / (j["ranking"].index(p) + 1) for p in PERSONAS})
            queries = sorted(per_query)

            def mean_rr(q: str, persona: str, per_query: dict[str, list[dict[str, float]]] = per_query) -> float:
                return sum(r[persona] for r in per_query[q]) / len(per_query[q])

            for baseline in ("no_persona", "helpful_assistant"):
                family = tests[judge][category][baseline]
                assert set(family) == set(PERSONAS) - {baseline}
                for persona, entry in family.items():
                    expected = scipy_stats.ttest_rel([mean_rr(q, persona) for q in queries],
                                                     [mean_rr(q, baseline) for q in queries])
                    assert entry["statistic"] == pytest.approx(expected.statistic, rel=1e-9)
                    assert entry["pvalue"] == pytest.approx(expected.pvalue, rel=1e-9)
                    assert entry["n"] == len(queries)
                pvalues = sorted(e["pvalue"] for e in family.values())
                m = len(pvalues)
                holm_expected = []
                running = 0.0
                for i, p in enumerate(pvalues):
                    running = max(running, min(1.0, (m - i) * p))
                    holm_expected.append(running)
                assert sorted(e["pvalue_holm"] for e in family.values()) == pytest.approx(holm_expected)
                for entry in family.values():
                    assert entry["significant"] is (entry["pvalue_holm"] < 0.05)


def test_significance_is_decided_with_the_tests_at_the_level_given():
    judgments = random_judgments(0)
    strict = paired_tests(judgments, alpha=1e-12)["m"]["safety"][POOLED]["all"]["no_persona"]
    loose = paired_tests(judgments, alpha=1.0 + 1e-9)["m"]["safety"][POOLED]["all"]["no_persona"]
    assert all(entry["significant"] is False for entry in strict.values())
    assert all(entry["significant"] is True for entry in loose.values())


def test_agreement_matches_sklearn_and_statsmodels():
    judgments = random_judgments(11, n=40)
    block = agreement_summary(judgments)["m"]["safety"]["all"]
    complete = sorted({j["query_id"] for j in judgments}
                      - {j["query_id"] for j in judgments if not j["valid"]})
    tops = {(j["judge"], j["query_id"]): j["ranking"][0] for j in judgments if j["valid"]}
    assert block["n_judges"] == 3 and block["n_queries"] == 40 and block["n_all_valid"] == len(complete)
    rows = [[tops[(judge, q)] for judge in "abc"] for q in complete]
    majority = sum(max(Counter(row).values()) >= 2 for row in rows) / len(rows)
    assert block["majority_agreement"] == pytest.approx(majority)
    assert block["unanimous"] == pytest.approx(sum(len(set(row)) == 1 for row in rows) / len(rows))
    for entry, (x, y) in zip(block["pairwise_kappa"], itertools.combinations(range(3), 2), strict=True):
        assert entry["judges"] == ["abc"[x], "abc"[y]]
        expected = cohen_kappa_score([row[x] for row in rows], [row[y] for row in rows])
        assert entry["kappa"] == pytest.approx(expected)
    table, _ = aggregate_raters([[PERSONAS.index(p) for p in row] for row in rows])
    assert block["fleiss_kappa"]["kappa"] == pytest.approx(sm_fleiss_kappa(table, method="fleiss"))


def test_agreement_with_one_judge_or_no_complete_query_says_why():
    one = agreement_summary([judgment("a", "q1", PERSONAS)])["m"]["safety"]["all"]
    assert one["majority_agreement"] is None and one["pairwise_kappa"] == [] and "one judge" in one["note"]
    broken = agreement_summary([judgment("a", "q1", PERSONAS), judgment("b", "q1", PERSONAS, valid=False)])
    assert "no query was ranked validly by every judge" in broken["m"]["safety"]["all"]["note"]


def test_mrr_definition_on_a_hand_example():
    judgments = [judgment("a", "q1", ["x", "y", "z"]), judgment("a", "q2", ["y", "x", "z"]),
                 judgment("b", "q1", ["z", "y", "x"]), judgment("b", "q2", [], valid=False)]
    table = mrr_table(judgments, personas=["z", "y", "x"])["m"]["safety"]
    assert table["a"]["all"] == {"z": {"mrr": 1 / 3, "n": 2}, "y": {"mrr": 0.75, "n": 2}, "x": {"mrr": 0.75, "n": 2}}
    assert list(table) == ["a", "b", POOLED]
    assert table[POOLED]["all"]["z"] == {"mrr": pytest.approx((1 / 3 + 1 / 3 + 1) / 3), "n": 3}
    assert table["b"]["1"]["x"] == {"mrr": 1 / 3, "n": 1}
    assert not any(math.isnan(e["mrr"]) for e in table[POOLED]["all"].values())


def test_strata_are_balanced_one_by_one_and_together():
    strata = {f"q{c}-{i}": c for c in (1, 2, 3) for i in range(12)}
    orders = presentation_orders(list(strata), PERSONAS, seed=2, key=("m", "j", "safety"), strata=strata)
    for stratum in (1, 2, 3):
        positions = Counter((p, order.index(p)) for q, order in orders.items() if strata[q] == stratum
                            for p in order)
        assert set(positions.values()) == {2}


def test_a_perfectly_consistent_shift_is_written_as_json_null_not_infinity():
    judgments = [judgment("a", f"q{i}", ["ed_nurse", "no_persona", *PERSONAS[1:3]]) for i in range(4)]
    entry = paired_tests(judgments)["m"]["safety"]["a"]["all"]["no_persona"]["ed_nurse"]
    assert entry["statistic"] is None and entry["pvalue"] == 0.0 and entry["mean_difference"] == 0.5
    json.dumps(entry, allow_nan=False)


def test_module_doctests_pass():
    import doctest

    import persona_eval.judges as judges_module
    import persona_eval.tasks.safety as safety_module

    for module in (judges_module, safety_module):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_more_personas_than_one_digit_can_number_are_refused(runner: Callable[..., Runner]):
    many = responses(n_queries=1, categories=(1,), personas=[f"p{i}" for i in range(10)])
    with pytest.raises(ConfigError, match="at most 9 personas"):
        judge_model_responses(many, [("j", runner(first_position))], ["safety"], seed=0)


# -- reasoning traces: the safety panel sees final responses, the justification judge the reasoning -----------

TRACE = "<think>Secret draft: maybe the patient can double the dose.</think>\n\n"


def test_safety_judges_see_the_final_response_only(make_backend: Any):
    backend = make_backend(first_position)
    records = responses(n_queries=2)
    for rows in records.values():
        for row in rows:
            row["response"] = TRACE + row["response"]  # a record written without reasoning / final_response
    judge_model_responses(records, [("j", Runner(backend, NullCache()))], ["safety", "helpfulness"], seed=0)
    prompts = backend.prompts_asked()
    assert prompts and all("Secret draft" not in prompt and "think>" not in prompt for prompt in prompts)
    assert all(text.startswith("[") for prompt in prompts for text in shown(prompt))


def test_the_justification_judge_sees_the_trace_and_then_the_final_response(make_backend: Any):
    backend = make_backend(first_position)
    triage = {p: [{"model": "m", "task": "triage", "case_id": "em-001", "stratum": "emergency",
                   "generated_text": f"## Thinking\nChest pain ({p}).\n\n## Final Response\nC",
                   "reasoning": f"Chest pain ({p}).", "final_response": "C"},
                  {"model": "m", "task": "triage", "case_id": "pc-001", "stratum": "primary_care",
                   "generated_text": "Answer: A", "reasoning": None, "final_response": "Answer: A"}]
              for p in PERSONAS[:3]}
    judge_model_responses(triage, [("j", Runner(backend, NullCache()))], ["justification"], seed=0,
                          questions={"em-001": "Chest pain.", "pc-001": "Cough."})
    prompts = {("em-001" if "Chest pain (" in prompt else "pc-001"): prompt for prompt in backend.prompts_asked()}
    traced = shown(prompts["em-001"])
    assert len(traced) == 3 and all(text.startswith("Reasoning:\nChest pain (") and text.endswith(
        "\n\nFinal response:\nC") for text in traced)
    assert shown(prompts["pc-001"]) == ["Answer: A"] * 3  # no trace: the reply as it is


def test_what_each_criterion_is_shown_of_a_reply():
    finished, cut = PERSONAS[0], PERSONAS[1]
    item = judge_items({p: [{"model": "m", "task": "safety", "query_id": "q", "query": "Q?",
                             "response": "<think>draft" + (" done</think>Final." if p != cut else "")}]
                        for p in PERSONAS[:3]})[0]
    assert item.shown(finished, "safety") == "Final."
    assert item.reasoning[finished] == "draft done"
    assert item.shown(cut, "safety") == ""  # cut inside its trace: no final response
    assert item.shown(cut, "justification") == ("Reasoning:\ndraft\n\nFinal response:\n"
                                                "(none: the reasoning did not finish)")
    assert CRITERIA["justification"].reads_reasoning and not CRITERIA["safety"].reads_reasoning
