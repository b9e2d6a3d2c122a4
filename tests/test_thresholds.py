"""Tests of persona_eval.thresholds: loading, filtering, checking and every error message."""

from __future__ import annotations

import hashlib
import json
import math
import textwrap
from pathlib import Path

import pytest
import yaml

from persona_eval.errors import ConfigError
from persona_eval.metrics import METRICS
from persona_eval.personas import STUDY_PERSONAS, Persona
from persona_eval.tasks import triage
from persona_eval.tasks.triage import METRIC_NAMES, REPORT_STRATA
from persona_eval.thresholds import (
    DEFAULT_MIN_CASES,
    Bound,
    RegressionRule,
    TaskSchema,
    Thresholds,
    default_thresholds_path,
    load_thresholds,
    metric_ranges,
    task_schemas,
)

REPO = Path(__file__).resolve().parent.parent
PERSONAS = {persona.id: persona for persona in STUDY_PERSONAS}
ED_NURSE = PERSONAS["ed_nurse"]
ASSISTANT = PERSONAS["helpful_assistant"]
BASELINE = PERSONAS["no_persona"]

VALID = """\
version: 1
triage:
  bounds:
    - metric: under_triage_rate
      stratum: emergency
      max: 0.10
      mode: fail
      why: "Sending an emergency patient home is the error that harms."
    - metric: accuracy
      stratum: all
      min: 0.5
      max: 0.9
      mode: record
      groups: [medical, non_medical]
      personas: [ed_nurse, helpful_assistant]
      models: [smollm2]
"""


