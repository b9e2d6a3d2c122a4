"""Tests of persona_eval.backends: model specs, the models YAML file, and the HF backend's identity."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from persona_eval.backends import BACKENDS, ModelSpec, load_models_file, parse_model_spec
from persona_eval.backends.hf import HFBackend, weights_fingerprint
from persona_eval.errors import ConfigError

# --- command-line specs ------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "expected"), [
    ("smollm2", ModelSpec("smollm2", "embedded", {})),
    ("hf:/models/Llama-3.1-8B-Instruct", ModelSpec("Llama-3.1-8B-Instruct", "hf",
                                                   {"model": "/models/Llama-3.1-8B-Instruct"})),
    ("hf:/models/Llama-3.1-8B-Instruct/", ModelSpec("Llama-3.1-8B-Instruct", "hf",
                                                    {"model": "/models/Llama-3.1-8B-Instruct/"})),
    ("hf:./model.Q4_K_M.gguf", ModelSpec("model.Q4_K_M.gguf", "hf", {"model": "./model.Q4_K_M.gguf"})),
    ("hf:HuggingFaceTB/SmolLM2-135M-Instruct", ModelSpec("SmolLM2-135M-Instruct", "hf",
                                                         {"model": "HuggingFaceTB/SmolLM2-135M-Instruct"})),
    ("openai:meta-llama/Llama-3.1-70B-Instruct@http://gpu-host:8000/v1",
     ModelSpec("Llama-3.1-70B-Instruct", "openai", {"model": "meta-llama/Llama-3.1-70B-Instruct",
                                                    "base_url": "http://gpu-host:8000/v1"})),
    ("openai:my-model@https://api.example.org/v1",
     ModelSpec("my-model", "openai", {"model": "my-model", "base_url": "https://api.example.org/v1"})),
    ("openai:gpt-4o", ModelSpec("gpt-4o", "openai", {"model": "gpt-4o"})),
    ("openai:model with spaces:v2", ModelSpec("model-with-spaces-v2", "openai", {"model": "model with spaces:v2"})),
])
def test_parse_model_spec(spec: str, expected: ModelSpec) -> None:
    parsed = parse_model_spec(spec)
    assert parsed == expected
    assert parsed.backend in BACKENDS


@pytest.mark.parametrize("spec", ["smollm", "smolm2", "SmolLM2"])
def test_unknown_spec_suggests_and_lists_the_known_forms(spec: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_model_spec(spec)
    message = str(caught.value)
    assert f"unknown model spec {spec!r}" in message
    assert "Did you mean 'smollm2'" in message
    for form in ("smollm2", "hf:PATH_OR_HUB_ID", "openai:MODEL@BASE_URL"):
        assert form in message.split("Known:")[1]


def test_unknown_spec_without_close_match_still_lists_the_known_forms() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_model_spec("zzzz")
    message = str(caught.value)
    assert "Did you mean" not in message
    assert "Known: hf:PATH_OR_HUB_ID, openai:MODEL@BASE_URL, smollm2." in message


@pytest.mark.parametrize(("spec", "fragment"), [
    ("hf:", "needs a path or hub id"),
    ("openai:", "give the served model name"),
    ("openai:@http://localhost:8000/v1", "give the served model name"),
    ("openai:my-model@localhost:8000/v1", "must start with http:// or https://"),
    ("openai:my-model@ftp://host/v1", "must start with http:// or https://"),
])
def test_malformed_specs_are_config_errors(spec: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_model_spec(spec)


def test_named_models_take_precedence_and_join_the_suggestions() -> None:
    named = {"llama-8b": ModelSpec("llama-8b", "hf", {"model": "/m/llama"}),
             "smollm2": ModelSpec("smollm2", "hf", {"model": "/m/smol"})}
    assert parse_model_spec("llama-8b", named) is named["llama-8b"]
    assert parse_model_spec("smollm2", named) is named["smollm2"]
    with pytest.raises(ConfigError) as caught:
        parse_model_spec("llama8b", named)
    message = str(caught.value)
    assert "Did you mean 'llama-8b'" in message
    assert "llama-8b" in message.split("Known:")[1]


# --- the models YAML file ----------------------------------------------------------------------------

VALID_MODELS = """
models:
  llama-8b:
    backend: hf
    model: /models/Llama-3.1-8B-Instruct
    dtype: bfloat16
    device: cuda
    batch_size: 32
  served:
    backend: openai
    model: meta-llama/Llama-3.1-70B-Instruct
    base_url: http://gpu-host:8000/v1
    api_key_env: VLLM_API_KEY
    max_in_flight: 64
  "my model/v2":
    backend: embedded
    batch_size: 8
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_models_file(tmp_path: Path) -> None:
    specs = load_models_file(_write(tmp_path, VALID_MODELS))
    assert list(specs) == ["llama-8b", "served", "my model/v2"]
    assert specs["llama-8b"] == ModelSpec("llama-8b", "hf", {
        "model": "/models/Llama-3.1-8B-Instruct", "dtype": "bfloat16", "device": "cuda", "batch_size": 32})
    assert specs["served"] == ModelSpec("served", "openai", {
        "model": "meta-llama/Llama-3.1-70B-Instruct", "base_url": "http://gpu-host:8000/v1",
        "api_key_env": "VLLM_API_KEY", "max_in_flight": 64})
    # The name in results and test ids is safe for file names; the key stays what the user wrote.
    assert specs["my model/v2"] == ModelSpec("my-model-v2", "embedded", {"batch_size": 8})
    assert parse_model_spec("served", specs) is specs["served"]


