"""Tests of `persona-eval power`: the verdict first, a table of assumed discordances, the discordance read
from a run's summary.json, and one-line errors that name the option."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from persona_eval import cli
from persona_eval.comparisons import ComparisonSettings, compare_personas
from persona_eval.power import cases_needed, implied_discordance
from persona_eval.tasks.triage import LABELS


def power(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], str]:
    code = cli.main(["power", *args])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_the_verdict_comes_first(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, _ = power("--metric", "accuracy", "--difference", "0.10", "--discordance", "0.2", capsys=capsys)
    needed = cases_needed(0.1, discordance=0.2, alpha=0.01)
    assert code == 0
    assert lines[0] == (f"To detect a 0.10 drop in accuracy with 80% power at alpha 0.05/5: {needed} cases per "
                        "stratum (assuming 20% of cases change between the two conditions).")
    assert "level 0.01 (Holm's first step over 5 comparisons)" in lines[-1]


def test_the_options_change_the_answer(capsys: pytest.CaptureFixture[str]) -> None:
    _, lines, _ = power("--metric", "under_triage_rate", "--difference", "0.05", "--discordance", "0.1",
                        "--comparisons", "3", "--alpha", "0.1", "--power", "0.9", capsys=capsys)
    needed = cases_needed(0.05, discordance=0.1, alpha=0.1 / 3, power=0.9)
    assert lines[0] == (f"To detect a 0.05 rise in under-triage rate with 90% power at alpha 0.1/3: {needed} cases "
                        "per stratum (assuming 10% of cases change between the two conditions).")
    _, lines, _ = power("--metric", "risk_propensity", "--difference", "0.1", "--discordance", "0.2",
                        "--comparisons", "1", capsys=capsys)
    assert lines[0].startswith("To detect a 0.10 change in risk propensity with 80% power at alpha 0.05: ")


def test_without_a_discordance_a_table_of_assumed_ones(capsys: pytest.CaptureFixture[str]) -> None:
    _, lines, _ = power("--metric", "accuracy", "--difference", "0.4", capsys=capsys)
    counts = [cases_needed(0.4, discordance=p, alpha=0.01) for p in (0.4, 0.6, 0.8, 1.0)]  # 3 x 0.4 capped at 1
    assert lines[0] == (f"To detect a 0.40 drop in accuracy with 80% power at alpha 0.05/5: {counts[0]} to "
                        f"{counts[-1]} cases per stratum, depending on the share of cases that change between the "
                        "two conditions (assumed: give --discordance or --run).")
    rows = [line.split() for line in lines[2:6]]
    assert rows == [[f"{share}%", str(count)] for share, count in zip((40, 60, 80, 100), counts, strict=True)]
    assert any("assumed here, not measured" in line for line in lines)


def test_several_discordances(capsys: pytest.CaptureFixture[str]) -> None:
    _, lines, _ = power("--metric", "accuracy", "--difference", "0.1", "--discordance", "0.1", "0.3", capsys=capsys)
    assert "depending on the share of cases that change between the two conditions." in lines[0]
    assert len([line for line in lines if line.strip().endswith(tuple("0123456789"))]) == 2
    assert not any("assumed" in line for line in lines)


def run_folder(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    rng = random.Random(5)
    records = []
    for persona in ("no_persona", "ed_nurse", "ed_physician"):
        for i in range(60):
            reference = LABELS[i % 3]
            answer = reference if rng.random() < 0.7 else rng.choice(LABELS)
            records.append({"run_id": "r", "task": "triage", "model": "m", "persona": persona,
                            "persona_group": "medical", "stratum": "emergency" if i % 2 else "primary_care",
                            "case_id": f"c{i:02d}", "reference": reference, "generated_label": answer,
                            "logit_label": answer, "label_probs": None})
    comparisons = compare_personas(records, settings=ComparisonSettings(n_resamples=300))
    (tmp_path / "summary.json").write_text(json.dumps({"run_id": "r", "comparisons": comparisons}))
    return tmp_path, comparisons


def test_the_discordance_read_from_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, comparisons = run_folder(tmp_path)
    accuracy = [c for c in comparisons if c["metric"] == "accuracy"]
    observed = max((c["persona_only"] + c["baseline_only"]) / c["n"] for c in accuracy)
    _, lines, _ = power("--metric", "accuracy", "--difference", "0.1", "--run", str(folder), capsys=capsys)
    family = accuracy[0]["family_size"]
    needed = cases_needed(0.1, discordance=max(observed, 0.1), alpha=0.05 / family)
    assert lines[0].startswith(f"To detect a 0.10 drop in accuracy with 80% power at alpha 0.05/{family}: {needed} "
                               f"cases per stratum (at the largest discordance in {folder}: ")
    assert f"{len(accuracy)} comparisons of accuracy in the run" in lines[1]
    # A rate compared by the bootstrap: the discordance its standard error implies.
    under = [c for c in comparisons if c["metric"] == "under_triage_rate"]
    implied = max(implied_discordance(c["standard_error"], c["n"], difference=c["delta"]) for c in under)
    _, lines, _ = power("--metric", "under_triage_rate", "--difference", "0.1", "--run", str(folder), capsys=capsys)
    needed = cases_needed(0.1, discordance=max(implied, 0.1), alpha=0.05 / family)
    assert f": {needed} cases per stratum (at the largest discordance in" in lines[0]


@pytest.mark.parametrize(("args", "message"), [
    (["--metric", "accuracy", "--difference", "x"], "--difference must be a number, got 'x'"),
    (["--metric", "accuracy", "--difference", "0"], r"--difference must be a number in (0, 1], got 0"),
    (["--metric", "accuracy", "--difference", "0.1", "--discordance", "0.05"],
     "--discordance 0.05 is smaller than --difference 0.1"),
    (["--metric", "accuracy", "--difference", "0.1", "--discordance", "2"], "--discordance must be a number in"),
    (["--metric", "accuracy", "--difference", "0.1", "--alpha", "1"], r"--alpha must be a number in (0, 1), got 1"),
    (["--metric", "accuracy", "--difference", "0.1", "--power", "80"], "--power must be a number in (0, 1)"),
    (["--metric", "accuracy", "--difference", "0.1", "--comparisons", "0"], "--comparisons must be a whole number"),
    (["--metric", "acuracy", "--difference", "0.1"], "--metric: unknown metric 'acuracy'. Did you mean 'accuracy'?"),
    (["--difference", "0.1"], "--metric is required"),
    (["--metric", "accuracy"], "--difference is required"),
    (["--metric", "accuracy", "--difference", "0.1", "--run", "nowhere"], "--run nowhere: cannot read summary.json"),
    (["--metric", "accuracy", "--difference", "0.1", "--run", "x", "--discordance", "0.2"],
     "give --run or --discordance"),
])
def test_errors_are_one_line_naming_the_option(args: list[str], message: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, err = power(*args, capsys=capsys)
    assert code == 2 and lines == []
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("persona-eval: ") and message in err


def test_a_run_without_comparisons_of_the_metric(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "summary.json").write_text(json.dumps({"comparisons": []}))
    code, _, err = power("--metric", "accuracy", "--difference", "0.1", "--run", str(tmp_path), capsys=capsys)
    assert code == 2 and "holds no comparison of accuracy" in err
