"""Tests of persona_eval.backends: model specs, the models YAML file, and the HF backend's identity."""

from __future__ import annotations

import inspect
import os
import sys
import types
from pathlib import Path

import pytest

from persona_eval.backends import (
    BACKENDS,
    SERVED_MAX_NEW_TOKENS,
    ModelSpec,
    create_backend,
    load_models_file,
    parse_model_spec,
)
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
    device: cpu
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


def _error(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_models_file(path)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def test_load_models_file(tmp_path: Path) -> None:
    (tmp_path / "Llama-3.1-8B-Instruct").mkdir()
    text = VALID_MODELS.replace("/models/Llama-3.1-8B-Instruct", str(tmp_path / "Llama-3.1-8B-Instruct"))
    specs = load_models_file(_write(tmp_path, text))
    assert list(specs) == ["llama-8b", "served", "my model/v2"]
    assert specs["llama-8b"] == ModelSpec("llama-8b", "hf", {
        "model": str(tmp_path / "Llama-3.1-8B-Instruct"), "dtype": "bfloat16", "device": "cpu", "batch_size": 32})
    assert specs["served"] == ModelSpec("served", "openai", {
        "model": "meta-llama/Llama-3.1-70B-Instruct", "base_url": "http://gpu-host:8000/v1",
        "api_key_env": "VLLM_API_KEY", "max_in_flight": 64})
    # The name in results and test ids is safe for file names; the key stays what the user wrote.
    assert specs["my model/v2"] == ModelSpec("my-model-v2", "embedded", {"batch_size": 8})
    assert parse_model_spec("served", specs) is specs["served"]


def test_specs_from_a_file_know_where_each_option_was_given(tmp_path: Path) -> None:
    path = _write(tmp_path, VALID_MODELS.replace("/models/Llama-3.1-8B-Instruct", "org/llama"))
    specs = load_models_file(path)
    assert specs["llama-8b"].where("dtype") == f"{path}:6: models.llama-8b.dtype"
    assert specs["served"].where() == f"{path}:9: models.served"
    assert str(specs["served"].error("max_in_flight", "too many")) == (
        f"{path}:14: models.served.max_in_flight: too many")
    # An option that was not given is reported at its model's entry.
    assert specs["my model/v2"].where("device") == f"{path}:15: models.my model/v2.device"
    assert parse_model_spec("smollm2").where("device") == "model 'smollm2': device"


@pytest.mark.parametrize(("text", "line", "fragments"), [
    pytest.param("models:\n  x:\n    backend: openi\n    model: m\n", 3,
                 ["models.x.backend", "unknown backend 'openi'", "Did you mean 'openai'",
                  "Known: embedded, hf, openai"], id="unknown-backend"),
    pytest.param("models:\n  x:\n    model: m\n", 2, ["models.x: missing key 'backend'", "embedded, hf, openai"],
                 id="missing-backend"),
    pytest.param("models:\n  x:\n    backend: hf\n    model: m\n    batchsize: 4\n", 5,
                 ["models.x.batchsize", "unknown option for backend 'hf' 'batchsize'",
                  "Did you mean 'batch_size'"], id="unknown-option"),
    pytest.param("models:\n  x:\n    backend: openai\n    model: m\n    base-url: http://h/v1\n", 5,
                 ["models.x.base-url", "Did you mean 'base_url'"], id="unknown-openai-option"),
    pytest.param("models:\n  x:\n    backend: embedded\n    model: m\n", 4,
                 ["models.x.model", "unknown option for backend 'embedded'"], id="model-for-embedded"),
    pytest.param("models:\n  x:\n    backend: hf\n    dtype: float16\n", 2, ["models.x.model: missing"],
                 id="missing-model-hf"),
    pytest.param("models:\n  x:\n    backend: openai\n    model: ''\n", 4,
                 ["models.x.model: expected the model path, hub id or served name, got ''"],
                 id="empty-model-openai"),
    pytest.param("models:\n  x: hf\n", 2, ["models.x: expected a mapping"], id="entry-not-mapping"),
    pytest.param("models: [a, b]\n", 1, ["top-level key 'models'"], id="models-not-mapping"),
    pytest.param("model:\n  x: {backend: hf, model: m}\n", 1,
                 ["model: unknown key 'model'. Did you mean 'models'?"], id="near-miss-top-level-key"),
    pytest.param("models:\n  x: {backend: hf, model: m}\njudges: []\n", 3,
                 ["judges: unknown top-level key 'judges'"], id="unknown-top-level-key"),
    pytest.param("models: {x: [unclosed\n", 2, ["not valid YAML"], id="not-yaml"),
    pytest.param("models:\n  x:\n    backend: hf\n    model: m\n    model: n\n", 5,
                 ["models.x.model: duplicate key 'model' (first given on line 4)"], id="duplicate-option"),
    pytest.param("models:\n  x: {backend: embedded}\n  x: {backend: hf, model: m}\n", 3,
                 ["models.x: duplicate key 'x' (first given on line 2)"], id="duplicate-model"),
    pytest.param("models:\n  my model: {backend: embedded}\n  my-model: {backend: embedded}\n", 3,
                 ["models.my-model: its name in results, 'my-model', is that of", ":2: models.my model too"],
                 id="same-safe-name"),
])
def test_invalid_models_file_names_the_file_line_and_entry(tmp_path: Path, text: str, line: int,
                                                           fragments: list[str]) -> None:
    path = _write(tmp_path, text)
    message = _error(path)
    assert message.startswith(f"{path}:{line}: "), message
    for fragment in fragments:
        assert fragment in message, message


def test_llama_without_models_key_is_refused_at_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "llama: {backend: hf}\n")
    assert _error(path).startswith(f"{path}: ")
    assert "top-level key 'models'" in _error(path)


