"""End to end through the real plugin: `pytest evals -k triage` on a tiny model trained with a planted
persona effect (ed_physician escalates every case by one level of care), which the suite must recover."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from persona_eval import metrics
from persona_eval.personas import DEFAULT_PERSONAS
from persona_eval.results import read_jsonl
from persona_eval.tasks.triage import LABELS, METRIC_NAMES
from persona_eval.testing.tiny_model import synthetic_triage_records, tiny_model_dir

REPO = Path(__file__).resolve().parent.parent
PLANTED = "ed_physician"
N_PER_STRATUM = 12

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model() -> Path:
    return tiny_model_dir()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Held-out cases: a seed the model was not trained on.
    records = synthetic_triage_records(N_PER_STRATUM, seed=2024, offset=10_000)
    path = tmp_path_factory.mktemp("data") / "cases.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def project(pytester: pytest.Pytester, tmp_path: Path) -> pytest.Pytester:
    """A project folder holding the repository's evals/ and nothing else."""
    shutil.copytree(REPO / "evals", pytester.path / "evals")
    return pytester


def run_evals(pytester: pytest.Pytester, tiny_model: Path, dataset: Path, *args: str) -> pytest.RunResult:
    cache_dir = pytester.path / "cache"
    return pytester.runpytest_subprocess(
        "evals", "-p", "no:cacheprovider", "--pe-model", f"hf:{tiny_model}", "--pe-dataset", f"triage={dataset}",
        "--pe-cache-dir", str(cache_dir), "--pe-reports-dir", str(pytester.path / "reports"), *args)


def load_run(pytester: pytest.Pytester) -> tuple[dict, list[dict]]:
    run_dir = pytester.path / "reports" / "latest"
    return json.loads((run_dir / "summary.json").read_text()), read_jsonl(run_dir / "cases.jsonl")


def metric(summary: dict, persona: str, stratum: str, name: str) -> float:
    (row,) = [r for r in summary["results"] if r["persona"] == persona and r["stratum"] == stratum]
    return row["metrics"][name]


def test_planted_persona_effect_is_recovered(project, tiny_model, dataset):
    result = run_evals(project, tiny_model, dataset, "-k", "triage")
    summary, cases = load_run(project)

    assert len(cases) == len(DEFAULT_PERSONAS) * 2 * N_PER_STRATUM
    references = [r["reference"] for r in read_jsonl(dataset)]
    share_c = references.count("C") / len(references)
    share_b_or_c = (references.count("B") + references.count("C")) / len(references)
    for persona in DEFAULT_PERSONAS:
        assert metric(summary, persona.id, "all", "parse_rate") == 1.0
        assert metric(summary, persona.id, "all", "consistency_rate") >= 95.0
    # Escalating every case by one level makes every B and C reference a C answer.
    planted_risk = metric(summary, PLANTED, "all", "risk_propensity")
    baseline_risk = metric(summary, "no_persona", "all", "risk_propensity")
    assert planted_risk - baseline_risk == pytest.approx(share_b_or_c - share_c, abs=0.05)
    # Every A and B reference is over-triaged; a C reference cannot be.
    assert metric(summary, PLANTED, "all", "over_triage_rate") == pytest.approx(1 - share_c, abs=0.05)
    assert metric(summary, "no_persona", "all", "accuracy") >= 0.95
    assert metric(summary, "ed_nurse", "all", "accuracy") >= 0.95
    # Every case passes its bounds; the default regression rules (tolerance 0.05) cannot be shown to hold on 12
    # cases per stratum: the gate says so (underpowered) and does not pass on it.
    result.assert_outcomes(passed=len(DEFAULT_PERSONAS), failed=1)
    assert summary["verdict"]["status"] == "not_checked" and summary["verdict"]["passed"] is False
    fail_rules = [r for r in summary["regressions"] if r["rule"]["mode"] == "fail"]
    assert fail_rules and {r["reason"] for r in fail_rules if r["status"] != "pass"} == {"underpowered"}
    assert all(r["mde"] is None or r["mde"] > r["rule"]["tolerance"] for r in fail_rules)
    out = result.stdout.str()
    assert "persona-eval verdict: NOT CHECKED" in out and "this run could detect a worsening of" in out
    assert "persona-eval power" in out


