"""The --pe-* options as persona_eval.settings parses and checks them, without a pytest session."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from persona_eval.errors import PersonaEvalError
from persona_eval.settings import OPTIONS, limit_per_stratum, parse_settings

REPO = Path(__file__).resolve().parent.parent


def options(*argv: str) -> argparse.Namespace:
    """The options as pytest would parse them from `argv` (the same flags and defaults)."""
    parser = argparse.ArgumentParser()
    for flag, kwargs in OPTIONS:
        parser.add_argument(flag, **kwargs)
    return parser.parse_args(list(argv))


def test_every_option_is_a_pe_flag_with_help_and_a_destination_the_parser_reads() -> None:
    flags = [flag for flag, _ in OPTIONS]
    assert len(flags) == len(set(flags))
    for flag, kwargs in OPTIONS:
        assert flag.startswith("--pe-") and kwargs["help"]
    namespace = vars(options())
    assert set(namespace) == {flag[2:].replace("-", "_") for flag in flags}


def test_defaults_give_the_bundled_datasets_and_budgets() -> None:
    settings = parse_settings(options(), REPO)
    assert settings.datasets == {"triage": REPO / "fixtures/triage/vignettes.jsonl",
                                 "safety": REPO / "fixtures/safety/queries.jsonl"}
    assert settings.max_new_tokens == {"triage": 32, "safety": 64}
    assert [model.name for model in settings.models] == ["smollm2"]
    assert settings.personas[0].id == "no_persona"
    assert settings.use_cache and settings.too_long == "error" and settings.approved is None


def test_one_max_new_tokens_applies_to_every_task() -> None:
    settings = parse_settings(options("--pe-max-new-tokens", "512"), REPO)
    assert set(settings.max_new_tokens.values()) == {512}


def models_file(tmp_path: Path, budget: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  reasoner:\n    backend: openai\n    model: r1\n"
                    f"    base_url: http://127.0.0.1:9/v1\n    max_new_tokens: {budget}\n")
    return path


def test_the_answer_budget_is_the_command_line_s_then_the_model_s_then_the_default(tmp_path: Path) -> None:
    path = models_file(tmp_path, "{triage: 2048}")
    settings = parse_settings(options("--pe-models-file", str(path), "--pe-model", "reasoner",
                                      "--pe-model", "smollm2", "--pe-model", "openai:m@http://127.0.0.1:9/v1"), REPO)
    reasoner, embedded, served = settings.models
    assert settings.answer_budget(reasoner, "triage") == 2048      # the models file
    assert settings.answer_budget(reasoner, "safety") == 1024      # a served model's default
    assert settings.answer_budget(served, "triage") == 1024
    assert settings.answer_budget(embedded, "triage") == 32        # the task's, for a CPU
    assert settings.answer_budget(embedded, "safety") == 64
    given = parse_settings(options("--pe-models-file", str(path), "--pe-model", "reasoner",
                                   "--pe-max-new-tokens", "16"), REPO)
    assert given.answer_budget(given.models[0], "triage") == given.answer_budget(given.models[0], "safety") == 16


def test_a_budget_for_an_unknown_task_names_the_file_line_and_task(tmp_path: Path) -> None:
    path = models_file(tmp_path, "{triaje: 2048}")
    with pytest.raises(PersonaEvalError) as raised:
        parse_settings(options("--pe-models-file", str(path), "--pe-model", "reasoner"), REPO)
    message = str(raised.value)
    assert message.startswith(f"{path}:") and "max_new_tokens.triaje" in message
    assert "unknown task 'triaje'" in message and "did you mean 'triage'" in message.lower()


@pytest.mark.parametrize(("argv", "message"), [
    (["--pe-limit", "0"], "--pe-limit must be at least 1, got 0"),
    (["--pe-retries", "-1"], "--pe-retries must be at least 0, got -1"),
    (["--pe-timeout", "nan"], "--pe-timeout must be a positive number of seconds, got nan"),
    (["--pe-max-new-tokens", "0"], "--pe-max-new-tokens must be at least 1, got 0"),
    (["--pe-bootstrap-resamples", "0"], "--pe-bootstrap-resamples must be at least 1, got 0"),
    (["--pe-dataset", "triage"], "--pe-dataset 'triage': expected TASK=PATH"),
    (["--pe-dataset", "triaje=x.jsonl"], "unknown task 'triaje'"),
    (["--pe-dataset", "triage:=x.jsonl"], "--pe-dataset 'triage:=x.jsonl': expected TASK=PATH or TASK:STRATUM=PATH"),
    (["--pe-dataset", "triage:all=x.jsonl"], "stratum 'all': 'all' is the report's row over every case"),
    (["--pe-dataset", "triage:Primary_Care=x.jsonl"], "looks like a mistake for the stratum 'primary_care'"),
    (["--pe-dataset", "safety:misdiagnosis=q.jsonl"], "the strata of task 'safety' are fixed"),
    (["--pe-model", "smollm2", "--pe-model", "smollm2"], "two --pe-model specs share the name 'smollm2'"),
])
def test_a_bad_value_is_one_error_naming_the_option(argv: list[str], message: str) -> None:
    with pytest.raises(PersonaEvalError) as raised:
        parse_settings(options(*argv), REPO)
    assert message in str(raised.value)


def test_a_dataset_may_give_the_stratum_of_its_lines_that_carry_none(tmp_path: Path) -> None:
    bench = tmp_path / "calls.jsonl"
    bench.write_text('{"case_description": "Fever and a rash in a toddler.", "urgency_level": "ne"}\n'
                     '{"case_description": "Chest pain at rest.", "urgency_level": "em", "stratum": "in_person"}\n')
    settings = parse_settings(options("--pe-dataset", f"triage:telehealth={bench}"), REPO)
    assert settings.datasets["triage"] == bench and settings.dataset_strata == {"triage": "telehealth"}
    assert [(c.stratum, c.reference) for c in settings.load_dataset("triage")] == [("telehealth", "B"),
                                                                                   ("in_person", "C")]


def test_limit_keeps_the_first_items_of_each_stratum_in_file_order() -> None:
    items = [("a", 1), ("b", 2), ("a", 3), ("a", 4), ("b", 5), ("c", 6)]
    assert limit_per_stratum(items, 2, lambda item: item[0]) == [("a", 1), ("b", 2), ("a", 3), ("b", 5), ("c", 6)]
    assert limit_per_stratum(items, None, lambda item: item[0]) is items