def _option_error(tmp_path: Path, backend: str, option: str, value: str) -> str:
    model = "" if backend == "embedded" else "\n    model: org/some-model"
    path = _write(tmp_path, f"models:\n  m:\n    backend: {backend}{model}\n    {option}: {value}\n")
    message = _error(path)
    line = 4 if backend == "embedded" else 5
    assert message.startswith(f"{path}:{line}: models.m.{option}: "), message
    return message


@pytest.mark.parametrize(("value", "meant"), [
    ("bf16", "bfloat16"), ("fp16", "float16"), ("half", "float16"), ("fp32", "float32"),
    ("torch.bfloat16", "bfloat16"), ("Float16", "float16"), ("bfloat61", "bfloat16"),
])
def test_dtype_aliases_suggest_the_torch_name(tmp_path: Path, value: str, meant: str) -> None:
    message = _option_error(tmp_path, "hf", "dtype", value)
    assert f"{value!r} is not a torch dtype; did you mean {meant!r}?" in message
    assert "Known: float32, float16, bfloat16." in message


@pytest.mark.parametrize("backend", ["hf", "embedded"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_dtypes_are_accepted(tmp_path: Path, backend: str, dtype: str) -> None:
    model = "" if backend == "embedded" else "\n    model: org/some-model"
    path = _write(tmp_path, f"models:\n  m:\n    backend: {backend}{model}\n    dtype: {dtype}\n")
    assert load_models_file(path)["m"].options["dtype"] == dtype


def test_dtype_auto_is_refused_with_what_to_give(tmp_path: Path) -> None:
    message = _option_error(tmp_path, "hf", "dtype", "auto")
    assert "'auto' is not supported" in message and "float32, float16, bfloat16" in message


@pytest.mark.parametrize(("backend", "option", "value", "fragment"), [
    ("hf", "device", "gpu", "'gpu' is not a device; did you mean 'cuda'?"),
    ("hf", "device", "GPU:1", "did you mean 'cuda:1'?"),
    ("embedded", "device", "cpus", "did you mean 'cpu'?"),
    ("hf", "device", "cuda:x", "'cuda:x' is not a device"),
    ("hf", "device", "3", "expected a device (cpu, cuda, cuda:N, mps, auto), got 3"),
    ("hf", "batch_size", "0", "expected a whole number >= 1, got 0"),
    ("embedded", "batch_size", "'8'", "expected a whole number >= 1, got '8'"),
    ("hf", "batch_size", "true", "got True"),
    ("hf", "batch_size", "2.5", "got 2.5"),
    ("hf", "trust_remote_code", "'yes please'", "expected true or false, got 'yes please'"),
    ("hf", "gguf_file", "model.bin", "'model.bin' is not a .gguf file name"),
    ("hf", "gguf_file", "''", "expected the name of a .gguf file"),
    ("openai", "max_in_flight", "0", "expected a whole number >= 1, got 0"),
    ("openai", "max_retries", "-1", "expected a whole number >= 0, got -1"),
    ("openai", "timeout", "0", "expected a positive number of seconds, got 0"),
    ("openai", "timeout", "fast", "got 'fast'"),
    ("openai", "timeout", ".inf", "got inf"),
    ("openai", "logprobs", "'true'", "expected true or false, got 'true'"),
    ("openai", "prompt_scoring", "1", "expected true or false, got 1"),
    ("openai", "baseline_system", "omitted", "expected 'empty'"),
    ("openai", "baseline_system", "omitted", "Did you mean 'omit'?"),
    ("openai", "api_key_env", "sk-abc123", "not the key itself"),
    ("openai", "api_key_env", "MY KEY", "expected the name of an environment variable"),
    ("openai", "revision", "''", "expected text naming the deployed weights"),
    ("openai", "revision", "[1]", "got a list"),
    ("openai", "max_new_tokens", "0", "expected a whole number >= 1, got 0"),
    ("hf", "max_new_tokens", "'long'", "or a mapping of task names to numbers of tokens"),
    ("embedded", "max_new_tokens", "{triage: 0}", "triage: expected a whole number >= 1, got 0"),
    ("openai", "max_new_tokens", "{}", "expected a number of tokens, or a mapping"),
    ("openai", "stop", "[]", "expected a stop sequence or a list of them"),
    ("hf", "stop", "['']", "item 1: expected a non-empty string"),
    ("hf", "stop", "[a, 3]", "item 2: expected a non-empty string"),
    ("openai", "stop", "[x, x]", "a stop sequence is given twice"),
    ("embedded", "stop", "{triage: 3}", "triage: expected a stop sequence or a list of them, e.g. [\"</answer>\"],"),
    ("openai", "stop", "[a, b, c, d, e]", "the hosted OpenAI API takes at most 4 stop sequences, got 5"),
    ("hf", "reasoning", "'off'", "expected true or false, got 'off'"),
    ("openai", "reasoning", "false", "the hosted OpenAI API has no chat template to switch thinking"),
])
def test_bad_option_values_name_the_file_line_and_option(tmp_path: Path, backend: str, option: str,
                                                         value: str, fragment: str) -> None:
    assert fragment in _option_error(tmp_path, backend, option, value)


@pytest.mark.parametrize(("url", "fragment"), [
    ("gpu-host:8000/v1", "must start with http:// or https://"),
    ("ftp://host/v1", "must start with http:// or https://"),
    ("http:///v1", "names no host"),
    ("http://:8000/v1", "names no host"),
    ("http://host:80x/v1", "has a port that is not a number"),
    ("http://host:99999/v1", "has a port that is not a number"),
    ("'http://gpu host:8000/v1'", "contains a space"),
    ("http://host/v1#models", "fragment"),
    ("8000", "expected a URL"),
])
def test_malformed_base_url_is_refused_at_load(tmp_path: Path, url: str, fragment: str) -> None:
    assert fragment in _option_error(tmp_path, "openai", "base_url", url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/v1", "https://api.example.org/v1",
                                 "http://[::1]:8000/v1", "http://gpu-host/v1?api-version=1"])
def test_well_formed_base_urls_are_accepted(tmp_path: Path, url: str) -> None:
    path = _write(tmp_path, f"models:\n  m:\n    backend: openai\n    model: m\n    base_url: '{url}'\n")
    assert load_models_file(path)["m"].options["base_url"] == url


def test_command_line_base_url_is_checked_the_same_way() -> None:
    with pytest.raises(ConfigError, match="names no host"):
        parse_model_spec("openai:my-model@http://:8000/v1")


def test_a_missing_local_model_path_is_refused_at_load(tmp_path: Path) -> None:
    path = _write(tmp_path, f"models:\n  m:\n    backend: hf\n    model: {tmp_path / 'absent'}\n")
    assert _error(path) == f"{path}:4: models.m.model: no such directory or file: {tmp_path / 'absent'}"


def test_revision_needs_a_backend_that_can_pin_it(tmp_path: Path) -> None:
    from persona_eval.backends.hf import HFBackend

    path = _write(tmp_path, "models:\n  m:\n    backend: hf\n    model: org/m\n    revision: v2\n")
    if "revision" in inspect.signature(HFBackend).parameters:
        assert load_models_file(path)["m"].options["revision"] == "v2"
    else:
        assert "hf backend cannot pin a revision" in _error(path)


@pytest.mark.parametrize("revision", ["gpt-4o-2024-08-06", "2024-08-06", "3"])
def test_openai_revision_is_accepted_as_text_date_or_number(tmp_path: Path, revision: str) -> None:
    from persona_eval.backends.openai_compat import OpenAIBackend

    if "revision" not in inspect.signature(OpenAIBackend).parameters:
        pytest.skip("the openai backend of this checkout takes no revision")
    path = _write(tmp_path, f"models:\n  m:\n    backend: openai\n    model: gpt-4o\n    revision: {revision}\n")
    assert str(load_models_file(path)["m"].options["revision"]) == revision


# --- devices: checked when a named model is used ----------------------------------------------------


class _FakeCuda:
    def __init__(self, count: int) -> None:
        self.count = count

    def is_available(self) -> bool:
        return self.count > 0

    def device_count(self) -> int:
        return self.count


def _fake_torch(monkeypatch: pytest.MonkeyPatch, *, cuda: int, mps: bool = False) -> None:
    torch = types.SimpleNamespace(__version__="0.test", cuda=_FakeCuda(cuda),
                                  backends=types.SimpleNamespace(mps=types.SimpleNamespace(
                                      is_available=lambda: mps)))
    monkeypatch.setitem(sys.modules, "torch", torch)


def _device_spec(tmp_path: Path, device: str) -> tuple[Path, dict[str, ModelSpec]]:
    path = _write(tmp_path, f"models:\n  m:\n    backend: embedded\n    device: '{device}'\n")
    return path, load_models_file(path)


@pytest.mark.parametrize(("device", "count", "fragment"), [
    ("cuda", 0, "'cuda' names a CUDA GPU, but torch finds none on this machine"),
    ("cuda:0", 0, "did you mean 'cpu'?"),
    ("cuda:2", 2, "'cuda:2' names CUDA GPU 2, but this machine has 2 (cuda:0 to cuda:1); did you mean 'cuda:1'?"),
    ("cuda:1", 1, "this machine has 1 (cuda:0); did you mean 'cuda:0'?"),
])
def test_a_cuda_device_this_machine_lacks_is_refused_before_loading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str, count: int, fragment: str) -> None:
    _fake_torch(monkeypatch, cuda=count)
    path, specs = _device_spec(tmp_path, device)  # the file itself loads: the device may be another machine's
    with pytest.raises(ConfigError) as caught:
        parse_model_spec("m", specs)
    assert str(caught.value).startswith(f"{path}:4: models.m.device: ")
    assert fragment in str(caught.value)