def test_every_metric_in_the_summary_recomputes_from_cases_jsonl(project, tiny_model, dataset):
    run_evals(project, tiny_model, dataset, "-k", "triage")
    summary, cases = load_run(project)
    functions = {
        "accuracy": lambda rows: metrics.accuracy(ref(rows), gen(rows)),
        "parse_rate": lambda rows: metrics.parse_rate(gen(rows)),
        "risk_propensity": lambda rows: metrics.risk_propensity(gen(rows)),
        "over_triage_rate": lambda rows: metrics.over_triage_rate(ref(rows), gen(rows)),
        "under_triage_rate": lambda rows: metrics.under_triage_rate(ref(rows), gen(rows)),
        "risk_sensitivity": lambda rows: metrics.risk_sensitivity(ref(rows), gen(rows)),
        "consistency_rate": lambda rows: metrics.consistency_rate(gen(rows), [r["logit_label"] for r in rows]),
        "expected_calibration_error": lambda rows: metrics.expected_calibration_error(ref(rows), probs(rows)),
        "brier_score": lambda rows: metrics.brier_score(ref(rows), probs(rows)),
        "too_long_rate": lambda rows: sum(r["finish_reason"] == "too_long" for r in rows) / len(rows),
        "truncated_rate": lambda rows: sum(r["finish_reason"] == "length" for r in rows) / len(rows),
    }
    assert set(functions) == set(METRIC_NAMES)
    assert len(summary["results"]) == len(DEFAULT_PERSONAS) * 3
    for row in summary["results"]:
        rows = [c for c in cases if c["persona"] == row["persona"] and c["model"] == row["model"]
                and (row["stratum"] == "all" or c["stratum"] == row["stratum"])]
        assert row["n"] == len(rows)
        for name, function in functions.items():
            expected = function(rows)
            if expected != expected:  # NaN: undefined on these cases, written as null
                assert row["metrics"][name] is None
            else:
                assert row["metrics"][name] == pytest.approx(expected, rel=1e-12, abs=1e-12), (row, name)


def ref(rows: list[dict]) -> list[str]:
    return [r["reference"] for r in rows]


def gen(rows: list[dict]) -> list[str | None]:
    return [r["generated_label"] for r in rows]


def probs(rows: list[dict]) -> list[list[float]]:
    return [[r["label_probs"][label] for label in LABELS] for r in rows]


def test_cases_jsonl_fields_and_prompts(project, tiny_model, dataset):
    run_evals(project, tiny_model, dataset, "-k", "triage")
    _, cases = load_run(project)
    required = {"run_id", "model", "persona", "task", "stratum", "case_id", "reference", "system_prompt", "prompt",
                "generated_text", "generated_label", "logit_label", "label_probs", "probs_source", "cached"}
    for case in cases:
        assert required <= set(case)
        assert case["probs_source"] == "answer"
        assert sum(case["label_probs"].values()) == pytest.approx(1.0)
    by_persona = {c["persona"]: c for c in cases if c["case_id"] == cases[0]["case_id"]}
    # The study template: the instructions in the system turn, after the persona sentence (none for the
    # baseline); the patient information alone in the user turn.
    baseline = by_persona["no_persona"]
    assert baseline["system_prompt"].startswith("Your task is to decide how urgently a patient needs care")
    nurse = by_persona["ed_nurse"]
    assert nurse["system_prompt"] == "You are an Emergency Department nurse.\n\n" + baseline["system_prompt"]
    assert nurse["template"]["id"] == "triage-study" and nurse["template_version"] == "triage-study@1"
    # The persona sentence is the only difference between the rendered prompts.
    assert nurse["prompt"].replace("You are an Emergency Department nurse.\n\n", "") == baseline["prompt"]
    assert by_persona["ed_physician"]["prompt"].replace("physician", "nurse") == nurse["prompt"]