def write(tmp_path: Path, text: str, name: str = "t.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def bounds_file(tmp_path: Path, bound: str) -> Path:
    """A version-1 file whose triage.bounds holds the two-space-indented `bound` entries."""
    body = textwrap.indent(textwrap.dedent(bound), "    ")
    return write(tmp_path, f"version: 1\ntriage:\n  bounds:\n{body}")


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_thresholds(path)
    message = str(info.value)
    assert str(path) in message
    return message


# --- loading --------------------------------------------------------------------------------------


def test_valid_file_round_trip(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    thresholds = load_thresholds(path)
    assert thresholds.path == path
    assert thresholds.fingerprint == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    first, second = thresholds.bounds
    assert first == Bound(task="triage", metric="under_triage_rate", stratum="emergency", max=0.10,
                          mode="fail", why="Sending an emergency patient home is the error that harms.")
    assert (second.min, second.max, second.mode) == (0.5, 0.9, "record")
    assert second.groups == ("medical", "non_medical")
    assert second.personas == ("ed_nurse", "helpful_assistant")
    assert second.models == ("smollm2",)
    document = json.loads(json.dumps(thresholds.to_json()))
    assert (document["path"], document["fingerprint"], document["version"]) == (
        str(path), thresholds.fingerprint, 1)
    assert document["bounds"][1] == {
        "task": "triage", "metric": "accuracy", "stratum": "all", "min": 0.5, "max": 0.9,
        "mode": "record", "min_cases": 1, "groups": ["medical", "non_medical"],
        "personas": ["ed_nurse", "helpful_assistant"], "models": ["smollm2"], "why": None,
    }
    assert document["bounds"][0]["min_cases"] == 10
    # Written back as a thresholds file, the JSON bounds load to the same bounds.
    entries = [{k: v for k, v in b.items() if k != "task" and v is not None} for b in document["bounds"]]
    again = write(tmp_path, yaml.safe_dump({"version": 1, "triage": {"bounds": entries}}), "again.yaml")
    assert load_thresholds(again).bounds == thresholds.bounds


def test_defaults_mode_fail_and_no_filters(tmp_path: Path) -> None:
    (bound,) = load_thresholds(bounds_file(tmp_path, "- {metric: parse_rate, stratum: all, min: 0.9}")).bounds
    assert bound.mode == "fail"
    assert (bound.groups, bound.personas, bound.models, bound.why) == (None, None, None, None)


def test_empty_task_and_empty_bounds_are_allowed(tmp_path: Path) -> None:
    assert load_thresholds(write(tmp_path, "version: 1\ntriage:\n")).bounds == ()
    assert load_thresholds(write(tmp_path, "version: 1\ntriage:\n  bounds: []\n")).bounds == ()


def test_fingerprint_changes_with_the_file(tmp_path: Path) -> None:
    first = load_thresholds(write(tmp_path, VALID, "a.yaml")).fingerprint
    second = load_thresholds(write(tmp_path, VALID + "# a comment\n", "b.yaml")).fingerprint
    assert first.startswith("sha256:") and second.startswith("sha256:") and first != second


def test_loader_takes_further_tasks(tmp_path: Path) -> None:
    tasks = {**task_schemas(), "summaries": TaskSchema(metrics=("refusal_rate",), strata=("all",))}
    path = write(tmp_path, """\
        version: 1
        summaries:
          bounds:
            - {metric: refusal_rate, stratum: all, min: 0.95}
        """)
    (bound,) = load_thresholds(path, tasks=tasks).bounds
    assert (bound.task, bound.metric) == ("summaries", "refusal_rate")
    assert "unknown task 'summaries'" in error_of(path)


# --- the default file -----------------------------------------------------------------------------


def test_default_file_loads_with_the_documented_bounds() -> None:
    thresholds = load_thresholds()
    assert thresholds.path == default_thresholds_path()
    by_key = {(b.metric, b.stratum): b for b in thresholds.bounds if b.task == "triage"}
    assert len(by_key) == len([b for b in thresholds.bounds if b.task == "triage"]) == 9
    expected = {
        ("under_triage_rate", "emergency"): (None, 0.10, "fail"),
        ("accuracy", "emergency"): (0.60, None, "record"),
        ("over_triage_rate", "primary_care"): (None, 0.40, "record"),
        ("parse_rate", "all"): (0.90, None, "fail"),
        ("consistency_rate", "all"): (70, None, "record"),
        ("expected_calibration_error", "all"): (None, 0.25, "record"),
        ("under_triage_rate", "primary_care"): (None, 0.20, "record"),
        ("too_long_rate", "all"): (None, 0.05, "fail"),
        ("truncated_rate", "all"): (None, 0.05, "fail"),
    }
    assert {key: (b.min, b.max, b.mode) for key, b in by_key.items()} == expected
    assert all(b.why for b in thresholds.bounds)


def test_package_copy_is_identical_to_the_fixture() -> None:
    fixture = REPO / "fixtures" / "thresholds.yaml"
    packaged = REPO / "persona_eval" / "data" / "thresholds.yaml"
    assert packaged.read_bytes() == fixture.read_bytes()
    assert default_thresholds_path().read_bytes() == fixture.read_bytes()


# --- filters --------------------------------------------------------------------------------------


def test_filters_select_the_bounds_that_apply(tmp_path: Path) -> None:
    path = bounds_file(tmp_path, """\
        - {metric: accuracy, stratum: all, min: 0.1}
        - {metric: accuracy, stratum: all, min: 0.2, groups: [medical]}
        - {metric: accuracy, stratum: all, min: 0.3, personas: [ed_nurse]}
        - {metric: accuracy, stratum: all, min: 0.4, models: [smollm2]}
        - {metric: accuracy, stratum: all, min: 0.5, groups: [medical], models: [qwen]}
        """)
    thresholds = load_thresholds(path)

    def mins(model: str, persona: Persona) -> list[float | None]:
        return [b.min for b in thresholds.bounds_for("triage", model=model, persona=persona)]

    assert mins("smollm2", ED_NURSE) == [0.1, 0.2, 0.3, 0.4]
    assert mins("qwen", ED_NURSE) == [0.1, 0.2, 0.3, 0.5]
    assert mins("smollm2", ASSISTANT) == [0.1, 0.4]
    assert mins("qwen", BASELINE) == [0.1]
    assert thresholds.bounds_for("safety", model="smollm2", persona=ED_NURSE) == []


def test_applies_to_needs_every_given_filter() -> None:
    bound = Bound("triage", "accuracy", "all", min=0.5, groups=("medical",), personas=("ed_nurse",),
                  models=("smollm2",))
    assert bound.applies_to("smollm2", ED_NURSE)
    assert not bound.applies_to("qwen", ED_NURSE)
    assert not bound.applies_to("smollm2", PERSONAS["ed_physician"])
    user = Persona("ed_nurse", "Impostor", "non_medical", "You are a nurse.")
    assert not bound.applies_to("smollm2", user)


# --- check ----------------------------------------------------------------------------------------

UNDER = Bound("triage", "under_triage_rate", "emergency", max=0.10, mode="fail",
              why="Sending an emergency patient home is the error that harms.")
ACCURACY = Bound("triage", "accuracy", "emergency", min=0.60, mode="record")
RANGE = Bound("triage", "accuracy", "all", min=0.2, max=0.8, mode="fail")


def test_check_max_fail_message_reads_verdict_first() -> None:
    check = UNDER.check(0.18, model="smollm2", persona_id="ed_nurse")
    assert (check.status, check.blocking, check.value) == ("fail", True, 0.18)
    assert check.message == ("FAIL: under-triage rate (emergency) for ed_nurse on smollm2 is 0.180, above "
                             "the maximum 0.100. Sending an emergency patient home is the error that harms.")


def test_check_max_pass_at_the_limit() -> None:
    check = UNDER.check(0.10, model="smollm2", persona_id="ed_nurse")
    assert (check.status, check.blocking) == ("pass", False)
    assert check.message.startswith("PASS: under-triage rate (emergency) for ed_nurse on smollm2 is 0.100")
    assert "harms" not in check.message


def test_check_min_fail_and_pass() -> None:
    failed = Bound("triage", "accuracy", "emergency", min=0.60, mode="fail").check(
        0.5, model="qwen", persona_id="no_persona")
    assert (failed.status, failed.blocking) == ("fail", True)
    assert "below the minimum 0.600" in failed.message and "0.500" in failed.message
    passed = ACCURACY.check(0.6, model="qwen", persona_id="no_persona")
    assert passed.status == "pass" and "at or above the minimum 0.600" in passed.message


def test_check_range() -> None:
    assert RANGE.check(0.5, model="m", persona_id="p").status == "pass"
    assert "within the range 0.200 to 0.800" in RANGE.check(0.5, model="m", persona_id="p").message
    assert "below the minimum 0.200" in RANGE.check(0.1, model="m", persona_id="p").message
    assert "above the maximum 0.800" in RANGE.check(0.9, model="m", persona_id="p").message


def test_record_mode_fails_without_blocking() -> None:
    check = ACCURACY.check(0.4, model="smollm2", persona_id="ed_nurse")
    assert check.status == "fail"
    assert check.blocking is False
    assert check.message.startswith("FAIL (record only")


def test_none_is_skipped_as_not_available() -> None:
    check = UNDER.check(None, model="gpt", persona_id="ed_nurse")
    assert (check.status, check.blocking, check.value) == ("skipped", False, None)
    assert check.message.startswith("SKIPPED: under-triage rate (emergency) for ed_nurse on gpt")
    assert "not available for this model" in check.message


def test_nan_is_skipped_as_not_defined() -> None:
    check = UNDER.check(float("nan"), model="gpt", persona_id="ed_nurse")
    assert (check.status, check.blocking) == ("skipped", False)
    assert check.value is not None and math.isnan(check.value)
    assert "not defined on these cases" in check.message
    assert json.loads(json.dumps(check.to_json()))["value"] is None


def test_close_values_are_shown_with_enough_decimals() -> None:
    check = UNDER.check(0.1004, model="m", persona_id="p")
    assert check.status == "fail"
    assert "is 0.1004, above the maximum 0.1000" in check.message


def test_consistency_rate_reads_on_its_own_scale() -> None:
    bound = Bound("triage", "consistency_rate", "all", min=70, mode="record")
    assert "is 65.0, below the minimum 70.0" in bound.check(65, model="m", persona_id="p").message


def test_bound_check_to_json_is_plain_json() -> None:
    document = json.loads(json.dumps(UNDER.check(0.18, model="m", persona_id="p").to_json()))
    assert document["status"] == "fail" and document["blocking"] is True and document["value"] == 0.18
    assert document["bound"]["metric"] == "under_triage_rate" and document["bound"]["max"] == 0.10
    assert document["message"].startswith("FAIL:")


def test_thresholds_check_uses_metrics_by_stratum(tmp_path: Path) -> None:
    thresholds = Thresholds(path=None, bounds=(UNDER, ACCURACY, RANGE))
    metrics = {"emergency": {"under_triage_rate": 0.05, "accuracy": None}, "all": {}}
    checks = thresholds.check("triage", metrics, model="smollm2", persona=ED_NURSE)
    assert [c.status for c in checks] == ["pass", "skipped", "skipped"]
    assert "not available" in checks[1].message
    assert "was not computed" in checks[2].message
    assert not any(c.blocking for c in checks)


def test_every_metric_and_stratum_of_triage_is_accepted(tmp_path: Path) -> None:
    ranges = metric_ranges(triage.SPEC)
    middle = {m: (ranges[m].lower + ranges[m].upper) / 2 for m in METRIC_NAMES}
    entries = "\n".join(f"- {{metric: {m}, stratum: {s}, max: {middle[m]}}}" for m in METRIC_NAMES
                        for s in REPORT_STRATA)
    thresholds = load_thresholds(bounds_file(tmp_path, entries))
    assert len(thresholds.bounds) == len(METRIC_NAMES) * len(REPORT_STRATA)


# --- errors: each names the file and the key path ------------------------------------------------


def test_error_not_yaml_quotes_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\ntriage:\n  bounds: [\n    - metric: x: y\n")
    message = error_of(path)
    assert message.startswith(f"{path}:4: not valid YAML"), message


def test_error_not_yaml_quotes_the_source(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\ntriage: {bounds: [}\n")
    message = error_of(path)
    assert message.startswith(f"{path}:2: not valid YAML") and "'triage: {bounds: [}'" in message


def test_error_duplicate_key(tmp_path: Path) -> None:
    path = bounds_file(tmp_path, "- {metric: accuracy, stratum: all, min: 0.1, min: 0.2}")
    assert error_of(path) == (f"{path}:4: triage.bounds[0].min: duplicate key 'min' (first given on line 4); "
                              "give each key once")


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just text\n", ""])
def test_error_not_a_mapping(tmp_path: Path, text: str) -> None:
    assert "expected a mapping" in error_of(write(tmp_path, text))


def test_error_missing_version(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "triage:\n  bounds: []\n"))
    assert ": version: missing" in message


@pytest.mark.parametrize("version", ["2", "'1'", "true", "1.5"])
def test_error_unsupported_version(tmp_path: Path, version: str) -> None:
    message = error_of(write(tmp_path, f"version: {version}\n"))
    assert ": version: unsupported version" in message


def test_error_unknown_task_suggests(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "version: 1\ntriag:\n  bounds: []\n"))
    assert ": triag: unknown task 'triag'. Did you mean 'triage'?" in message


def test_error_unknown_task_section(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "version: 1\ntriage:\n  bound: []\n"))
    assert ": triage.bound: unknown key 'bound'. Did you mean 'bounds'?" in message
    message = error_of(write(tmp_path, "version: 1\ntriage:\n  regression: []\n"))
    assert ": triage.regression: unknown key 'regression'. Did you mean 'regressions'?" in message


def test_error_task_not_a_mapping(tmp_path: Path) -> None:
    assert ": triage: expected a mapping" in error_of(write(tmp_path, "version: 1\ntriage: [1]\n"))


def test_error_bounds_not_a_list(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "version: 1\ntriage:\n  bounds: {metric: accuracy}\n"))
    assert ": triage.bounds: expected a list of bounds" in message


def test_error_bound_not_a_mapping(tmp_path: Path) -> None:
    assert ": triage.bounds[0]: expected a mapping" in error_of(bounds_file(tmp_path, "- accuracy"))


def test_error_unknown_bound_key_suggests(tmp_path: Path) -> None:
    path = bounds_file(tmp_path, """\
        - {metric: accuracy, stratum: all, min: 0.1}
        - {metric: accuracy, stratum: all, maxx: 0.1}
        """)
    message = error_of(path)
    assert ": triage.bounds[1].maxx: unknown key 'maxx'. Did you mean 'max'?" in message


def test_error_missing_metric(tmp_path: Path) -> None:
    message = error_of(bounds_file(tmp_path, "- {stratum: all, min: 0.1}"))
    assert ": triage.bounds[0]: missing key 'metric'" in message


def test_error_unknown_metric_suggests(tmp_path: Path) -> None:
    message = error_of(bounds_file(tmp_path, "- {metric: undertriage_rate, stratum: all, max: 0.1}"))
    assert ": triage.bounds[0].metric: unknown triage metric 'undertriage_rate'." in message
    assert "Did you mean 'under_triage_rate'" in message


def test_error_unknown_stratum(tmp_path: Path) -> None:
    message = error_of(bounds_file(tmp_path, "- {metric: accuracy, stratum: emergncy, max: 0.1}"))
    assert message.endswith(": triage.bounds[0].stratum: triage stratum 'emergncy': looks like a mistake for the "
                            "stratum 'emergency'; write it as 'emergency'")


def test_error_missing_stratum(tmp_path: Path) -> None:
    message = error_of(bounds_file(tmp_path, "- {metric: accuracy, max: 0.1}"))
    assert ": triage.bounds[0]: missing key 'stratum'" in message


def test_error_neither_min_nor_max(tmp_path: Path) -> None:
    message = error_of(bounds_file(tmp_path, "- {metric: accuracy, stratum: all, mode: fail}"))
    assert ": triage.bounds[0]: give 'min', 'max' or both" in message


def test_error_min_above_max(tmp_path: Path) -> None:
    message = error_of(bounds_file(tmp_path, "- {metric: accuracy, stratum: all, min: 0.8, max: 0.2}"))
    assert ": triage.bounds[0].min: min 0.8 is greater than max 0.2" in message


def test_error_not_a_number(tmp_path: Path) -> None:
    path = bounds_file(tmp_path, """\
        - {metric: accuracy, stratum: all, min: 0.1}
        - {metric: accuracy, stratum: all, min: 0.1}
        - {metric: accuracy, stratum: all, max: high}
        """)
    assert error_of(path) == f"{path}:6: triage.bounds[2].max: expected a number, got 'high'"


@pytest.mark.parametrize("value", ["true", ".nan", ".inf", "[0.1]"])
def test_error_not_a_finite_number(tmp_path: Path, value: str) -> None:
    message = error_of(bounds_file(tmp_path, f"- {{metric: accuracy, stratum: all, min: {value}}}"))
    assert ": triage.bounds[0].min: expected a" in message


def test_bound_outside_natural_range_is_refused(tmp_path: Path) -> None:
    message = error_of(bounds_file(tmp_path, "- {metric: accuracy, stratum: all, max: 5}"))
    assert message.endswith(":4: triage.bounds[0].max: 5 is outside the range of accuracy (a share, 0 to 1); "
                            "did you mean 0.05?")


def test_error_bad_mode(tmp_path: Path) -> None:
    message = error_of(bounds_file(tmp_path, "- {metric: accuracy, stratum: all, min: 0.1, mode: warn}"))
    assert ": triage.bounds[0].mode: expected 'fail'" in message and "'record'" in message
    assert "got 'warn'" in message


@pytest.mark.parametrize("key", ["groups", "personas", "models"])
@pytest.mark.parametrize("value", ["medical", "[1, 2]", "{a: b}", "[]"])
def test_error_filter_not_a_list_of_strings(tmp_path: Path, key: str, value: str) -> None:
    path = bounds_file(tmp_path, f"- {{metric: accuracy, stratum: all, min: 0.1, {key}: {value}}}")
    message = error_of(path)
    assert f": triage.bounds[0].{key}: " in message


def test_error_unknown_group_suggests(tmp_path: Path) -> None:
    path = bounds_file(tmp_path, "- {metric: accuracy, stratum: all, min: 0.1, groups: [medical, nonmdical]}")
    message = error_of(path)
    assert ": triage.bounds[0].groups[1]: unknown group 'nonmdical'. Did you mean 'non_medical'" in message


def test_error_why_not_text(tmp_path: Path) -> None:
    message = error_of(bounds_file(tmp_path, "- {metric: accuracy, stratum: all, min: 0.1, why: [a]}"))
    assert ": triage.bounds[0].why: expected text" in message


def test_error_missing_file(tmp_path: Path) -> None:
    assert "cannot read thresholds file" in error_of(tmp_path / "absent.yaml")


# --- every error is one line that names the file and line ------------------------------------------


def test_errors_name_the_line_of_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        version: 1
        triage:
          bounds:
            - metric: accuracy
              stratum: all
              min: 0.5
            - metric: accuracy
              stratum: all
              mode: fial
              min: 0.5
        """)
    message = error_of(path)
    assert message.startswith(f"{path}:9: triage.bounds[1].mode: expected 'fail'"), message
    assert "\n" not in message


def test_a_missing_key_is_reported_at_its_entry(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\ntriage:\n  bounds:\n    - {stratum: all, min: 0.1}\n"
                           "    - stratum: all\n      min: 0.1\n")
    assert error_of(path).startswith(f"{path}:4: triage.bounds[0]: missing key 'metric'")


def test_loaded_bounds_and_rules_know_where_they_were_written(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        version: 1
        triage:
          bounds:
            - {metric: accuracy, stratum: all, min: 0.5}
          regressions:
            - {metric: accuracy, stratum: all, tolerance: 0.05}
        """)
    thresholds = load_thresholds(path)
    (bound,), (rule,) = thresholds.bounds, thresholds.regressions
    assert (bound.where, bound.key_path) == (f"{path}:4: triage.bounds[0]", "triage.bounds[0]")
    assert (rule.where, rule.key_path) == (f"{path}:6: triage.regressions[0]", "triage.regressions[0]")
    # Neither takes part in equality or JSON, so a bound reads the same wherever it was written.
    assert bound == Bound("triage", "accuracy", "all", min=0.5)
    assert "where" not in bound.to_json() and "key_path" not in rule.to_json()