@pytest.mark.parametrize(("device", "count"), [("cuda", 1), ("cuda:0", 1), ("cuda:3", 4)])
def test_a_cuda_device_this_machine_has_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    device: str, count: int) -> None:
    _fake_torch(monkeypatch, cuda=count)
    _, specs = _device_spec(tmp_path, device)
    assert parse_model_spec("m", specs) is specs["m"]


def test_mps_without_an_apple_gpu_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_torch(monkeypatch, cuda=0, mps=False)
    _, specs = _device_spec(tmp_path, "mps")
    with pytest.raises(ConfigError, match="'mps' names an Apple GPU, but torch finds none"):
        parse_model_spec("m", specs)
    _fake_torch(monkeypatch, cuda=0, mps=True)
    assert parse_model_spec("m", specs) is specs["m"]


def test_cpu_and_auto_need_no_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # an import of torch would raise ImportError
    for device in ("cpu", "auto"):
        _, specs = _device_spec(tmp_path, device)
        assert parse_model_spec("m", specs) is specs["m"]


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


@pytest.mark.parametrize(("cuda", "mps", "resolved"), [(1, False, "cuda"), (0, True, "mps"), (0, False, "cpu")])
def test_device_auto_resolves_when_the_backend_is_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      cuda: int, mps: bool, resolved: str) -> None:
    _fake_torch(monkeypatch, cuda=cuda, mps=mps)
    path = _write(tmp_path, "models:\n  m:\n    backend: hf\n    model: org/some-model\n    device: auto\n")
    backend = create_backend(load_models_file(path)["m"], cache_dir=tmp_path)
    assert backend._device == resolved  # type: ignore[attr-defined]


