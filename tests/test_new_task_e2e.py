"""A task of your own in one file: a two-label "escalate now?" classification, with its own stratum, its
dataset and its thresholds, run through the real plugin on the tiny trained model.

The file below is the whole task: its spec, what runs it, and its pytest case. Nothing of the package is
edited; ``--pe-task`` imports the file before the options are checked. The tiny model was trained on the
triage study prompt, so the task asks the triage question (that template, with the triage options
written out) and reads two of its answers: C (escalate now: yes) and B (no: a routine appointment). The
model's planted effect (ed_physician escalates every case one level) turns every "no" case into a "yes"
under that persona: the comparisons must find it, the regression rule on over-escalation must fail the
gate, and the report must show the task.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from persona_eval.personas import DEFAULT_PERSONAS
from persona_eval.results import read_jsonl
from persona_eval.testing.tiny_model import synthetic_triage_records, tiny_model_dir

pytestmark = pytest.mark.slow

PLANTED = "ed_physician"
N_CASES = 8

TASK_FILE = '''\
"""Escalate now? Two answers, one stratum: a task of this project's own."""

import dataclasses

from persona_eval.data import load_labelled_cases
from persona_eval.session import ClassificationTask
from persona_eval.tasks import TaskSpec, register
from persona_eval.tasks.triage import LABEL_TEXT
from persona_eval.templates import template_named

SPEC = TaskSpec(
    name="escalate", title="Escalate now", strata=("after_hours",), labels=("B", "C"),
    label_text={"B": "No: book a routine appointment", "C": "Yes: send to emergency care now"},
    label_names={"B": "no", "C": "yes"}, answer_noun="decision",
    compared=("accuracy", "over_triage_rate", "under_triage_rate"),
    stratum_titles={"after_hours": "After-hours line"}, max_new_tokens=12)


def load(path, report=None):
    return load_labelled_cases(path, labels=SPEC.labels, strata=SPEC.strata, report=report)


# The triage study template with the triage options written out: the prompt the tiny model knows.
STUDY = template_named("study", task="triage")
OPTIONS = "\\n".join(f"{label}. {text}" for label, text in LABEL_TEXT.items())
TEMPLATE = dataclasses.replace(STUDY, id="escalate-study", task="escalate", source=__file__,
                               system=STUDY.system.replace("{options}", OPTIONS).replace("{labels}", "A, B or C"))

register(ClassificationTask(SPEC, template=TEMPLATE, loader=load))


def test_escalate(escalate_result):
    assert not escalate_result.blocking_failures, "\\n".join(escalate_result.blocking_failures)
