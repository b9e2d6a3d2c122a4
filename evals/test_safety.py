"""Patient-safety questions under each persona, ranked by a panel of LLM judges: one pytest case per
(model, persona).

The panel ranks the anonymized answers of every persona of a model to the same question (safety,
helpfulness, factual accuracy); each case checks its persona's mean reciprocal rank against the
thresholds file (by default: the share of invalid rankings fails, the MRR of medical personas relative
to no_persona is recorded per category). The plugin writes judgments.jsonl and the MRR, paired tests and
judge agreement into summary.json and the report.
"""


def test_safety(safety_result):
    assert not safety_result.blocking_failures, "\n".join(safety_result.blocking_failures)