def test_answer_budgets_and_stop_sequences_per_model_and_task_are_read_and_never_reach_the_backend(
        tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("models:\n"
                    "  reasoner:\n    backend: openai\n    model: r1\n    base_url: http://127.0.0.1:9/v1\n"
                    "    max_new_tokens: {triage: 2048}\n"
                    "    stop: {triage: ['</answer>', \"\\n\\n\"]}\n    reasoning: false\n"
                    "  local:\n    backend: embedded\n    max_new_tokens: 48\n    stop: END\n")
    specs = load_models_file(path)
    reasoner, local = specs["reasoner"], specs["local"]
    assert (reasoner.max_new_tokens("triage"), reasoner.max_new_tokens("safety")) == (2048, None)
    assert (local.max_new_tokens("triage"), local.max_new_tokens("safety")) == (48, 48)
    assert (reasoner.stop("triage"), reasoner.stop("safety")) == (("</answer>", "\n\n"), ())
    assert (local.stop("triage"), local.stop("safety")) == (("END",), ("END",))
    # Without a budget: a served model gets the study's budget, a local model its task's.
    assert reasoner.default_max_new_tokens(32) == SERVED_MAX_NEW_TOKENS == 1024
    assert local.default_max_new_tokens(32) == 32
    # Budgets and stop sequences shape the run, not the backend: it is made without them (it takes no such
    # argument); the thinking switch is the backend's.
    backend = create_backend(reasoner, cache_dir=tmp_path)
    assert backend.name == "reasoner" and backend.reasoning is False  # type: ignore[attr-defined]
    assert not hasattr(backend, "stop")


def test_the_embedded_model_has_no_thinking_switch(tmp_path: Path) -> None:
    message = _option_error(tmp_path, "embedded", "reasoning", "true")
    assert "'reasoning'" in message and "stop" in message  # the options it does take are listed


def test_hosted_stop_limit_is_checked_per_task(tmp_path: Path) -> None:
    path = _write(tmp_path, "models:\n  m:\n    backend: openai\n    model: gpt\n"
                            "    stop: {safety: [a, b, c, d, e]}\n")
    assert _error(path).startswith(f"{path}:5: models.m.stop.safety: the hosted OpenAI API takes at most 4")