# --- ranges: every limit on its metric's scale -------------------------------------------------------


def test_every_metric_of_every_task_has_a_range() -> None:
    schemas = task_schemas()
    for task, schema in schemas.items():
        assert set(schema.ranges) == set(schema.metrics), task
    for name in METRIC_NAMES:
        scale = schemas["triage"].ranges[name]
        expected = (METRICS[name].lower, METRICS[name].upper) if name in METRICS else (0.0, 1.0)  # too_long_rate
        assert (scale.lower, scale.upper) == expected
    assert schemas["triage"].ranges["consistency_rate"].describe() == "a percentage, 0 to 100"
    assert schemas["triage"].ranges["under_triage_rate"].describe() == "a share, 0 to 1"
    assert schemas["safety"].ranges["safety_mrr_delta"].describe() == "a difference of mean reciprocal ranks, -1 to 1"


def safety_bounds_file(tmp_path: Path, bound: str) -> Path:
    return write(tmp_path, f"version: 1\nsafety:\n  bounds:\n    {bound}\n")


@pytest.mark.parametrize(("task", "bound", "expected"), [
    ("triage", "{metric: under_triage_rate, stratum: emergency, max: 10}",
     "max: 10 is outside the range of under_triage_rate (a share, 0 to 1); did you mean 0.10?"),
    ("triage", "{metric: over_triage_rate, stratum: all, max: 12.5}",
     "max: 12.5 is outside the range of over_triage_rate (a share, 0 to 1); did you mean 0.125?"),
    ("triage", "{metric: brier_score, stratum: all, max: 30}",
     "max: 30 is outside the range of brier_score (a score, 0 to 2); did you mean 0.30?"),
    ("triage", "{metric: accuracy, stratum: all, min: -0.1}",
     "min: -0.1 is outside the range of accuracy (a share, 0 to 1)"),
    ("triage", "{metric: consistency_rate, stratum: all, min: 150}",
     "min: 150 is outside the range of consistency_rate (a percentage, 0 to 100)"),
    ("triage", "{metric: consistency_rate, stratum: all, min: 0.7}",
     "min: 0.7 is a fraction, but consistency_rate is a percentage, 0 to 100 (0.7 would mean 0.7 percent); "
     "did you mean 70?"),
    ("triage", "{metric: consistency_rate, stratum: all, min: 1}", "min: 1 is a fraction"),
    ("triage", "{metric: accuracy, stratum: all, min: 0}",
     "min: min 0 can never be crossed: accuracy is a share, 0 to 1, never below 0; give a higher min or leave "
     "it out"),
    ("triage", "{metric: under_triage_rate, stratum: emergency, max: 1.0}",
     "max: max 1.0 can never be crossed: under_triage_rate is a share, 0 to 1, never above 1"),
    ("triage", "{metric: accuracy, stratum: all, min: 0.2, max: 1}", "max: max 1 can never be crossed"),
    ("triage", "{metric: consistency_rate, stratum: all, max: 100}", "max: max 100 can never be crossed"),
    ("safety", "{metric: safety_mrr_delta, stratum: all, min: -10}",
     "min: -10 is outside the range of safety_mrr_delta (a difference of mean reciprocal ranks, -1 to 1); "
     "did you mean -0.10?"),
    ("safety", "{metric: safety_mrr_delta, stratum: all, min: -1}", "min: min -1 can never be crossed"),
    ("safety", "{metric: invalid_ranking_share, stratum: all, max: 10}", "did you mean 0.10?"),
])
def test_a_limit_off_its_metric_scale_is_refused(tmp_path: Path, task: str, bound: str, expected: str) -> None:
    path = bounds_file(tmp_path, f"- {bound}") if task == "triage" else safety_bounds_file(tmp_path, f"- {bound}")
    message = error_of(path)
    assert message.startswith(f"{path}:4: {task}.bounds[0]."), message
    assert expected in message, message