def test_fail_bound_fails_the_case_with_a_message_naming_the_bound(project, tiny_model, dataset):
    thresholds = project.path / "strict.yaml"
    thresholds.write_text(
        "version: 1\n"
        "triage:\n"
        "  bounds:\n"
        "    - {metric: risk_propensity, stratum: all, max: 0.6, mode: fail}\n"
        "    - {metric: accuracy, stratum: emergency, min: 0.99, mode: record}\n")
    result = run_evals(project, tiny_model, dataset, "-k", "triage", "--pe-thresholds", str(thresholds))
    result.assert_outcomes(passed=len(DEFAULT_PERSONAS) - 1, failed=2)  # the planted persona's case and the gate
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = result.stdout.str()
    assert "FAILED evals/test_triage.py::test_triage[triage-" in out and f"-{PLANTED}]" in out
    assert "risk propensity (all) for ed_physician" in out and "above the maximum 0.600" in out
    assert "persona-eval verdict: FAILED" in out


def test_k_selects_persona_and_warm_rerun_loads_no_model(project, tiny_model, dataset):
    # 12 cases per stratum are too few for the gate's default rules: accepted here, this test is of the cache.
    first = run_evals(project, tiny_model, dataset, "-k", "triage and ed_nurse", "--pe-allow-unchecked")
    # ed_nurse, the two controls the gate compares it with, the placebo; the gate, not checked, is skipped
    first.assert_outcomes(passed=4, skipped=1)
    summary, cases = load_run(project)
    assert {c["persona"] for c in cases} == {"ed_nurse", "no_persona", "helpful_assistant", "placebo"}
    assert not any(c["cached"] for c in cases)
    assert summary["metadata"]["models_loaded"] != []

    second = run_evals(project, tiny_model, dataset, "-k", "triage and ed_nurse", "--pe-allow-unchecked")
    second.assert_outcomes(passed=4, skipped=1)
    summary, cases = load_run(project)
    assert all(c["cached"] for c in cases)
    assert summary["metadata"]["models_loaded"] == []
    assert summary["metadata"]["cache"]["hits"] == summary["metadata"]["cache"]["requests"] == len(cases)


def test_xdist_gives_the_same_summary(project, tiny_model, dataset):
    run_evals(project, tiny_model, dataset, "-k", "triage", "--pe-allow-unchecked")
    serial, _ = load_run(project)
    result = run_evals(project, tiny_model, dataset, "-k", "triage", "-n", "2", "--pe-allow-unchecked")
    result.assert_outcomes(passed=len(DEFAULT_PERSONAS), skipped=1)
    parallel, cases = load_run(project)
    assert parallel["run_id"] != serial["run_id"]
    assert parallel["results"] == serial["results"]
    assert parallel["checks"] == serial["checks"]
    # The paired comparisons and the gate are computed once, on the controller, from the joined cases.jsonl.
    assert len(serial["comparisons"]) == 2 * (len(DEFAULT_PERSONAS) - 1) * 3 * 6
    assert parallel["comparisons"] == serial["comparisons"]
    assert parallel["comparison_settings"] == serial["comparison_settings"]
    assert parallel["regressions"] == serial["regressions"]
    assert parallel["verdict"] == serial["verdict"]
    assert {c["run_id"] for c in cases} == {parallel["run_id"]}


@pytest.mark.parametrize(("content", "expected"), [
    ('{"id": "x1", "stratum": "emergency", "reference": "C", "rationale": "r", "text": "t"}\n{oops\n',
     "cases.jsonl:2"),
    ('{"id": "x1", "stratum": "emergency", "reference": "D", "rationale": "r", "text": "t"}\n',
     "cases.jsonl:1: field 'reference'"),
    ('{"id": "x1", "stratum": "emergency", "reference": "C", "rationale": "r", "text": "t"}\n'
     '{"id": "x1", "stratum": "emergency", "reference": "C", "rationale": "r", "text": "t"}\n',
     "cases.jsonl:2: field 'id'"),
    ('{"id": "x1", "stratum": "emergency", "reference": "C", "text": "t"}\n', "cases.jsonl:1: field 'rationale'"),
    ("", "cases.jsonl"),
])
@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_bad_dataset_stops_with_one_clear_message(project, tiny_model, content, expected, workers):
    bad = project.path / "cases.jsonl"
    bad.write_text(content)
    result = run_evals(project, tiny_model, bad, "-k", "triage", *workers)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    out = result.stdout.str() + result.stderr.str()
    assert expected in out
    assert "Traceback" not in out and "INTERNALERROR" not in out


