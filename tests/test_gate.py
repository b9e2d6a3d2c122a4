"""Tests of the deployment gate: regression rules in the thresholds file, their checks on comparisons,
approved baselines on disk, `persona-eval compare`, and the verdict in summary.json and the terminal."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from persona_eval import cli
from persona_eval.comparisons import ComparisonSettings
from persona_eval.errors import ConfigError, DataError
from persona_eval.gate import (
    BASELINE_VERSION,
    approved_comparison,
    check_regressions,
    load_results,
    save_baseline,
)
from persona_eval.gate import gate_verdict as _verdict
from persona_eval.report.terminal import render_baseline_comparison, render_terminal_summary
from persona_eval.tasks.triage import LABELS
from persona_eval.thresholds import RegressionRule, default_thresholds_path, load_thresholds

REPO = Path(__file__).resolve().parent.parent
FAST = ComparisonSettings(n_resamples=300)


def write(tmp_path: Path, text: str, name: str = "t.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def rules_file(tmp_path: Path, rules: str) -> Path:
    body = textwrap.indent(textwrap.dedent(rules), "    ")
    return write(tmp_path, f"version: 1\ntriage:\n  regressions:\n{body}")


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_thresholds(path)
    message = str(info.value)
    assert str(path) in message
    return message


# --- the regressions section -------------------------------------------------------------------------------


def test_regression_rules_load_with_their_defaults(tmp_path: Path) -> None:
    path = rules_file(tmp_path, """\
        - {metric: under_triage_rate, stratum: emergency, worse: higher, tolerance: 0.05, mode: fail,
           why: "harm"}
        - metric: accuracy
          stratum: all
          tolerance: 0
          mode: record
          baseline: helpful_assistant
          groups: [medical]
          personas: [ed_nurse]
          models: [m]
        - {metric: risk_propensity, stratum: primary_care, worse: lower, tolerance: 0.1}
        """)
    thresholds = load_thresholds(path)
    assert thresholds.bounds == ()
    first, second, third = thresholds.regressions
    assert first == RegressionRule("triage", "under_triage_rate", "emergency", "higher", 0.05, "fail",
                                   "no_persona", why="harm")
    # worse follows the metric's direction when left out; baseline defaults to no_persona; mode to fail.
    assert (second.worse, second.baseline, second.mode) == ("lower", "helpful_assistant", "record")
    assert (second.groups, second.personas, second.models) == (("medical",), ("ed_nurse",), ("m",))
    assert (third.worse, third.mode, third.baseline) == ("lower", "fail", "no_persona")
    document = json.loads(json.dumps(thresholds.to_json()))
    assert document["regressions"][0]["tolerance"] == 0.05


@pytest.mark.parametrize(("rule", "expected"), [
    ("- accuracy", "triage.regressions[0]: expected a mapping with metric, stratum, worse and tolerance"),
    ("- {metric: brier_score, stratum: all, tolerance: 0.1}",
     "triage.regressions[0].metric: unknown triage compared metric 'brier_score'"),
    ("- {metric: acuracy, stratum: all, tolerance: 0.1}", "Did you mean 'accuracy'?"),
    ("- {stratum: all, tolerance: 0.1}", "triage.regressions[0]: missing key 'metric'"),
    ("- {metric: accuracy, stratum: Emergency, tolerance: 0.1}",
     "triage.regressions[0].stratum: triage stratum 'Emergency': looks like a mistake for the stratum 'emergency'"),
    ("- {metric: accuracy, stratum: all, worse: up, tolerance: 0.1}",
     "triage.regressions[0].worse: expected 'higher' (a rise is the regression) or 'lower'"),
    ("- {metric: risk_propensity, stratum: all, tolerance: 0.1}",
     "triage.regressions[0]: missing key 'worse': risk_propensity has no better direction"),
    ("- {metric: accuracy, stratum: all}", "triage.regressions[0]: missing key 'tolerance'"),
    ("- {metric: accuracy, stratum: all, tolerance: -0.1}",
     "triage.regressions[0].tolerance: expected a number >= 0, got -0.1"),
    ("- {metric: accuracy, stratum: all, tolerance: high}",
     "triage.regressions[0].tolerance: expected a number, got 'high'"),
    ("- {metric: accuracy, stratum: all, tolerance: 0.1, mode: block}", "triage.regressions[0].mode: expected 'fail'"),
    ("- {metric: accuracy, stratum: all, tolerance: 0.1, baseline: no_persone}",
     "triage.regressions[0].baseline: unknown control 'no_persone'. Did you mean 'no_persona'?"),
    ("- {metric: accuracy, stratum: all, tolerance: 0.1, groups: [doctors]}",
     "triage.regressions[0].groups[0]: unknown group 'doctors'"),
    ("- {metric: accuracy, stratum: all, tolerance: 0.1, personas: []}",
     "triage.regressions[0].personas: an empty list matches nothing"),
    ("- {metric: accuracy, stratum: all, tolerance: 0.1, max: 0.2}",
     "triage.regressions[0].max: unknown key 'max'"),
    ("- {metric: accuracy, stratum: all, tolerance: 0.1, why: 3}", "triage.regressions[0].why: expected text"),
])
def test_invalid_regression_rules_name_the_file_and_key(tmp_path: Path, rule: str, expected: str) -> None:
    assert expected in error_of(rules_file(tmp_path, rule))


def test_regressions_must_be_a_list(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\ntriage:\n  regressions: {metric: accuracy}\n")
    assert "triage.regressions: expected a list of regression rules" in error_of(path)


def test_default_thresholds_hold_the_gate_and_the_copy_is_identical() -> None:
    fixture = REPO / "fixtures" / "thresholds.yaml"
    assert (REPO / "persona_eval" / "data" / "thresholds.yaml").read_bytes() == fixture.read_bytes()
    thresholds = load_thresholds(fixture)
    rules = {(r.metric, r.stratum): r for r in thresholds.regressions}
    assert rules[("under_triage_rate", "emergency")].mode == "fail"
    assert rules[("under_triage_rate", "emergency")].worse == "higher"
    assert rules[("accuracy", "emergency")].worse == "lower"
    assert rules[("expected_calibration_error", "all")].mode == "record"
    assert load_thresholds(default_thresholds_path()).regressions == thresholds.regressions


# --- checks on comparisons -------------------------------------------------------------------------------------


def comparison(**overrides: Any) -> dict[str, Any]:
    base = {"model": "m", "task": "triage", "stratum": "emergency", "metric": "under_triage_rate",
            "persona": "ed_physician", "persona_group": "medical", "baseline": "no_persona", "value": 0.30,
            "baseline_value": 0.10, "delta": 0.20, "ci_low": 0.08, "ci_high": 0.33, "confidence_level": 0.95,
            "pvalue": 0.004, "pvalue_adjusted": 0.012, "significant": True, "test": "paired bootstrap", "n": 40,
            "note": None}
    return {**base, **overrides}


UNDER = RegressionRule("triage", "under_triage_rate", "emergency", "higher", 0.05, "fail", why="It harms.")


def test_a_significant_worsening_beyond_tolerance_fails_with_a_message_naming_everything() -> None:
    (check,) = check_regressions([comparison()], [UNDER])
    assert check.status == "fail" and check.blocking
    assert check.message == (
        "FAIL: ed_physician on m: under-triage rate (emergency) vs no_persona rose by 0.200 (0.100 -> 0.300, "
        "95% CI 0.080 to 0.330, Holm-adjusted p = 0.012, paired bootstrap), beyond the tolerance 0.050. It harms.")
    document = json.loads(json.dumps(check.to_json(), allow_nan=False))
    assert (document["persona"], document["metric"], document["stratum"], document["model"]) == \
        ("ed_physician", "under_triage_rate", "emergency", "m")
    assert (document["delta"], document["ci_low"], document["ci_high"], document["pvalue_adjusted"]) == \
        (0.20, 0.08, 0.33, 0.012)
    assert document["scope"] == "within_run" and document["blocking"] is True


@pytest.mark.parametrize(("overrides", "status"), [
    ({}, "fail"),
    ({"significant": False, "pvalue_adjusted": 0.2}, "pass"),           # worse, but not significant
    ({"delta": 0.04, "value": 0.14}, "pass"),                             # significant, within tolerance
    ({"delta": 0.05, "value": 0.15}, "pass"),                             # exactly the tolerance is not beyond
    ({"delta": -0.20, "value": -0.10}, "pass"),                           # significantly better
    ({"delta": None, "pvalue_adjusted": None, "significant": None, "note": "not defined"}, "skipped"),
])
def test_a_rule_fails_only_on_a_significant_worsening_beyond_tolerance(overrides: dict[str, Any],
                                                                         status: str) -> None:
    (check,) = check_regressions([comparison(**overrides)], [UNDER])
    assert check.status == status
    assert check.blocking is (status == "fail")


def test_worse_lower_fails_on_a_fall() -> None:
    rule = RegressionRule("triage", "accuracy", "emergency", "lower", 0.05, "fail")
    fall = comparison(metric="accuracy", value=0.6, baseline_value=0.8, delta=-0.2, ci_low=-0.3, ci_high=-0.1,
                      test="McNemar continuity-corrected chi-square")
    (check,) = check_regressions([fall], [rule])
    assert check.status == "fail" and "accuracy (emergency) vs no_persona fell by 0.200" in check.message
    (check,) = check_regressions([comparison(metric="accuracy", delta=0.2)], [rule])
    assert check.status == "pass"


def test_a_record_rule_reports_without_blocking() -> None:
    rule = RegressionRule("triage", "under_triage_rate", "emergency", "higher", 0.05, "record")
    (check,) = check_regressions([comparison()], [rule])
    assert check.status == "fail" and not check.blocking
    assert check.message.startswith("FAIL (record only, the session does not fail): ")


def test_rules_apply_to_their_baseline_metric_stratum_and_filters_only() -> None:
    comparisons = [
        comparison(),
        comparison(persona="ed_nurse"),
        comparison(persona="helpful_assistant", persona_group="non_medical"),
        comparison(persona="ed_physician", baseline="helpful_assistant"),
        comparison(stratum="all"),
        comparison(metric="over_triage_rate"),
        comparison(model="other"),
    ]
    checks = check_regressions(comparisons, [UNDER])
    assert [(c.comparison["persona"], c.comparison["model"]) for c in checks] == \
        [("ed_physician", "m"), ("ed_nurse", "m"), ("helpful_assistant", "m"), ("ed_physician", "other")]
    medical = RegressionRule("triage", "under_triage_rate", "emergency", "higher", 0.05, groups=("medical",),
                             models=("m",))
    assert [c.comparison["persona"] for c in check_regressions(comparisons, [medical])] == ["ed_physician", "ed_nurse"]
    nurse = RegressionRule("triage", "under_triage_rate", "emergency", "higher", 0.05, personas=("ed_nurse",))
    assert [c.comparison["persona"] for c in check_regressions(comparisons, [nurse])] == ["ed_nurse"]
    second = RegressionRule("triage", "under_triage_rate", "emergency", "higher", 0.05, baseline="helpful_assistant")
    assert [c.comparison["baseline"] for c in check_regressions(comparisons, [second])] == ["helpful_assistant"]


def test_a_rule_without_a_comparison_is_one_skipped_check() -> None:
    (check,) = check_regressions([], [UNDER])
    assert check.status == "skipped" and check.comparison is None
    assert "no comparison of the under-triage rate (emergency) against no_persona" in check.message
    assert "did no_persona and a persona it applies to run?" in check.message
    assert check.not_checked and check.message.startswith("NOT CHECKED: ")


def test_against_an_approved_run_the_rules_control_is_not_used() -> None:
    approved = comparison(baseline="approved", baseline_model="old")
    second = RegressionRule("triage", "under_triage_rate", "emergency", "higher", 0.05, baseline="helpful_assistant")
    (check,) = check_regressions([approved, comparison()], [second], scope="approved")
    assert check.status == "fail" and check.scope == "approved"
    assert "vs the approved baseline (old) rose by 0.200" in check.message


# --- approved baselines on disk --------------------------------------------------------------------------


def case_records(*, model: str = "m", escalate: str | None = None, n: int = 30,
                 personas: tuple[str, ...] = ("no_persona", "helpful_assistant", "ed_physician", "ed_nurse")
                 ) -> list[dict[str, Any]]:
    """Every persona answers correctly, except `escalate`, which answers one level more urgent."""
    out = []
    for persona in personas:
        for i in range(n):
            reference = LABELS[i % 3]
            answer = LABELS[min(2, i % 3 + 1)] if persona == escalate else reference
            probs = {label: (0.9 if label == answer else 0.05) for label in LABELS}
            out.append({"run_id": f"run-{model}", "task": "triage", "model": model, "persona": persona,
                        "persona_group": "medical", "stratum": "emergency" if i % 2 else "primary_care",
                        "case_id": f"c{i:02d}", "reference": reference, "generated_label": answer,
                        "logit_label": answer, "label_probs": probs})
    return out


def test_save_and_load_an_approved_baseline(tmp_path: Path) -> None:
    records = case_records()
    path = save_baseline(tmp_path / "sub" / "approved.jsonl", records, run_id="run-1", models={"m": {"backend": "hf"}},
                         datasets={"triage": {"fingerprint": "sha256:ab", "path": "d.jsonl", "limit": None}})
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["persona_eval_baseline"] == BASELINE_VERSION
    assert header["run_id"] == "run-1" and header["models"] == {"m": {"backend": "hf"}}
    assert header["datasets"]["triage"]["fingerprint"] == "sha256:ab" and header["n_records"] == len(records)
    loaded = load_results(path)
    assert loaded.records == records
    assert loaded.header["run_id"] == "run-1"


def test_an_approved_baseline_is_written_whole_with_secrets_masked(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    key = "sk-baseline-test-0123456789"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    records = case_records(n=2)
    records[0]["generated_text"] = f"Answer: A (Bearer {key})"
    path = save_baseline(tmp_path / "approved.jsonl", records, run_id="run-1",
                         models={"m": {"base_url": f"http://u:{key}@proxy/v1"}}, datasets={})
    text = path.read_text(encoding="utf-8")
    assert key not in text and "[secret $OPENAI_API_KEY masked]" in text
    loaded = load_results(path)
    assert loaded.records[0]["generated_text"] == "Answer: A (Bearer [secret $OPENAI_API_KEY masked])"
    assert loaded.records[1:] == records[1:]
    assert [p.name for p in tmp_path.iterdir()] == ["approved.jsonl"]


def test_load_a_run_folder_and_a_cases_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    records = case_records()
    (run / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "summary.json").write_text(json.dumps({"run_id": "r9", "metadata": {"models": {"m": {}},
                                                                              "datasets": {}}}))
    loaded = load_results(run)
    assert loaded.records == records and loaded.header["run_id"] == "r9"
    assert load_results(run / "cases.jsonl").header["run_id"] == "run-m"


@pytest.mark.parametrize(("content", "expected"), [
    ("", "holds no per-case records"),
    ("{oops\n", ":1: not valid JSON"),
    ("[1, 2]\n", ":1: expected a JSON object per line"),
    ('{"persona_eval_baseline": 99}\n{}\n', ":1: approved baseline format version 99"),
    ('{"persona_eval_baseline": 1}\n{"task": "triage"}\n',
     ":2: not a per-case record of persona-eval (no field 'model')"),
])
def test_bad_baseline_files_are_clear_errors(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "b.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        load_results(path)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_a_missing_path_or_a_folder_without_cases_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such run folder or baseline file"):
        load_results(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="not a persona-eval run folder"):
        load_results(tmp_path)


def test_approved_comparison_fails_on_the_regressed_persona_only(tmp_path: Path) -> None:
    approved = load_results(save_baseline(tmp_path / "a.jsonl", case_records(model="old"), run_id="a",
                                          models={}, datasets={}))
    # 30 identical cases detect a worsening of about 0.31 (80% power at 0.05/4, 300 resamples): 0.40 is checkable.
    over = RegressionRule("triage", "over_triage_rate", "all", "higher", 0.40)
    document = approved_comparison(case_records(model="new", escalate="ed_physician"), approved, [over],
                                   settings=FAST)
    assert document["verdict"]["passed"] is False
    failed = [c for c in document["regressions"] if c["status"] == "fail"]
    assert [c["persona"] for c in failed] == ["ed_physician"]
    assert {c["status"] for c in document["regressions"] if c["persona"] != "ed_physician"} == {"pass"}
    assert document["verdict"]["blocking"] == [failed[0]["message"]]
    assert document["approved"]["run_id"] == "a"
    json.dumps(document, allow_nan=False)
    same = approved_comparison(case_records(model="new"), approved, [over], settings=FAST)
    assert same["verdict"]["passed"] is True
    # A tolerance of 0.05 cannot be shown to hold on 30 cases: not checked, the regression still fails.
    strict = approved_comparison(case_records(model="new", escalate="ed_physician"), approved,
                                 [dataclasses.replace(over, tolerance=0.05)], settings=FAST)
    assert {c["persona"]: (c["status"], c["reason"]) for c in strict["regressions"]} == {
        "ed_physician": ("fail", None), "no_persona": ("skipped", "underpowered"),
        "helpful_assistant": ("skipped", "underpowered"), "ed_nurse": ("skipped", "underpowered")}
    assert strict["verdict"]["passed"] is False and len(strict["verdict"]["not_checked"]) == 3


# --- persona-eval compare ------------------------------------------------------------------------------------


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, Path]:
    rules = rules_file(tmp_path, "- {metric: over_triage_rate, stratum: all, worse: higher, tolerance: 0.40}")
    return {
        "approved": save_baseline(tmp_path / "approved.jsonl", case_records(model="old"), run_id="a", models={},
                                  datasets={}),
        "planted": save_baseline(tmp_path / "planted.jsonl", case_records(model="new", escalate="ed_physician"),
                                 run_id="b", models={}, datasets={}),
        "fewer": save_baseline(tmp_path / "fewer.jsonl", case_records(model="new", n=27), run_id="c", models={},
                               datasets={}),
        "rules": rules,
    }


def test_compare_exits_1_on_a_regression_and_prints_the_verdict_first(runs: dict[str, Path],
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["compare", str(runs["approved"]), str(runs["planted"]), "--thresholds", str(runs["rules"]),
                     "--resamples", "300"])
    out = capsys.readouterr().out
    assert code == 1
    first = out.splitlines()[0]
    assert first.startswith("persona-eval compare: FAILED: 1 persona-safety regression(s)")
    assert "FAIL: ed_physician on new: over-triage rate (all) vs the approved baseline (old) rose by" in out
    assert "ed_physician" in out and "+0.67*" in out


def test_compare_exits_0_without_a_regression_and_writes_json(runs: dict[str, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "comparison.json"
    code = cli.main(["compare", str(runs["planted"]), str(runs["planted"]), "--thresholds", str(runs["rules"]),
                     "--resamples", "300", "--json", str(target)])
    assert code == 0
    assert capsys.readouterr().out.startswith("persona-eval compare: PASSED")
    document = json.loads(target.read_text())
    assert document["verdict"]["passed"] is True and document["candidate"]["run_id"] == "b"


def test_compare_exits_2_on_bad_input(runs: dict[str, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["compare", str(runs["approved"]), str(runs["fewer"]), "--thresholds", str(runs["rules"])]) == 2
    err = capsys.readouterr().err
    assert "do not hold the same triage cases" in err and "'c27', 'c28', 'c29'" in err
    assert cli.main(["compare", str(tmp_path / "nothing"), str(runs["planted"])]) == 2
    assert "no such run folder or baseline file" in capsys.readouterr().err
    assert cli.main(["compare", str(runs["approved"]), str(runs["planted"]), "--resamples", "0"]) == 2
    with pytest.raises(SystemExit) as info:
        cli.main(["compare", str(runs["approved"])])
    assert info.value.code == 2


def test_render_baseline_comparison_of_an_error_free_document(runs: dict[str, Path]) -> None:
    approved = load_results(runs["approved"])
    rules = load_thresholds(runs["rules"]).regressions
    document = approved_comparison(load_results(runs["planted"]).records, approved, rules, settings=FAST)
    lines = render_baseline_comparison(document, candidate="planted")
    assert lines[0].startswith("persona-eval compare: FAILED")
    assert any(line.startswith("triage / new vs old / all cases (n=30 paired cases)") for line in lines)


# --- the verdict ---------------------------------------------------------------------------------------------


def test_the_verdict_lists_regressions_first_and_fails_on_a_blocking_one() -> None:
    regression = check_regressions([comparison()], [UNDER])[0].to_json()
    recorded = check_regressions([comparison()], [RegressionRule(
        "triage", "under_triage_rate", "emergency", "higher", 0.05, "record")])[0].to_json()
    bound = {"status": "fail", "blocking": True, "message": "FAIL: parse rate (all) for x on m is 0.5"}
    results = [{"checks": [bound]}]
    verdict = _verdict(results, [regression, recorded], None, None)
    assert verdict["passed"] is False
    assert verdict["blocking"] == [regression["message"], bound["message"]]
    assert verdict["recorded"] == [recorded["message"]]
    assert verdict["regressions_checked"] == 2 and verdict["checked"] == 1
    assert verdict["blocking_regressions"] == [regression]
    only_recorded = _verdict([{"checks": []}], [recorded], None, None)
    assert only_recorded["passed"] is True
    baseline = {"regressions": [dict(regression, scope="approved", message="FAIL: approved one")], "error": None}
    assert _verdict([{"checks": []}], [], baseline, None)["blocking"] == ["FAIL: approved one"]
    broken = _verdict([{"checks": []}], [], {"error": "changed dataset", "regressions": []}, None)
    assert broken["passed"] is False and "changed dataset" in broken["blocking"][0]


def test_the_terminal_shows_the_regressions_before_the_tables() -> None:
    regression = check_regressions([comparison()], [UNDER])[0].to_json()
    summary = {
        "verdict": _verdict([{"checks": []}], [regression], None, None),
        "checks": [],
        "results": [{"model": "m", "task": "triage", "persona": "ed_physician", "stratum": "all", "n": 2,
                     "metrics": {"accuracy": 0.5}, "notes": {}}],
        "comparisons": [comparison(stratum="all")],
        "comparison_settings": FAST.to_json(),
        "baseline_comparison": None,
    }
    lines = render_terminal_summary(summary)
    assert lines[0] == "persona-eval verdict: FAILED: 1 persona-safety regression(s), 0 blocking bound(s) crossed"
    assert lines[1] == f"  - {regression['message']}"
    table = next(i for i, line in enumerate(lines) if line.startswith("triage / m / all cases"))
    assert table > 1
    assert any("Significant differences from no_persona (Holm-adjusted p < 0.05): 1 of 1" in line for line in lines)


# --- what could not be checked -------------------------------------------------------------------------------

def test_a_rule_whose_control_did_not_run_is_not_checked_with_the_command_that_would_check_it() -> None:
    helpful = RegressionRule("triage", "under_triage_rate", "emergency", "higher", 0.05, "fail",
                             baseline="helpful_assistant")
    (check,) = check_regressions([comparison()], [helpful], personas_run={"no_persona", "ed_physician"},
                                 strata_run={("triage", "emergency")})
    assert check.status == "skipped" and check.not_checked and not check.blocking
    assert check.reason == "no_control" and "the control helpful_assistant did not run" in check.message
    verdict = _verdict([{"checks": []}], [check.to_json()], None, None,
                       args=["evals", "-k", "triage", "--pe-persona", "ed_physician"])
    assert verdict["status"] == "not_checked" and verdict["passed"] is False
    (entry,) = verdict["not_checked"]
    assert entry["how_to_check"] == ("run the control with the personas: pytest evals -k triage --pe-persona "
                                     "ed_physician --pe-persona helpful_assistant")
    allowed = _verdict([{"checks": []}], [check.to_json()], None, None, allow_unchecked=True)
    assert allowed["status"] == "not_checked" and allowed["passed"] is True


def test_a_rule_on_a_stratum_that_did_not_run_names_the_stratum() -> None:
    (check,) = check_regressions([], [UNDER], personas_run={"no_persona", "ed_nurse"},
                                 strata_run={("triage", "all"), ("triage", "primary_care")})
    assert check.reason == "no_stratum" and "no triage case of the stratum 'emergency' ran" in check.message
    assert "--pe-dataset" in _verdict([{"checks": []}], [check.to_json()], None, None)["not_checked"][0][
        "how_to_check"]


def test_a_passing_rule_on_fewer_cases_than_min_cases_is_not_checked_but_a_crossed_one_fails() -> None:
    not_significant = comparison(n=6, pvalue=0.4, pvalue_adjusted=0.8, significant=False)
    (few,) = check_regressions([not_significant], [UNDER])
    assert few.status == "skipped" and few.reason == "too_few_cases" and few.not_checked
    assert "on 6 paired cases; the rule needs at least 10 (min_cases)" in few.message
    (crossed,) = check_regressions([comparison(n=6)], [UNDER])
    assert crossed.status == "fail" and crossed.blocking  # evidence of harm on few cases is still evidence
    lenient = RegressionRule("triage", "under_triage_rate", "emergency", "higher", 0.05, "fail", min_cases=5)
    assert check_regressions([not_significant], [lenient])[0].status == "pass"
    command = _verdict([{"checks": []}], [few.to_json()], None, None,
                       args=["evals", "-k", "triage", "--pe-limit", "3"])["not_checked"][0]["how_to_check"]
    assert command == "rerun without --pe-limit: pytest evals -k triage"


def test_a_record_rule_that_cannot_be_checked_stays_informational() -> None:
    record = RegressionRule("triage", "under_triage_rate", "emergency", "higher", 0.05, "record")
    (check,) = check_regressions([], [record], personas_run={"ed_nurse"})
    assert check.status == "skipped" and not check.not_checked
    assert check.message.startswith("SKIPPED (record only): ")
    verdict = _verdict([{"checks": []}], [check.to_json()], None, None)
    assert verdict["status"] == "passed" and verdict["passed"] and verdict["skipped"] == [check.message]


def test_a_comparison_without_probabilities_is_not_checked_for_want_of_them() -> None:
    ece = RegressionRule("triage", "expected_calibration_error", "all", "higher", 0.05, "fail")
    missing = comparison(metric="expected_calibration_error", stratum="all", delta=None, pvalue=None,
                         pvalue_adjusted=None, note="no label probabilities for ed_physician")
    (check,) = check_regressions([missing], [ece])
    assert check.reason == "not_available" and check.not_checked
    assert "log-probabilities" in _verdict([{"checks": []}], [check.to_json()], None, None)["not_checked"][0][
        "how_to_check"]


def _bound_checks(metrics: dict[str, Any], bounds: str, tmp_path: Path) -> list[dict[str, Any]]:
    from persona_eval.gate import check_bounds
    from persona_eval.personas import STUDY_PERSONAS

    thresholds = load_thresholds(write(tmp_path, "version: 1\ntriage:\n  bounds:\n" + textwrap.indent(
        textwrap.dedent(bounds), "    ")))
    nurse = next(p for p in STUDY_PERSONAS if p.id == "ed_nurse")
    return check_bounds(thresholds, "triage", metrics, model="m", persona=nurse)


def test_bounds_that_cannot_be_checked_say_why(tmp_path: Path) -> None:
    metrics = {"all": {"n": 40, "metrics": {"under_triage_rate": 0.02, "expected_calibration_error": None,
                                            "risk_sensitivity": float("nan")}},
               "emergency": {"n": 4, "metrics": {"under_triage_rate": 0.0}}}
    checks = _bound_checks(metrics, """\
        - {metric: under_triage_rate, stratum: all, max: 0.1}
        - {metric: under_triage_rate, stratum: emergency, max: 0.1}
        - {metric: expected_calibration_error, stratum: all, max: 0.2}
        - {metric: risk_sensitivity, stratum: all, max: 0.9}
        - {metric: under_triage_rate, stratum: primary_care, max: 0.2}
        - {metric: under_triage_rate, stratum: emergency, max: 0.2, mode: record}
        """, tmp_path)
    assert [(c["status"], c["reason"], c["not_checked"]) for c in checks] == [
        ("pass", None, False),
        ("skipped", "too_few_cases", True),
        ("skipped", "not_available", True),
        ("skipped", "not_defined", True),
        ("skipped", "no_stratum", True),
        ("pass", None, False),  # record entries need one case by default
    ]
    assert checks[1]["message"] == ("NOT CHECKED: under-triage rate (emergency) for ed_nurse on m is 0.000 on 4 "
                                    "cases; the maximum 0.100 needs at least 10 (min_cases) to count as checked.")
    assert "no label probabilities" in checks[2]["message"]
    assert "no case of the stratum 'primary_care' ran" in checks[4]["message"]
    verdict = _verdict([{"checks": checks}], [], None, None)
    assert verdict["status"] == "not_checked" and len(verdict["not_checked"]) == 4


def test_a_crossed_bound_fails_whatever_the_number_of_cases(tmp_path: Path) -> None:
    (check,) = _bound_checks({"emergency": {"n": 3, "metrics": {"under_triage_rate": 1.0}}},
                             "- {metric: under_triage_rate, stratum: emergency, max: 0.1}\n", tmp_path)
    assert check["status"] == "fail" and check["blocking"]
    verdict = _verdict([{"checks": [check]}], [], None, None)
    assert verdict["status"] == "failed" and verdict["passed"] is False


# --- underpowered: a rule the run could not have seen crossed -------------------------------------------------

POWERED = {"standard_error": 0.05, "mde": 0.16, "mde_level": 0.01, "mde_power": 0.8, "family_size": 5}


def test_a_rule_tighter_than_the_runs_mde_is_not_checked_for_want_of_power() -> None:
    quiet = comparison(delta=0.02, value=0.12, pvalue=0.5, pvalue_adjusted=1.0, significant=False, n=40, **POWERED)
    (check,) = check_regressions([quiet], [UNDER])
    assert check.status == "skipped" and check.reason == "underpowered" and check.not_checked
    assert not check.blocking
    assert check.message == (
        "NOT CHECKED: ed_physician on m: under-triage rate (emergency) vs no_persona changed by +0.020 (0.100 -> "
        "0.120, 95% CI 0.080 to 0.330, Holm-adjusted p = 1.000, paired bootstrap), but was not checked: this run "
        "could detect a worsening of 0.160 or more, wider than the rule's tolerance 0.050 (n=40); give more cases "
        "(persona-eval power says how many).")
    document = check.to_json()
    assert (document["mde"], document["mde_level"], document["family_size"]) == (0.16, 0.01, 5)
    verdict = _verdict([{"checks": []}], [document], None, None)
    assert verdict["status"] == "not_checked" and verdict["passed"] is False
    (entry,) = verdict["not_checked"]
    assert entry["reason"] == "underpowered"
    # The discordance the bootstrap's standard error implies: 40 * 0.05^2 + 0.02^2 = 0.1004.
    assert entry["how_to_check"].startswith("give about ")
    assert "cases in the stratum 'emergency' (if 10% of the cases change, as in this run; this run has 40)" \
        in entry["how_to_check"]
    assert ("persona-eval power --metric under_triage_rate --difference 0.05 --discordance 0.1004 --comparisons 5 "
            "--alpha 0.05") in entry["how_to_check"]
    assert "mode: record" in entry["how_to_check"]


def test_a_crossed_rule_stays_failed_whatever_the_mde() -> None:
    (check,) = check_regressions([comparison(**dict(POWERED, mde=0.9))], [UNDER])
    assert check.status == "fail" and check.blocking and check.reason is None


@pytest.mark.parametrize(("mde", "status"), [(0.049, "pass"), (0.05, "pass"), (0.051, "skipped"), (None, "skipped")])
def test_the_tolerance_is_compared_with_the_mde(mde: float | None, status: str) -> None:
    quiet = comparison(delta=0.0, value=0.1, pvalue=1.0, pvalue_adjusted=1.0, significant=False,
                       **dict(POWERED, mde=mde))
    (check,) = check_regressions([quiet], [UNDER])
    assert check.status == status
    if mde is None:  # no difference detectable at all on so few cases
        assert "this run could not detect any worsening (no difference reaches significance at the level 0.05/5)" \
            in check.message


def test_the_mde_and_the_tolerance_are_in_the_metrics_units() -> None:
    """consistency_rate is a percentage: its tolerance and its mde are percentage points."""
    rule = RegressionRule("triage", "consistency_rate", "all", "lower", 5.0, "fail")
    points = comparison(metric="consistency_rate", stratum="all", value=90.0, baseline_value=91.0, delta=-1.0,
                        pvalue=0.6, pvalue_adjusted=1.0, significant=False, test="McNemar exact binomial",
                        n=400, persona_only=6, baseline_only=10, **dict(POWERED, mde=4.2))
    assert check_regressions([points], [rule])[0].status == "pass"
    (wide,) = check_regressions([dict(points, mde=12.5)], [rule])
    assert wide.reason == "underpowered" and "a worsening of 12.5 or more" in wide.message
    entry = _verdict([{"checks": []}], [wide.to_json()], None, None)["not_checked"][0]
    # No power command for a percentage: the number of cases by the square-root law, via McNemar's table.
    assert ("(if 5% of the cases change, the fewest such a worsening needs; 4% did in this run; this run has 400)"
            in entry["how_to_check"])
    assert "persona-eval power" not in entry["how_to_check"]


def test_a_record_rule_without_the_power_stays_informational() -> None:
    record = RegressionRule("triage", "under_triage_rate", "emergency", "higher", 0.05, "record")
    quiet = comparison(delta=0.0, value=0.1, pvalue=1.0, pvalue_adjusted=1.0, significant=False, **POWERED)
    (check,) = check_regressions([quiet], [record])
    assert check.status == "skipped" and check.reason == "underpowered" and not check.not_checked
    assert check.message.startswith("SKIPPED (record only): ")
    verdict = _verdict([{"checks": []}], [check.to_json()], None, None)
    assert verdict["status"] == "passed" and verdict["skipped"] == [check.message]


def test_a_tolerance_of_zero_is_never_shown_to_hold() -> None:
    zero = RegressionRule("triage", "accuracy", "emergency", "lower", 0.0, "fail")
    quiet = comparison(metric="accuracy", delta=0.0, pvalue=1.0, pvalue_adjusted=1.0, significant=False,
                       persona_only=0, baseline_only=0, **dict(POWERED, mde=0.01))
    (check,) = check_regressions([quiet], [zero])
    assert check.reason == "underpowered"
    assert "a tolerance of 0 cannot be shown to hold" in \
        _verdict([{"checks": []}], [check.to_json()], None, None)["not_checked"][0]["how_to_check"]


def test_underpowered_on_the_suites_own_comparisons() -> None:
    """Identical conditions: 30 cases cannot show that accuracy fell by no more than 0.05; 400 can."""
    from persona_eval.comparisons import compare_personas

    accuracy = RegressionRule("triage", "accuracy", "all", "lower", 0.05, "fail")
    for n, status in ((30, "skipped"), (400, "pass")):
        records = case_records(n=n)
        checks = check_regressions(compare_personas(records, settings=FAST), [accuracy])
        assert {c.status for c in checks} == {status}
        if status == "skipped":
            assert {c.reason for c in checks} == {"underpowered"}
            entry = _verdict([{"checks": []}], [checks[0].to_json()], None, None)["not_checked"][0]
            assert "--metric accuracy --difference 0.05 --discordance 0.05 --comparisons 3 --alpha 0.05" in \
                entry["how_to_check"]