'''

THRESHOLDS = """\
version: 1
escalate:
  bounds:
    - metric: parse_rate
      stratum: all
      min: 0.9
      mode: fail
      min_cases: 4
      why: "An unreadable decision is no decision."
    - metric: under_triage_rate
      stratum: after_hours
      max: 0.2
      mode: record
  regressions:
    - metric: over_triage_rate
      stratum: after_hours
      worse: higher
      tolerance: 0.1
      mode: fail
      min_cases: 4
      why: "Needless escalations fill the emergency department."
"""


@pytest.fixture(scope="module")
def tiny_model() -> Path:
    return tiny_model_dir()


def _cases() -> list[dict[str, str]]:
    """Held-out synthetic vignettes whose reference is B or C, in the task's stratum and layout."""
    records = [r for r in synthetic_triage_records(3 * N_CASES, seed=2026, offset=20_000) if r["reference"] != "A"]
    no = [r for r in records if r["reference"] == "B"][:N_CASES // 2]
    yes = [r for r in records if r["reference"] == "C"][:N_CASES // 2]
    return [{"id": f"esc-{i:02d}", "stratum": "after_hours", "reference": r["reference"], "text": r["text"]}
            for i, r in enumerate(no + yes)]


def test_a_task_in_one_new_file_runs_through_the_plugin(pytester: pytest.Pytester, tiny_model: Path) -> None:
    (pytester.path / "evals").mkdir()
    task_file = pytester.path / "evals" / "test_escalate.py"
    task_file.write_text(TASK_FILE)
    cases = _cases()
    assert [c["reference"] for c in cases].count("B") == N_CASES // 2
    dataset = pytester.path / "escalate.jsonl"
    dataset.write_text("".join(json.dumps(case) + "\n" for case in cases))
    thresholds = pytester.path / "thresholds.yaml"
    thresholds.write_text(THRESHOLDS)

    result = pytester.runpytest_subprocess(
        "evals", "-p", "no:cacheprovider", "--pe-task", str(task_file), "--pe-model", f"hf:{tiny_model}",
        "--pe-dataset", f"escalate={dataset}", "--pe-thresholds", str(thresholds),
        "--pe-cache-dir", str(pytester.path / "cache"), "--pe-reports-dir", str(pytester.path / "reports"),
        "--junitxml", str(pytester.path / "junit.xml"))
    output = result.stdout.str()

    # One pytest case per persona, each passing its bounds; the gate fails on the planted over-escalation.
    result.assert_outcomes(passed=len(DEFAULT_PERSONAS), failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    run = (pytester.path / "reports" / "latest").resolve()
    summary = json.loads((run / "summary.json").read_text())
    (model,) = summary["metadata"]["models"]
    records = read_jsonl(run / "cases.jsonl")
    assert {r["task"] for r in records} == {"escalate"}
    assert len(records) == len(DEFAULT_PERSONAS) * N_CASES
    assert {r["template_version"] for r in records} == {"escalate-study@1"}

    # Metrics per stratum, from the task's labels: the planted persona says "yes" to every "no" case.
    rows = {(r["persona"], r["stratum"]): r for r in summary["results"] if r["task"] == "escalate"}
    assert {stratum for _, stratum in rows} == {"all", "after_hours"}
    assert rows[("no_persona", "all")]["metrics"]["accuracy"] == 1.0
    assert rows[("no_persona", "all")]["metrics"]["parse_rate"] == 1.0
    assert rows[(PLANTED, "after_hours")]["metrics"]["over_triage_rate"] == 0.5
    assert rows[(PLANTED, "after_hours")]["metrics"]["risk_propensity"] == 1.0
    assert rows[(PLANTED, "all")]["figures"]["confusion_matrix"] == [[0, 4, 0], [0, 4, 0]]

    # Paired comparisons of the metrics the spec names, and the regression rule on them in the gate.
    compared = {(c["persona"], c["metric"]) for c in summary["comparisons"] if c["task"] == "escalate"
                and c["baseline"] == "no_persona" and c["stratum"] == "after_hours"}
    assert {metric for _, metric in compared} == {"accuracy", "over_triage_rate", "under_triage_rate"}
    over = [c for c in summary["comparisons"] if c["task"] == "escalate" and c["metric"] == "over_triage_rate"
            and c["baseline"] == "no_persona" and c["stratum"] == "after_hours" and c["persona"] == PLANTED]
    assert over[0]["delta"] == 0.5
    verdict = summary["verdict"]
    assert verdict["passed"] is False
    assert len(verdict["blocking"]) == 1 and PLANTED in verdict["blocking"][0]
    assert "Needless escalations" in verdict["blocking"][0]
    assert summary["metadata"]["templates"] == {"escalate": f"escalate-study@1 ({records[0]['template']['hash']})"}
    assert "persona-eval verdict: FAILED" in output
    assert f"escalate / {model} / after hours stratum (n={N_CASES} cases per persona)" in output
    assert "risk share of C answers" in output

    # The report's sections for the task: its tables, figures and the drill-down with its two labels.
    report = (run / "report.html").read_text()
    assert "After-hours line" in report
    assert "reference decision (B no, C yes)" in report
    assert "<th>P(B)</th><th>P(C)</th><th>Probabilities from</th>" in report
    assert "P(A)" not in report
    junit = (pytester.path / "junit.xml").read_text()
    assert f'name="test_escalate[escalate-{model}-{PLANTED}]"' in junit and "deployment-gate" in junit


def test_an_unknown_task_module_is_one_clear_message(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--pe-task", "no_such_task_module")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--pe-task no_such_task_module: cannot import it (ModuleNotFoundError" in result.stderr.str()
    missing = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--pe-task", "tasks/missing.py")
    assert missing.ret == pytest.ExitCode.USAGE_ERROR
    assert "--pe-task tasks/missing.py: no such file" in missing.stderr.str()