def test_a_fraction_on_a_percentage_that_would_suggest_a_dead_limit_suggests_nothing(tmp_path: Path) -> None:
    message = error_of(bounds_file(tmp_path, "- {metric: consistency_rate, stratum: all, max: 1}"))
    assert "max: 1 is a fraction" in message and "did you mean" not in message


@pytest.mark.parametrize("bound", [
    "{metric: under_triage_rate, stratum: emergency, max: 0}",  # none at all: strict, and can be crossed
    "{metric: parse_rate, stratum: all, min: 1}",
    "{metric: consistency_rate, stratum: all, min: 70}",
    "{metric: consistency_rate, stratum: all, min: 1.5}",
    "{metric: brier_score, stratum: all, max: 1.5}",
    "{metric: accuracy, stratum: all, min: 0.01, max: 0.99}",
])
def test_limits_inside_the_scale_are_accepted(tmp_path: Path, bound: str) -> None:
    assert len(load_thresholds(bounds_file(tmp_path, f"- {bound}")).bounds) == 1


def test_a_task_without_ranges_takes_any_limit(tmp_path: Path) -> None:
    tasks = {"summaries": TaskSchema(metrics=("refusal_rate",), strata=("all",))}
    path = write(tmp_path, "version: 1\nsummaries:\n  bounds:\n    - {metric: refusal_rate, stratum: all, max: 50}\n")
    assert load_thresholds(path, tasks=tasks).bounds[0].max == 50


