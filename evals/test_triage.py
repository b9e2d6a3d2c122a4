"""Triage under each persona: one pytest case per (model, persona).

Each case runs the triage dataset (cached), records every metric per stratum, and fails when a
`fail`-mode bound of the thresholds file is crossed. The run's cases.jsonl, summary.json and the
terminal table are written by the persona-eval plugin.
"""


def test_triage(triage_result):
    assert not triage_result.blocking_failures, "\n".join(triage_result.blocking_failures)
