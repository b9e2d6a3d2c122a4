"""Tests of persona_eval.yamlfile: the line of every key and list item, duplicate keys, YAML errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from persona_eval.errors import ConfigError
from persona_eval.yamlfile import YamlDocument, child_path, item_path, load_yaml, parse_yaml

TEXT = textwrap.dedent("""\
    # a comment
    models:
      llama-8b:
        backend: hf
        dtype: bf16
      served: {backend: openai, model: m}
    bounds:
      - metric: accuracy
        min: 0.5
      - {metric: parse_rate, min: 0.9}
      -
        metric: brier_score
""")


def test_lines_of_keys_and_items() -> None:
    document = parse_yaml(TEXT, path="m.yaml")
    assert document.data["models"]["llama-8b"] == {"backend": "hf", "dtype": "bf16"}
    expected = {
        "models": 2, "models.llama-8b": 3, "models.llama-8b.backend": 4, "models.llama-8b.dtype": 5,
        "models.served": 6, "models.served.backend": 6, "models.served.model": 6,
        "bounds": 7, "bounds[0]": 8, "bounds[0].metric": 8, "bounds[0].min": 9,
        "bounds[1]": 10, "bounds[1].min": 10, "bounds[2].metric": 12,
    }
    assert {key: document.lines[key] for key in expected} == expected


def test_a_missing_key_falls_back_to_the_nearest_enclosing_line() -> None:
    document = parse_yaml(TEXT, path="m.yaml")
    assert document.line("models.llama-8b.device") == 3
    assert document.line("bounds[1].max") == 10
    assert document.line("bounds[7].max") == 7
    assert document.line("nothing.here") is None
    assert document.line("") is None


def test_where_and_error_read_file_line_field() -> None:
    document = parse_yaml(TEXT, path="m.yaml")
    assert document.where("models.llama-8b.dtype") == "m.yaml:5: models.llama-8b.dtype"
    assert document.where("") == "m.yaml"
    assert document.where("absent") == "m.yaml: absent"
    error = document.error("models.llama-8b.dtype", "'bf16' is not a torch dtype;\n did you mean 'bfloat16'?")
    assert isinstance(error, ConfigError)
    assert str(error) == "m.yaml:5: models.llama-8b.dtype: 'bf16' is not a torch dtype; did you mean 'bfloat16'?"


def test_key_paths_join_keys_and_indices() -> None:
    assert child_path("", "models") == "models"
    assert child_path("models", "my model/v2") == "models.my model/v2"
    assert item_path("triage.bounds", 3) == "triage.bounds[3]"
    # A key with dots still finds its entry's line for a field it lacks.
    document = parse_yaml("models:\n  llama-3.1-8b:\n    backend: hf\n", path="m.yaml")
    assert document.line("models.llama-3.1-8b.model") == 2


@pytest.mark.parametrize(("text", "line", "first"), [
    ("a: 1\nb: 2\na: 3\n", 3, 1),
    ("outer:\n  - {x: 1, y: 2, x: 3}\n", 2, 2),
    ("outer:\n  inner:\n    k: 1\n    k: 1\n", 4, 3),
])
def test_a_key_given_twice_is_refused_with_both_lines(text: str, line: int, first: int) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_yaml(text, path="d.yaml")
    message = str(caught.value)
    assert message.startswith(f"d.yaml:{line}: ") and f"(first given on line {first})" in message
    assert "duplicate key" in message


def test_keys_of_different_types_are_not_duplicates() -> None:
    assert parse_yaml("1: a\n'1': b\n", path="d.yaml").data == {1: "a", "1": "b"}


def test_merge_keys_and_aliases_are_plain_data() -> None:
    text = "base: &base {backend: hf, dtype: float16}\nm:\n  <<: *base\n  dtype: float32\n"
    document = parse_yaml(text, path="d.yaml")
    assert document.data["m"] == {"backend": "hf", "dtype": "float32"}
    assert document.line("m.dtype") == 4
    assert document.line("m.backend") == 2  # merged in: reported at its entry


def test_a_self_referencing_alias_does_not_loop() -> None:
    document = parse_yaml("a: &x [1, *x]\n", path="d.yaml")
    assert document.data["a"][1] is document.data["a"]


def test_empty_file_is_none() -> None:
    assert parse_yaml("", path="e.yaml") == YamlDocument(path=Path("e.yaml"), data=None)


def test_invalid_yaml_names_the_line_and_quotes_it() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_yaml("a: 1\nb: [1, 2\nc: 3\n", path="bad.yaml")
    message = str(caught.value)
    assert message.startswith("bad.yaml:") and "not valid YAML" in message and "\n" not in message


def test_two_documents_are_refused() -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_yaml("a: 1\n---\nb: 2\n", path="two.yaml")


def test_load_yaml_reads_bytes_and_names_the_kind(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text("a: 1\n", encoding="utf-8")
    document = load_yaml(path, kind="models file")
    assert (document.data, document.raw, document.path) == ({"a": 1}, b"a: 1\n", path)
    with pytest.raises(ConfigError, match="cannot read models file"):
        load_yaml(tmp_path / "absent.yaml", kind="models file")
    path.write_bytes(b"a: \xff\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 3\)"):
        load_yaml(path, kind="models file")