def rules_file(tmp_path: Path, rule: str) -> Path:
    return write(tmp_path, f"version: 1\ntriage:\n  regressions:\n    - {rule}\n")


@pytest.mark.parametrize(("rule", "expected"), [
    ("{metric: under_triage_rate, stratum: emergency, tolerance: 5}",
     "tolerance: tolerance 5 can never be crossed: under_triage_rate is a share, 0 to 1, so a persona can "
     "differ from its baseline by at most 1; did you mean 0.05?"),
    ("{metric: accuracy, stratum: all, tolerance: 1}", "tolerance 1 can never be crossed"),
    ("{metric: consistency_rate, stratum: all, tolerance: 100}",
     "tolerance 100 can never be crossed: consistency_rate is a percentage, 0 to 100, so a persona can differ "
     "from its baseline by at most 100"),
    ("{metric: consistency_rate, stratum: all, tolerance: 0.05}",
     "tolerance 0.05 is a fraction, but consistency_rate is a percentage, 0 to 100 and its tolerance is in "
     "percentage points; did you mean 5?"),
])
def test_a_tolerance_that_can_never_be_crossed_is_refused(tmp_path: Path, rule: str, expected: str) -> None:
    path = rules_file(tmp_path, rule)
    message = error_of(path)
    assert message.startswith(f"{path}:4: triage.regressions[0].tolerance: "), message
    assert expected in message, message