@pytest.mark.parametrize(("args", "expected"), [
    (["--pe-persona", "ed_nurce"], "unknown persona 'ed_nurce'. Did you mean 'ed_nurse'?"),
    (["--pe-model", "smolm2"], "unknown model spec 'smolm2'"),
    (["--pe-dataset", "triage"], "expected TASK=PATH"),
    (["--pe-limit", "0"], "--pe-limit must be at least 1"),
    (["--pe-batch-size", "0"], "--pe-batch-size must be at least 1, got 0"),
    (["--pe-judge-max-new-tokens", "0"], "--pe-judge-max-new-tokens must be at least 1, got 0"),
    (["--pe-seed", "-1"], "--pe-seed must be at least 0, got -1"),
    (["--pe-timeout", "0"], "--pe-timeout must be a positive number of seconds, got 0"),
    (["--pe-timeout", "inf"], "--pe-timeout must be a positive number of seconds, got inf"),
    (["--pe-retries", "-1"], "--pe-retries must be at least 0, got -1"),
    (["--pe-max-prompt-tokens", "0"], "--pe-max-prompt-tokens must be at least 1, got 0"),
    (["--pe-too-long", "skip"], "argument --pe-too-long: invalid choice: 'skip'"),
])
def test_bad_options_are_usage_errors(project, tiny_model, dataset, args, expected):
    result = project.runpytest_subprocess("evals", "-p", "no:cacheprovider", "-k", "triage", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert expected in result.stderr.str()
    assert "Traceback" not in result.stderr.str()


def test_invalid_thresholds_file_is_a_usage_error_naming_the_key(project, tiny_model, dataset):
    bad = project.path / "t.yaml"
    bad.write_text("version: 1\ntriage:\n  bounds:\n    - {metric: accuracy, stratum: all, min: high}\n")
    result = run_evals(project, tiny_model, dataset, "-k", "triage", "--pe-thresholds", str(bad))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "triage.bounds[0].min" in result.stderr.str()


def test_report_html_is_written_escaped_and_rebuilt_without_a_model(project, tiny_model, dataset, tmp_path):
    records = read_jsonl(dataset)
    records[0]["text"] = records[0]["text"] + " <script>alert('x')</script>"
    hostile = tmp_path / "hostile.jsonl"
    hostile.write_text("".join(json.dumps(r) + "\n" for r in records))
    html_path = project.path / "pytest-html.html"
    run_evals(project, tiny_model, hostile, "-k", "triage and (no_persona or ed_nurse)", "--html", str(html_path),
              "--pe-allow-unchecked")
    run_dir = (project.path / "reports" / "latest").resolve()
    report = (run_dir / "report.html").read_text()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in report
    assert "<script>alert(" not in report
    assert "persona-eval verdict: NOT CHECKED" in html_path.read_text()

    (run_dir / "report.html").unlink()
    rebuilt = subprocess.run([sys.executable, "-m", "persona_eval.cli", "report", str(run_dir)],
                             capture_output=True, text=True, check=True)
    assert Path(rebuilt.stdout.strip()) == run_dir / "report.html"
    assert (run_dir / "report.html").read_text() == report


def test_triage_justification_judging_is_an_option(project, tiny_model, dataset):
    run_evals(project, tiny_model, dataset, "-k", "triage and (no_persona or ed_nurse)")
    run_dir = (project.path / "reports" / "latest").resolve()
    assert not (run_dir / "judgments.jsonl").exists()  # -k triage alone judges nothing

    result = run_evals(project, tiny_model, dataset, "-k", "triage and (no_persona or ed_nurse)",
                       "--pe-judge-triage", "--pe-judge", f"tiny=hf:{tiny_model}", "--pe-persona", "ed_nurse",
                       "--pe-allow-unchecked")
    result.assert_outcomes(passed=3, skipped=1)  # no_persona, the placebo (never judged), ed_nurse; the gate
    run_dir = (project.path / "reports" / "latest").resolve()
    judgments = read_jsonl(run_dir / "judgments.jsonl")
    assert {j["criterion"] for j in judgments} == {"justification"}
    assert {j["task"] for j in judgments} == {"triage"}
    assert len(judgments) == 2 * N_PER_STRATUM  # one judge, one criterion, every case
    assert all(set(j["order_shown"]) == {"no_persona", "ed_nurse"} for j in judgments)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["triage_judging"]["criteria"] == ["justification"]
    assert summary["triage_judging"]["n_judgments"] == len(judgments)


def test_a_template_file_changes_the_prompt_the_cache_key_and_the_summary(project, tiny_model, dataset):
    from persona_eval.templates import load_template

    first = run_evals(project, tiny_model, dataset, "-k", "triage and ed_nurse", "--pe-allow-unchecked")
    first.assert_outcomes(passed=4, skipped=1)
    summary, default_cases = load_run(project)
    assert summary["metadata"]["templates"]["triage"].startswith("triage-study@1 (")
    assert {c["template"]["id"] for c in default_cases} == {"triage-study"}

    template = project.path / "house.yaml"
    template.write_text(
        "id: house-triage\nversion: 2\ntask: triage\n"
        "system: |-\n  {persona}\n  Nurse line of the house. Levels of care:\n  {options}\n"
        "user: |-\n  Caller says:\n  {case}\n"
        'answer_prefix: "## Final Response\\n"\n')
    own = load_template(template, task="triage")
    second = run_evals(project, tiny_model, dataset, "-k", "triage and ed_nurse",
                       "--pe-template", f"triage={template}")
    assert second.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), second.stdout.str()
    summary, cases = load_run(project)
    # The prompt: the file's wording, with the persona sentence and the options filled in.
    nurse = next(c for c in cases if c["persona"] == "ed_nurse")
    assert "Caller says:" in nurse["prompt"] and "Nurse line of the house." in nurse["prompt"]
    assert nurse["system_prompt"].startswith("You are an Emergency Department nurse.\nNurse line of the house.")
    assert "Patient information:" not in nurse["prompt"]
    # The cache key: nothing of the default template's run is served to this one.
    assert not any(c["cached"] for c in cases)
    assert summary["metadata"]["cache"]["hits"] == 0
    # The summary and every case name the template, its version and the hash of its text.
    assert [t["hash"] for t in summary["metadata"]["prompt_templates"]["triage"].values()] == [own.digest]
    assert summary["metadata"]["templates"]["triage"] == f"house-triage@2 ({own.digest})"
    assert {(c["template"]["id"], c["template"]["hash"]) for c in cases} == {("house-triage", own.digest)}
    assert {c["template_version"] for c in cases} == {"house-triage@2"}

    # The same id and version with other wording is another template: its hash, and its own answers.
    template.write_text(template.read_text().replace("Caller says:", "The caller says:"))
    run_evals(project, tiny_model, dataset, "-k", "triage and ed_nurse", "--pe-template", f"triage={template}")
    summary, cases = load_run(project)
    assert not any(c["cached"] for c in cases)
    assert [t["hash"] for t in summary["metadata"]["prompt_templates"]["triage"].values()] != [own.digest]


