"""persona_eval.load_run: a run folder as DataFrames whose numbers are summary.json's and cases.jsonl's.
The run is the golden run's output (tests/golden), written as a run folder."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from persona_eval import ConfigError, DataError, load_run

GOLDEN = Path(__file__).resolve().parent / "golden"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(GOLDEN / "summary.json", folder / "summary.json")
    cases = json.loads((GOLDEN / "cases.json").read_text())
    (folder / "cases.jsonl").write_text("".join(json.dumps(case) + "\n" for case in cases))
    return folder


def test_the_metrics_frame_is_tidy_and_holds_every_value_of_summary_json(run_dir: Path) -> None:
    run = load_run(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    expected = [(r["model"], r["task"], r["persona"], r["stratum"], metric, value)
                for r in summary["results"] for metric, value in r["metrics"].items()]
    assert len(run.metrics) == len(expected) > 0
    indexed = run.metrics.set_index(["model", "task", "persona", "stratum", "metric"])
    assert indexed.index.is_unique
    for model, task, persona, stratum, metric, value in expected:
        got = indexed.loc[(model, task, persona, stratum, metric), "value"]
        assert (math.isnan(got) if value is None else got == pytest.approx(value)), (model, persona, metric)
    # A note travels with an undefined value.
    undefined = run.metrics[run.metrics["value"].isna()]
    assert undefined["note"].notna().all()
    # The analyst's first move works: one column per metric.
    table = run.metrics[run.metrics["task"] == "triage"].pivot_table(
        index=["model", "persona", "stratum"], columns="metric", values="value")
    assert {"accuracy", "under_triage_rate", "truncated_rate"} <= set(table.columns)


def test_comparisons_checks_and_cases_are_frames_of_their_files(run_dir: Path) -> None:
    run = load_run(run_dir / "summary.json")  # the summary file names its run too
    summary = run.summary
    assert len(run.comparisons) == len(summary["comparisons"])
    assert run.comparisons["significant"].dtype == "boolean"
    # A comparison that could not be made is <NA>, exactly where summary.json has null.
    assert list(run.comparisons["significant"].isna()) == [c["significant"] is None for c in summary["comparisons"]]
    assert len(run.checks) == len(summary["checks"]) and {"bound_metric", "bound_max", "status"} <= set(run.checks)
    assert len(run.regressions) == len(summary["regressions"]) and "rule_tolerance" in run.regressions
    cases = json.loads((GOLDEN / "cases.json").read_text())
    assert len(run.cases) == len(cases)
    triage = run.cases[run.cases["task"] == "triage"]
    with_probs = triage[triage["label_probs"].notna()]
    assert len(with_probs) > 0
    sums = with_probs[["prob_A", "prob_B", "prob_C"]].sum(axis=1)
    assert (sums - 1).abs().max() < 1e-6
    assert isinstance(run.metrics, pd.DataFrame)


def test_a_folder_that_is_not_a_finished_run_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not a finished persona-eval run \(no summary.json\)") as raised:
        load_run(tmp_path)
    assert str(tmp_path) in str(raised.value)


def test_a_damaged_cases_file_names_its_line(run_dir: Path) -> None:
    damaged = len((run_dir / "cases.jsonl").read_text().splitlines()) + 1
    with (run_dir / "cases.jsonl").open("a") as handle:
        handle.write('{"task": "triage", \n')
    with pytest.raises(DataError) as raised:
        load_run(run_dir)
    assert f"cases.jsonl:{damaged}: not valid JSON" in str(raised.value)