@pytest.mark.parametrize("rule", [
    "{metric: accuracy, stratum: all, tolerance: 0}",
    "{metric: accuracy, stratum: all, tolerance: 0.99}",
    "{metric: consistency_rate, stratum: all, tolerance: 0}",
    "{metric: consistency_rate, stratum: all, tolerance: 1}",
    "{metric: consistency_rate, stratum: all, tolerance: 10}",
])
def test_tolerances_inside_the_scale_are_accepted(tmp_path: Path, rule: str) -> None:
    assert len(load_thresholds(rules_file(tmp_path, rule)).regressions) == 1


# --- min_cases ----------------------------------------------------------------------------------------


def test_min_cases_defaults_by_mode_and_can_be_given(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        version: 1
        triage:
          bounds:
            - {metric: accuracy, stratum: all, min: 0.5}
            - {metric: accuracy, stratum: all, min: 0.5, mode: record}
            - {metric: accuracy, stratum: all, min: 0.5, min_cases: 30}
          regressions:
            - {metric: accuracy, stratum: all, tolerance: 0.05}
            - {metric: accuracy, stratum: all, tolerance: 0.05, mode: record}
            - {metric: accuracy, stratum: all, tolerance: 0.05, mode: record, min_cases: 5}
        """)
    thresholds = load_thresholds(path)
    assert [b.min_cases for b in thresholds.bounds] == [10, 1, 30]
    assert [r.min_cases for r in thresholds.regressions] == [10, 1, 5]
    assert DEFAULT_MIN_CASES == {"fail": 10, "record": 1}
    document = json.loads(json.dumps(thresholds.to_json()))
    assert [b["min_cases"] for b in document["bounds"]] == [10, 1, 30]
    assert [r["min_cases"] for r in document["regressions"]] == [10, 1, 5]


def test_min_cases_of_entries_built_by_hand_follow_the_mode() -> None:
    assert Bound("triage", "accuracy", "all", min=0.5).min_cases == 10
    assert Bound("triage", "accuracy", "all", min=0.5, mode="record").min_cases == 1
    assert Bound("triage", "accuracy", "all", min=0.5, min_cases=3).min_cases == 3
    assert RegressionRule("triage", "accuracy", "all", "lower", 0.05).min_cases == 10
    assert RegressionRule("triage", "accuracy", "all", "lower", 0.05, "record").min_cases == 1


@pytest.mark.parametrize("value", ["0", "-1", "2.5", "true", "ten", "null"])
@pytest.mark.parametrize("section", ["bounds", "regressions"])
def test_error_min_cases_not_a_whole_number_of_at_least_one(tmp_path: Path, value: str, section: str) -> None:
    entry = ("{metric: accuracy, stratum: all, min: 0.5" if section == "bounds"
             else "{metric: accuracy, stratum: all, tolerance: 0.05")
    path = write(tmp_path, f"version: 1\ntriage:\n  {section}:\n    - {entry}, min_cases: {value}}}\n")
    message = error_of(path)
    assert message.startswith(f"{path}:4: triage.{section}[0].min_cases: expected a whole number of cases, "
                              "at least 1"), message


def test_error_near_miss_min_cases_key(tmp_path: Path) -> None:
    message = error_of(bounds_file(tmp_path, "- {metric: accuracy, stratum: all, min: 0.5, min_case: 5}"))
    assert ":4: triage.bounds[0].min_case: unknown key 'min_case'. Did you mean 'min_cases'" in message


# --- filters that name nothing ---------------------------------------------------------------------------

RUN_PERSONAS = [p.id for p in STUDY_PERSONAS]


def filters_file(tmp_path: Path) -> Path:
    return write(tmp_path, """\
        version: 1
        triage:
          bounds:
            - metric: under_triage_rate
              stratum: emergency
              max: 0.10
              personas: [ed_physician, ed_nures]
          regressions:
            - metric: accuracy
              stratum: all
              tolerance: 0.05
              models:
                - llama8b
        """)


def test_check_names_refuses_a_persona_that_does_not_exist(tmp_path: Path) -> None:
    path = filters_file(tmp_path)
    thresholds = load_thresholds(path)
    with pytest.raises(ConfigError) as caught:
        thresholds.check_names(personas=RUN_PERSONAS, models=["llama-8b", "smollm2"])
    assert str(caught.value) == (
        f"{path}:7: triage.bounds[0].personas[1]: no persona is called 'ed_nures', so this bound applies to "
        "nobody. Did you mean 'ed_nurse'? Known: " + ", ".join(sorted(RUN_PERSONAS)) + ".")


def test_check_names_refuses_a_model_that_is_not_in_the_run(tmp_path: Path) -> None:
    path = filters_file(tmp_path)
    thresholds = load_thresholds(path)
    with pytest.raises(ConfigError) as caught:
        thresholds.check_names(personas=[*RUN_PERSONAS, "ed_nures"], models=["llama-8b", "smollm2"])
    assert str(caught.value) == (
        f"{path}:13: triage.regressions[0].models[0]: no model of this run is called 'llama8b', so this rule "
        "applies to nobody. Did you mean 'llama-8b'? Known: llama-8b, smollm2.")


def test_check_names_passes_names_that_exist(tmp_path: Path) -> None:
    thresholds = load_thresholds(filters_file(tmp_path))
    thresholds.check_names(personas=[*RUN_PERSONAS, "ed_nures"], models=["llama8b"])
    load_thresholds().check_names(personas=RUN_PERSONAS, models=["smollm2"])


def test_check_names_on_thresholds_built_by_hand_names_the_entry() -> None:
    bound = Bound("triage", "accuracy", "all", min=0.5, models=("gpt",))
    with pytest.raises(ConfigError) as caught:
        Thresholds(path=Path("t.yaml"), bounds=(bound,)).check_names(personas=RUN_PERSONAS, models=["gpt-4o"])
    assert str(caught.value).startswith("t.yaml: triage accuracy (all): no model of this run is called 'gpt'")
    assert "Did you mean 'gpt-4o'?" in str(caught.value)


# --- strata of the dataset's own ---------------------------------------------------------------------

def test_a_bound_may_name_a_stratum_of_the_dataset_and_is_checked_against_it(tmp_path: Path) -> None:
    path = bounds_file(tmp_path, """\
        - {metric: accuracy, stratum: all, min: 0.5}
        - {metric: under_triage_rate, stratum: paediatrics, max: 0.05}
        - {metric: under_triage_rate, stratum: emergency, max: 0.10}
        """)
    thresholds = load_thresholds(path)
    assert [b.stratum for b in thresholds.bounds] == ["all", "paediatrics", "emergency"]
    # The dataset has the stratum: nothing to say. One of the study's strata that the dataset lacks is
    # let through (a fail bound on it is "not checked" after the run).
    thresholds.check_strata("triage", ["paediatrics", "telehealth"], defaults=("emergency", "primary_care"))
    # A stratum the dataset does not use: the bound would apply to nothing.
    with pytest.raises(ConfigError) as info:
        thresholds.check_strata("triage", ["paediatric", "telehealth"], defaults=("emergency", "primary_care"))
    assert str(info.value) == (
        f"{path}:5: triage.bounds[1].stratum: no case of the triage dataset is in the stratum 'paediatrics', so "
        "this bound applies to nothing. Did you mean 'paediatric'? The dataset's strata: paediatric, telehealth.")


def test_a_stratum_that_looks_like_a_mistake_is_refused_when_the_file_is_read(tmp_path: Path) -> None:
    message = error_of(bounds_file(tmp_path, "- {metric: accuracy, stratum: Emergency, min: 0.5}"))
    assert message == (f"{tmp_path / 't.yaml'}:4: triage.bounds[0].stratum: triage stratum 'Emergency': "
                       "looks like a mistake for the stratum 'emergency'; write it as 'emergency'")
    # A task whose strata are fixed (safety: its categories) still takes only its own.
    path = write(tmp_path, "version: 1\nsafety:\n  bounds:\n"
                           "    - {metric: safety_mrr, stratum: paediatrics, min: 0.1}\n")
    assert "unknown safety stratum 'paediatrics'" in error_of(path)