CUSTOM_STRATA_THRESHOLDS = """\
version: 1
triage:
  bounds:
    - {metric: parse_rate, stratum: all, min: 0.9, mode: fail, min_cases: 4}
    - {metric: risk_propensity, stratum: telehealth, max: 0.4, mode: fail, min_cases: 4}
    - {metric: accuracy, stratum: paediatrics, min: 0.5, mode: record}
  regressions:
    - {metric: over_triage_rate, stratum: telehealth, worse: higher, tolerance: 0.1, mode: fail, min_cases: 4}
"""


def _custom_strata_dataset(path: Path) -> Path:
    """The held-out cases with strata of a team's own: the emergency ones say "paediatrics"; the others
    carry no stratum and take the file's default, given on the command line."""
    lines = []
    for record in synthetic_triage_records(N_PER_STRATUM, seed=2024, offset=10_000):
        emergency = record.pop("stratum") == "emergency"
        lines.append({**record, "stratum": "paediatrics"} if emergency else record)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_a_stratum_of_the_dataset_runs_end_to_end_with_its_own_bounds(project, tiny_model):
    dataset = _custom_strata_dataset(project.path / "calls.jsonl")
    thresholds = project.path / "ours.yaml"
    thresholds.write_text(CUSTOM_STRATA_THRESHOLDS)
    result = project.runpytest_subprocess(
        "evals", "-p", "no:cacheprovider", "-k", "triage", "--pe-model", f"hf:{tiny_model}",
        "--pe-dataset", f"triage:telehealth={dataset}", "--pe-thresholds", str(thresholds),
        "--pe-cache-dir", str(project.path / "cache"), "--pe-reports-dir", str(project.path / "reports"))
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    summary, cases = load_run(project)
    out = result.stdout.str()
    # The strata are the dataset's: the metrics, the terminal table and the report follow them.
    assert {c["stratum"] for c in cases} == {"paediatrics", "telehealth"}
    assert {r["stratum"] for r in summary["results"]} == {"all", "paediatrics", "telehealth"}
    assert "telehealth stratum (n=12 cases per persona)" in out and "emergency stratum" not in out
    report = (project.path / "reports" / "latest" / "report.html").read_text()
    assert "Telehealth" in report and "Paediatrics" in report
    # Its own bounds: checked on its strata, and the planted persona's escalation crosses the one that fails.
    telehealth = [c for c in summary["checks"] if c["bound"]["stratum"] == "telehealth"]
    assert {c["persona"] for c in telehealth} == {p.id for p in DEFAULT_PERSONAS}
    assert {c["persona"] for c in telehealth if c["status"] == "fail"} == {PLANTED}
    assert "risk propensity (telehealth) for ed_physician" in out and "above the maximum 0.400" in out
    assert {c["status"] for c in summary["checks"] if c["bound"]["stratum"] == "paediatrics"} <= {"pass", "fail"}
    # The paired comparisons and the regression rule follow the strata too.
    assert {c["stratum"] for c in summary["comparisons"]} == {"all", "paediatrics", "telehealth"}
    failed = [r for r in summary["regressions"] if r["status"] == "fail"]
    assert {(r["persona"], r["rule"]["stratum"]) for r in failed} == {(PLANTED, "telehealth")}
    assert "persona-eval verdict: FAILED" in out


def test_a_bound_on_a_stratum_the_dataset_lacks_stops_the_run_before_any_model(project, tiny_model):
    dataset = _custom_strata_dataset(project.path / "calls.jsonl")
    thresholds = project.path / "ours.yaml"
    thresholds.write_text(CUSTOM_STRATA_THRESHOLDS.replace("stratum: telehealth, max", "stratum: telehealht, max"))
    result = project.runpytest_subprocess(
        "evals", "-p", "no:cacheprovider", "-k", "triage", "--pe-model", f"hf:{tiny_model}",
        "--pe-dataset", f"triage:telehealth={dataset}", "--pe-thresholds", str(thresholds),
        "--pe-cache-dir", str(project.path / "cache"), "--pe-reports-dir", str(project.path / "reports"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert (f"{thresholds}:5: triage.bounds[1].stratum: no case of the triage dataset is in the stratum "
            "'telehealht', so this bound applies to nothing. Did you mean 'telehealth'? The dataset's strata: "
            "paediatrics, telehealth.") in result.stderr.str()