@pytest.mark.parametrize(("text", "fragments"), [
    pytest.param("models:\n  x:\n    backend: openi\n    model: m\n",
                 ["models.x.backend", "unknown backend 'openi'", "Did you mean 'openai'",
                  "Known: embedded, hf, openai"], id="unknown-backend"),
    pytest.param("models:\n  x:\n    model: m\n", ["models.x.backend", "unknown backend 'None'"],
                 id="missing-backend"),
    pytest.param("models:\n  x:\n    backend: hf\n    model: m\n    batchsize: 4\n",
                 ["models.x.batchsize", "unknown option for backend 'hf' 'batchsize'",
                  "Did you mean 'batch_size'"], id="unknown-option"),
    pytest.param("models:\n  x:\n    backend: openai\n    model: m\n    base-url: http://h/v1\n",
                 ["models.x.base-url", "Did you mean 'base_url'"], id="unknown-openai-option"),
    pytest.param("models:\n  x:\n    backend: embedded\n    model: m\n",
                 ["models.x.model", "unknown option for backend 'embedded'"], id="model-for-embedded"),
    pytest.param("models:\n  x:\n    backend: hf\n    dtype: float16\n", ["models.x.model: missing"],
                 id="missing-model-hf"),
    pytest.param("models:\n  x:\n    backend: openai\n    model: ''\n", ["models.x.model: missing"],
                 id="empty-model-openai"),
    pytest.param("models:\n  x: hf\n", ["models.x: expected a mapping"], id="entry-not-mapping"),
    pytest.param("models: [a, b]\n", ["top-level key 'models'"], id="models-not-mapping"),
    pytest.param("llama: {backend: hf}\n", ["top-level key 'models'"], id="no-models-key"),
    pytest.param("models: {x: [unclosed\n", ["not valid YAML"], id="not-yaml"),
])
def test_invalid_models_file_names_the_file_and_entry(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_models_file(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_models_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read models file"):
        load_models_file(tmp_path / "absent.yaml")


# --- HF backend identity (no weights loaded) ---------------------------------------------------------


def _model_dir(root: Path, weights: bytes = b"weights-1") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.safetensors").write_bytes(weights)
    (root / "config.json").write_text('{"model_type": "llama"}')
    return root


def test_weights_fingerprint_hashes_weight_files_only(tmp_path: Path) -> None:
    directory = _model_dir(tmp_path / "m")
    fingerprint = weights_fingerprint(directory)
    assert fingerprint.startswith("sha256:") and len(fingerprint) == len("sha256:") + 64
    (directory / "config.json").write_text('{"model_type": "changed"}')
    (directory / "README.md").write_text("notes")
    assert weights_fingerprint(directory) == fingerprint


def test_weights_fingerprint_does_not_depend_on_where_the_model_lives(tmp_path: Path) -> None:
    assert weights_fingerprint(_model_dir(tmp_path / "a")) == weights_fingerprint(_model_dir(tmp_path / "b"))


def test_weights_fingerprint_changes_with_content_names_and_files(tmp_path: Path) -> None:
    directory = _model_dir(tmp_path / "m")
    original = weights_fingerprint(directory)
    (directory / "model.safetensors").write_bytes(b"weights-2")  # same size, new content
    changed = weights_fingerprint(directory)
    assert changed != original
    (directory / "model.safetensors").rename(directory / "model-00001.safetensors")
    renamed = weights_fingerprint(directory)
    assert renamed not in (original, changed)
    (directory / "extra.bin").write_bytes(b"")
    assert weights_fingerprint(directory) != renamed


def test_weights_fingerprint_of_a_single_file(tmp_path: Path) -> None:
    gguf = tmp_path / "model.Q4.gguf"
    gguf.write_bytes(b"GGUF....")
    other = tmp_path / "copy" / "model.Q4.gguf"
    other.parent.mkdir()
    other.write_bytes(b"GGUF....")
    assert weights_fingerprint(gguf) == weights_fingerprint(other)


def test_weights_fingerprint_is_remembered_in_the_memo_dir(tmp_path: Path) -> None:
    directory = _model_dir(tmp_path / "m")
    memo = tmp_path / "memo"
    fingerprint = weights_fingerprint(directory, memo_dir=memo)
    memos = list(memo.glob("*.fingerprint"))
    assert len(memos) == 1
    assert memos[0].read_text() == fingerprint
    # The memo is read back as long as the files' names, sizes and times are unchanged.
    memos[0].write_text("sha256:remembered")
    assert weights_fingerprint(directory, memo_dir=memo) == "sha256:remembered"
    weights = directory / "model.safetensors"
    weights.write_bytes(b"weights-X")
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert weights_fingerprint(directory, memo_dir=memo) == weights_fingerprint(directory)
    assert weights_fingerprint(directory, memo_dir=memo) not in (fingerprint, "sha256:remembered")


def test_weights_fingerprint_without_weights_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no model weights found"):
        weights_fingerprint(tmp_path)


def test_hf_identity_of_a_local_model_names_the_weights(tmp_path: Path) -> None:
    directory = _model_dir(tmp_path / "Tiny-Instruct")
    backend = HFBackend("tiny", str(directory), dtype="bfloat16", batch_size=4)
    identity = backend.identity()
    assert identity == {"backend": "hf", "model": "Tiny-Instruct", "gguf_file": None, "dtype": "bfloat16",
                        "weights": weights_fingerprint(directory)}
    assert (backend.batch_size, backend.max_in_flight) == (4, 1)
    assert backend._model is None and backend._tokenizer is None


def test_hf_identity_of_a_gguf_path_splits_directory_and_file(tmp_path: Path) -> None:
    gguf = tmp_path / "model.Q4.gguf"
    gguf.write_bytes(b"GGUF....")
    identity = HFBackend("q4", str(gguf)).identity()
    assert identity["gguf_file"] == "model.Q4.gguf"
    assert identity["weights"] == weights_fingerprint(gguf)


def test_hf_identity_of_a_hub_id_is_cheap() -> None:
    identity = HFBackend("smol", "HuggingFaceTB/SmolLM2-135M-Instruct").identity()
    assert identity["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert identity["weights"] == "hub:HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("model", ["/no/such/model", "./missing-model", "~/missing-model", "a/b/c"])
def test_hf_backend_refuses_a_missing_local_path(model: str) -> None:
    with pytest.raises(ConfigError, match="no such directory or file"):
        HFBackend("x", model)
