"""A local transformers model: a directory, a GGUF file or a hub id; batched, left-padded, greedy.

The tokenizer is loaded when first needed (to render prompts and count their tokens); the model's config
to learn its context length; the weights only when the first request misses the cache, so a fully cached
run never loads a model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_eval.backends.base import (
    Capabilities,
    Generation,
    GenerationConfig,
    LabelScoring,
    TokenScores,
    cut_at_stop,
    requested_decoding,
)
from persona_eval.errors import BackendError, ConfigError, MissingDependencyError
from persona_eval.prompts import RenderedMessages, SystemPolicy

__all__ = ["HFBackend", "weights_fingerprint"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
_PROBE = "PERSONA-EVAL-PROBE"
# Config fields that hold the context window, by model family (Llama/Qwen/Mistral, GPT-2, others).
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx",
                   "max_seq_len")
# A tokenizer's model_max_length above this is transformers' "not set" value (about 1e30), not a context.
_SANE_CONTEXT = 1 << 24
_SYSTEM_PROBE = "PERSONA-EVAL-SYSTEM-PROBE"


def weights_fingerprint(path: Path, *, memo_dir: Path | None = None) -> str:
    """"sha256:<hex>" over the names, sizes and contents of a model's weight files (one file or a
    directory). The digest is remembered in `memo_dir` by size and modification time, so a rerun
    does not hash gigabytes again."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*")
                                                   if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if not files:
        raise ConfigError(f"{path}: no model weights found (expected {', '.join(_WEIGHT_SUFFIXES)} files)")
    stamp = hashlib.sha256(json.dumps([[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
                           .encode()).hexdigest()
    memo = memo_dir / f"{stamp}.fingerprint" if memo_dir is not None else None
    if memo is not None and memo.exists():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(path) if file != path else file.name}\0{file.stat().st_size}\0"
                      .encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    fingerprint = f"sha256:{digest.hexdigest()}"
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(fingerprint)
    return fingerprint


def _import_transformers() -> tuple[Any, Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise MissingDependencyError(exc.name or "transformers", "The transformers backend",
                                     "pip install torch transformers") from None
    return torch, transformers.AutoTokenizer, transformers.AutoModelForCausalLM


class HFBackend:
    """A causal language model run in this process with transformers."""

    def __init__(self, name: str, model: str, *, gguf_file: str | None = None, device: str = "cpu",
                 dtype: str = "float32", batch_size: int | None = None, memo_dir: Path | None = None,
                 trust_remote_code: bool = False, reasoning: bool | None = None) -> None:
        self.name = name
        # Rows per generate call. On a CPU, 64 by default: a decode step there is bound by reading the
        # weights, so more rows cost little more per step (at batch 64 about half the time per row of
        # batch 16 on the embedded model); elsewhere 16, as accelerator memory allows for any model.
        self.batch_size = batch_size if batch_size is not None else (64 if device == "cpu" else 16)
        self.max_in_flight = 1  # one process, one model: parallelism is the batch
        # Whether a batch's shared prompt prefix is read once (see _read_prompts); off, every row reads its
        # whole prompt, as the tests and the benchmark compare.
        self.share_prefix = True
        # With share_prefix, how many rows of similar length read their own tokens together (each group is
        # padded to its own longest row); generate then runs over the whole batch at once.
        self.read_rows = 8
        # Whether the cache reserves room for the answer's tokens ahead (see _roomy_layer) instead of
        # transformers' concatenation at every step.
        self.reserve_room = True
        self._model_ref = model
        self._gguf_file = gguf_file
        self._device = device
        self._dtype = dtype
        self._memo_dir = memo_dir
        self._trust_remote_code = trust_remote_code
        # The chat template's thinking switch (``enable_thinking``), None: the template's own default.
        self._template_kwargs: dict[str, Any] = {} if reasoning is None else {"enable_thinking": reasoning}
        self._tokenizer: Any = None
        self._model: Any = None
        self._policy: SystemPolicy | None = None
        self._parameters: frozenset[str] | None = None
        self._fingerprint: str | None = None
        self._context: tuple[int | None] | None = None  # memo of context_length(), None until asked
        self._prefix: tuple[tuple[int, ...], Any] | None = None  # the last shared prefix read, and its cache
        self._plain: bool | None = None  # memo of _plain_cache()
        self._lock = threading.Lock()
        local = Path(model)
        if gguf_file is None and local.suffix == ".gguf":
            self._model_ref, self._gguf_file = str(local.parent), local.name
        self._local = Path(self._model_ref).exists()
        if not self._local and (model.startswith((".", "/", "~")) or model.count("/") > 1):
            raise ConfigError(f"model {name!r}: no such directory or file: {model}")

    # -- identity and prompts: cheap, no weights loaded ---------------------------------------------
    def identity(self) -> dict[str, Any]:
        if self._fingerprint is None:
            if self._local:
                path = Path(self._model_ref)
                target = path / self._gguf_file if self._gguf_file else path
                self._fingerprint = weights_fingerprint(target, memo_dir=self._memo_dir)
            else:
                self._fingerprint = f"hub:{self._model_ref}"
        return {"backend": "hf", "model": self._model_ref if not self._local else Path(self._model_ref).name,
                "gguf_file": self._gguf_file, "dtype": self._dtype, "weights": self._fingerprint}

    def address(self) -> dict[str, Any]:
        """The model path (resolved) or hub id: what is loaded from there is what identity() names."""
        where = str(Path(self._model_ref).resolve()) if self._local else self._model_ref
        return {"backend": "hf", "model": where, "gguf_file": self._gguf_file}

    def decoding(self, config: GenerationConfig, scoring: LabelScoring | None) -> dict[str, Any]:
        """Greedy whatever the config's temperature (do_sample false), at most max_new_tokens, stopping
        at the model's end-of-turn tokens and the config's stop sequences; label log-probabilities come
        from the full logits at each step (no top-k), and nothing is ever dropped."""
        return {**requested_decoding(config, scoring), "temperature": 0.0, "do_sample": False,
                "top_logprobs": None}

    def dropped_parameters(self) -> dict[str, str]:
        return {}

    def learn_dropped_parameters(self, known: dict[str, str]) -> None:
        """Nothing to learn: this process runs the model itself and sends no parameter anywhere."""

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            with self._lock:
                if self._tokenizer is None:
                    _, auto_tokenizer, _ = _import_transformers()
                    kwargs: dict[str, Any] = {"trust_remote_code": self._trust_remote_code}
                    if self._gguf_file:
                        kwargs["gguf_file"] = self._gguf_file
                    try:
                        tokenizer = auto_tokenizer.from_pretrained(self._model_ref, **kwargs)
                    except (OSError, ValueError) as exc:
                        raise BackendError(f"model {self.name!r}: cannot load the tokenizer of "
                                           f"{self._model_ref}: {exc}") from None
                    if getattr(tokenizer, "chat_template", None) is None:
                        raise ConfigError(f"model {self.name!r}: {self._model_ref} has no chat template; "
                                          "persona-eval needs an instruction-tuned (chat) model")
                    if self._template_kwargs and "enable_thinking" not in _template_text(tokenizer.chat_template):
                        raise ConfigError(f"model {self.name!r}: 'reasoning' switches thinking with the chat "
                                          f"template's enable_thinking, but the template of {self._model_ref} "
                                          "has no such switch; leave 'reasoning' out for this model")
                    tokenizer.padding_side = "left"
                    if tokenizer.pad_token_id is None:
                        tokenizer.pad_token = tokenizer.eos_token
                    self._tokenizer = tokenizer
        return self._tokenizer

    def system_policy(self) -> SystemPolicy:
        """Detect from the chat template whether it accepts a system message, and whether it inserts a
        default system prompt when none is sent (then the baseline sends an empty one)."""
        if self._policy is None:
            tokenizer = self.tokenizer  # load errors surface here, not as a "no system role" policy

            def render(messages: list[dict[str, str]]) -> str:
                return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                         **self._template_kwargs))
            user = {"role": "user", "content": _PROBE}
            try:
                with_empty_system = render([{"role": "system", "content": ""}, user])
                with_system = render([{"role": "system", "content": _SYSTEM_PROBE}, user])
            except Exception:  # templates that reject a system role raise their own error types
                self._policy = SystemPolicy(system_role_supported=False)
            else:
                folded = re.search(re.escape(_SYSTEM_PROBE) + r"\s*" + re.escape(_PROBE), with_system)
                without_system = render([user])
                self._policy = SystemPolicy(
                    # A template that folds the system text into the user turn (Gemma's) has no system
                    # role of its own: the declaration is then written into the user turn by us, openly.
                    system_role_supported=folded is None,
                    baseline_empty_system=folded is None and len(without_system) > len(with_empty_system))
        return self._policy

    def capabilities(self) -> Capabilities:
        return Capabilities(logprobs=True, prompt_scoring=True, constrained_json=False)

    def render_prompt(self, request: RenderedMessages) -> str:
        return str(self.tokenizer.apply_chat_template(request.as_dicts(), tokenize=False,
                                                      add_generation_prompt=True, **self._template_kwargs))

    # -- prompt lengths: the config and the tokenizer, never the weights -----------------------------
    def context_length(self) -> int | None:
        """The model's context window in tokens (prompt and answer together): the config's
        ``max_position_embeddings`` (or its family's name for it), else the tokenizer's
        ``model_max_length`` when that is a real number; None when neither says."""
        if self._context is None:
            length = _config_context(self._model.config) if self._model is not None else self._read_config_context()
            if length is None:
                declared = getattr(self.tokenizer, "model_max_length", None)
                if isinstance(declared, int) and 0 < declared <= _SANE_CONTEXT:
                    length = declared
            self._context = (length,)
        return self._context[0]

    def _read_config_context(self) -> int | None:
        _import_transformers()
        from transformers import AutoConfig

        kwargs: dict[str, Any] = {"trust_remote_code": self._trust_remote_code}
        if self._gguf_file:
            kwargs["gguf_file"] = self._gguf_file
        try:
            config = AutoConfig.from_pretrained(self._model_ref, **kwargs)
        except (OSError, ValueError, KeyError):  # no readable config: the tokenizer may still say
            return None
        return _config_context(config)

    def count_prompt_tokens(self, requests: Sequence[RenderedMessages]) -> list[int]:
        """The token count of each request's prompt exactly as :meth:`generate` sends it: the chat template
        with the generation prompt, tokenized without added special tokens; one batch call to the
        tokenizer, no weights loaded."""
        if not requests:
            return []
        prompts = [self.render_prompt(r) for r in requests]
        encoded = self.tokenizer(prompts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return [len(ids) for ids in encoded]

    # -- inference --------------------------------------------------------------------------------
    def _load(self) -> Any:
        if self._model is None:
            with self._lock:
                if self._model is None:
                    torch, _, auto_model = _import_transformers()
                    kwargs: dict[str, Any] = {"dtype": getattr(torch, self._dtype),
                                              "trust_remote_code": self._trust_remote_code}
                    if self._gguf_file:
                        kwargs["gguf_file"] = self._gguf_file
                    try:
                        model = auto_model.from_pretrained(self._model_ref, **kwargs)
                    except (OSError, ValueError) as exc:
                        raise BackendError(f"model {self.name!r}: cannot load {self._model_ref}: {exc}") from None
                    model.to(self._device)
                    model.eval()
                    self._model = model
        return self._model

    def _label_token_ids(self, scoring: LabelScoring) -> dict[str, list[int]]:
        """Token ids of each label's single-token spellings ("A", " A", ...)."""
        ids: dict[str, list[int]] = {}
        for label in scoring.labels:
            found = []
            for variant in scoring.variants(label):
                encoded = self.tokenizer.encode(variant, add_special_tokens=False)
                if len(encoded) == 1 and encoded[0] not in found:
                    found.append(encoded[0])
            if not found:
                raise BackendError(f"model {self.name!r}: no spelling of label {label!r} is a single token")
            ids[label] = found
        return ids

    def _label_logprobs(self, logits: Any, label_ids: dict[str, list[int]]) -> list[dict[str, float | None]]:
        torch, _, _ = _import_transformers()
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        per_label = {label: torch.logsumexp(logprobs[:, ids], dim=-1).tolist() for label, ids in label_ids.items()}
        return [{label: float(values[row]) for label, values in per_label.items()} for row in range(logits.shape[0])]

    def generate(self, requests: Sequence[RenderedMessages], config: GenerationConfig,
                 scoring: LabelScoring | None) -> list[Generation]:
        """One greedy generation per request. The prompts are read before generating (see
        :meth:`_read_prompts`): the tokens that every prompt of the batch starts with once, then each row's
        own; with `scoring`, the latent label is read from that pass (:attr:`Generation.prompt_label_logprobs`)."""
        torch, _, _ = _import_transformers()
        model = self._load()
        tokenizer = self.tokenizer
        prompts = [self.render_prompt(r) for r in requests]
        encoded = tokenizer(prompts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        label_ids = self._label_token_ids(scoring) if scoring is not None else None
        stop_ids = set(_as_list(model.generation_config.eos_token_id)) | {tokenizer.eos_token_id}
        extra: dict[str, Any] = {}
        if config.stop:
            # A row that ends at a stop sequence is padded from there on (it wrote no end-of-turn token).
            extra |= {"stop_strings": list(config.stop), "tokenizer": tokenizer}
            row_ends = stop_ids | {tokenizer.pad_token_id}
        else:
            row_ends = stop_ids
        with torch.inference_mode():
            read = self._read_prompts(encoded, scoring if label_ids is not None and scoring is not None
                                      and scoring.read_prompt else None, label_ids,
                                      room=config.max_new_tokens + 1 if self.reserve_room else 0)
            prompt_length = read.ids.shape[1]
            if config.constrained_ranking:
                from transformers import LogitsProcessorList

                from persona_eval.backends.constraints import ranking_constraint

                constraint = ranking_constraint(tokenizer, config.constrained_ranking, eos_token_ids=stop_ids)
                extra["logits_processor"] = LogitsProcessorList([constraint.processor(prompt_length)])
            output = model.generate(input_ids=read.ids, attention_mask=read.mask,
                                    max_new_tokens=config.max_new_tokens, do_sample=False,
                                    temperature=None, top_p=None, top_k=None,
                                    pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True,
                                    output_logits=label_ids is not None,
                                    **{self._cache_argument(): read.cache}, **extra)
        boundary = read.boundary
        new_tokens = output.sequences[:, prompt_length:].tolist()
        step_scores = ([self._label_logprobs(step, label_ids) for step in output.logits]
                       if label_ids is not None else None)
        results = []
        for row, ids in enumerate(new_tokens):
            length = next((i for i, t in enumerate(ids) if t in row_ends), len(ids))
            finish = "stop" if length < len(ids) else "length"
            ids = ids[:length]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            cut = cut_at_stop(text, config.stop)
            if cut is not None:  # the answer ends before its stop sequence, which is not part of it
                text, finish = text[:cut], "stop"
            tokens = None
            if step_scores is not None:
                tokens = []
                for step in range(length):
                    offset = len(tokenizer.decode(ids[:step], skip_special_tokens=True))
                    if cut is not None and offset >= cut:
                        break
                    tokens.append(TokenScores(offset=offset, token=tokenizer.decode(ids[step:step + 1]),
                                              label_logprobs=dict(step_scores[step][row])))
            results.append(Generation(text=text, tokens=tokens, finish_reason=finish,
                                      usage={"prompt_tokens": len(encoded[row]), "completion_tokens": length},
                                      prompt_label_logprobs=dict(boundary[row]) if boundary is not None else None))
        return results

    def _cache_argument(self) -> str:
        """The name under which this transformers takes a KV cache (``cache`` from 5.2x, before it
        ``past_key_values``)."""
        return "cache" if "cache" in self._forward_parameters() else "past_key_values"

    def _forward_parameters(self) -> frozenset[str]:
        """The parameters of the model's forward, read once."""
        if self._parameters is None:
            import inspect

            self._parameters = frozenset(inspect.signature(self._load().forward).parameters)
        return self._parameters

    def _forward(self, cache: Any, **inputs: Any) -> Any:
        """One forward pass extending `cache`; the logits of the last position only (a prompt pass needs
        none of the others, and the vocabulary's projection of every position costs a fifth of the pass)."""
        if "logits_to_keep" in self._forward_parameters():
            inputs["logits_to_keep"] = 1
        return self._model(use_cache=True, **{self._cache_argument(): cache}, **inputs)

    def _read_prompts(self, encoded: Sequence[Sequence[int]], scoring: LabelScoring | None,
                      label_ids: dict[str, list[int]] | None, *, room: int = 0) -> _ReadPrompts:
        """The KV cache of every prompt but its last token, ready for generate, and with `scoring`, the
        labels' log-probabilities after each whole prompt followed by ``scoring.answer_prefix``.

        The tokens that all the batch's prompts start with (a template's persona sentence and instructions,
        the same for every case of a persona) are read once, for one row (and kept for the next batch that
        starts with the same tokens), and that cache is repeated for every row; then each row's own tokens
        are read on top of it. The rows are laid out as [shared | padding | own], the padding masked and the
        positions counted over the tokens that are not, so every row sees exactly the positions and keys it
        would see alone (generate counts positions from the mask too). The own tokens are read in groups of
        at most :attr:`read_rows` rows of similar length, each padded only to its own longest row, and the
        groups' caches are then laid side by side (padded keys left at zero, masked) for one generate over
        the whole batch. The label reading extends each group's cache by the last token and the answer
        prefix (a few tokens per row) and is then cut off it again."""
        torch, _, _ = _import_transformers()

        rows = len(encoded)
        shared = _shared_prefix_length(encoded) if rows > 1 and self.share_prefix else 0
        width = max(len(tokens) for tokens in encoded) - shared
        ids = torch.full((rows, shared + width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((rows, shared + width), dtype=torch.long)
        for row, tokens in enumerate(encoded):
            own = tokens[shared:]
            ids[row, :shared] = torch.tensor(tokens[:shared], dtype=torch.long)
            ids[row, shared + width - len(own):] = torch.tensor(own, dtype=torch.long)
            mask[row, :shared] = 1
            mask[row, shared + width - len(own):] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        prefix = self._prefix_cache(encoded[0][:shared]) if shared else None
        prefix_ids = (self.tokenizer(scoring.answer_prefix, add_special_tokens=False)["input_ids"]
                      if scoring is not None and label_ids is not None else None)
        by_length = sorted(range(rows), key=lambda r: len(encoded[r]))
        size = self.read_rows if self.share_prefix and self.read_rows and self._plain_cache() else rows
        groups = [by_length[i:i + size] for i in range(0, rows, size)] if size < rows else [list(range(rows))]
        boundary: list[dict[str, float | None]] = [{} for _ in range(rows)]
        read: list[tuple[list[int], int, Any]] = []
        for group in groups:
            own_width = max(len(encoded[r]) for r in group) - shared
            columns = torch.cat([torch.arange(shared), torch.arange(shared + width - own_width, shared + width)]
                                ).to(self._device)
            index = torch.tensor(group, dtype=torch.long, device=self._device)
            cache, scores = self._read_group(prefix, ids[index][:, columns], mask[index][:, columns],
                                             positions[index][:, columns], shared, prefix_ids, label_ids)
            if scores is not None:
                for row, values in zip(group, scores, strict=True):
                    boundary[row] = values
            read.append((group, own_width, cache))
        if len(read) > 1:
            cache = _side_by_side(read, rows, shared, width, room)
        else:
            cache = read[0][2]
            if room and self._plain_cache():
                _reserve(cache, room)
        return _ReadPrompts(ids=ids, mask=mask, cache=cache, boundary=boundary if prefix_ids is not None else None)

    def _plain_cache(self) -> bool:
        """Whether this model's KV cache is one plain key and value tensor per layer (no sliding window, no
        recurrent state), which groups of rows read apart can be laid side by side in."""
        if self._plain is None:
            from transformers import DynamicCache
            from transformers.cache_utils import DynamicLayer

            cache = DynamicCache(config=self._model.config)
            self._plain = (all(type(layer) is DynamicLayer for layer in cache.layers) if cache.layers
                           else getattr(cache, "layer_class_to_replicate", None) is DynamicLayer)
        return self._plain

    def _prefix_cache(self, tokens: Sequence[int]) -> Any:
        """The KV cache of `tokens` for one row: read once and kept for the next batch that starts with the
        same tokens (the cases of one persona come in several batches)."""
        torch, _, _ = _import_transformers()
        from transformers import DynamicCache

        key = tuple(tokens)
        if self._prefix is None or self._prefix[0] != key:
            cache = DynamicCache(config=self._model.config)
            ids = torch.tensor([list(tokens)], dtype=torch.long, device=self._device)
            self._forward(cache, input_ids=ids, position_ids=torch.arange(len(tokens), device=self._device)[None])
            self._prefix = (key, cache)
        return self._prefix[1]

    def _read_group(self, prefix: Any, ids: Any, mask: Any, positions: Any, shared: int,
                    answer_prefix: list[int] | None, label_ids: dict[str, list[int]] | None
                    ) -> tuple[Any, list[dict[str, float | None]] | None]:
        """The cache of some rows laid out as [shared | padding | own] (`ids`, `mask`, `positions`), all but
        the last token read on top of a copy of the `prefix` cache, and the label log-probabilities after each
        whole prompt followed by `answer_prefix`."""
        torch, _, _ = _import_transformers()
        from transformers import DynamicCache

        rows = ids.shape[0]
        if prefix is not None:
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(rows)
        else:
            cache = DynamicCache(config=self._model.config)
        if ids.shape[1] - shared > 1:
            self._forward(cache, input_ids=ids[:, shared:-1], attention_mask=mask[:, :-1],
                          position_ids=positions[:, shared:-1])
        if answer_prefix is None or label_ids is None:
            return cache, None
        tail = torch.tensor([answer_prefix] * rows, dtype=ids.dtype, device=ids.device).reshape(rows, -1)
        extended = torch.cat([ids[:, -1:], tail], dim=1)
        rollback = cache.is_croppable
        branch = cache if rollback else copy.deepcopy(cache)
        logits = self._forward(branch, input_ids=extended,
                               attention_mask=torch.cat([mask, torch.ones_like(tail, dtype=mask.dtype)], dim=1),
                               position_ids=positions[:, -1:] + torch.arange(extended.shape[1],
                                                                             device=ids.device)).logits[:, -1, :]
        if rollback:
            cache.crop(-extended.shape[1])
        return cache, self._label_logprobs(logits, label_ids)

    def score_labels(self, requests: Sequence[RenderedMessages], scoring: LabelScoring
                     ) -> list[dict[str, float | None]]:
        torch, _, _ = _import_transformers()
        model = self._load()
        prompts = [self.render_prompt(r) + scoring.answer_prefix for r in requests]
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False
                               ).to(self._device)
        with torch.inference_mode():
            logits = model(**batch).logits[:, -1, :]
        return self._label_logprobs(logits, self._label_token_ids(scoring))

    @property
    def loaded(self) -> bool:
        """Whether the weights were loaded in this process (a fully cached run loads none)."""
        return self._model is not None

    def close(self) -> None:
        self._model = None
        self._prefix = None


def _config_context(config: Any) -> int | None:
    """The context window a transformers config declares (a multimodal config's text part's), if any."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for part in (text_config, config):
        for name in _CONTEXT_FIELDS:
            value = getattr(part, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _template_text(template: Any) -> str:
    """A tokenizer's chat template as one text (a template may be a mapping of named templates)."""
    if isinstance(template, Mapping):
        return "\n".join(str(t) for t in template.values())
    if isinstance(template, list):
        return "\n".join(str(t.get("template", "")) if isinstance(t, Mapping) else str(t) for t in template)
    return str(template)


@dataclass
class _ReadPrompts:
    """A batch's prompts as generate takes them (`ids`, `mask`), the KV cache of all but their last token,
    and the labels' log-probabilities at the prompt boundary (None when not asked)."""

    ids: Any
    mask: Any
    cache: Any
    boundary: list[dict[str, float | None]] | None


def _side_by_side(read: Sequence[tuple[list[int], int, Any]], rows: int, shared: int, width: int,
                  room: int) -> Any:
    """One cache for all `rows` from the caches of groups of them, each (rows of the group, its own width,
    its cache laid out as [shared | padding | own] but one token): each group's own tokens move right to
    the batch's `width`, the new columns between zero (masked, they are never attended to); with `room` for
    that many more tokens (see :func:`_reserve`)."""
    torch, _, _ = _import_transformers()

    first = next((cache for _, _, cache in read if cache.get_seq_length() > 0), None)
    if first is None:  # one token per prompt and none shared: nothing cached yet
        return read[0][2]
    for layer_index, layer in enumerate(first.layers):
        merged = []
        for name in ("keys", "values"):
            sample = getattr(layer, name)
            out = sample.new_zeros((rows, sample.shape[1], shared + width - 1 + room, sample.shape[3]))
            for group, own_width, cache in read:
                if cache.get_seq_length() == 0:
                    continue
                part = getattr(cache.layers[layer_index], name)
                index = torch.tensor(group, dtype=torch.long, device=part.device)
                out[index, :, :shared] = part[:, :, :shared]
                out[index, :, shared + width - own_width:shared + width - 1] = part[:, :, shared:]
            merged.append(out)
        layer.__class__ = _roomy_layer()
        layer.room_keys, layer.room_values = merged
        layer.keys, layer.values = (part[..., :shared + width - 1, :] for part in merged)
    return first


_ROOMY: Any = None


def _roomy_layer() -> Any:
    """A plain cache layer that writes each step's keys and values into room reserved after them, where
    transformers' own concatenates the whole cache anew at every step (at batch 64 on a CPU, more time
    than the model's matrix products). The cached tensors are views of the room; a layer whose tensors were
    replaced (a batch reordered) reserves room again."""
    global _ROOMY
    if _ROOMY is None:
        from transformers.cache_utils import DynamicLayer

        class RoomyLayer(DynamicLayer):
            room_keys: Any = None
            room_values: Any = None

            def reserve(self, extra: int) -> None:
                keys: Any = self.keys
                values: Any = self.values
                length = keys.shape[-2]
                self.room_keys = keys.new_empty((*keys.shape[:-2], length + extra, keys.shape[-1]))
                self.room_values = values.new_empty((*values.shape[:-2], length + extra, values.shape[-1]))
                self.room_keys[..., :length, :] = keys
                self.room_values[..., :length, :] = values
                self.keys, self.values = self.room_keys[..., :length, :], self.room_values[..., :length, :]

            def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
                keys: Any = self.keys
                values: Any = self.values
                if not self.is_initialized or keys.numel() == 0:
                    return super().update(key_states, value_states, *args, **kwargs)
                length, added = keys.shape[-2], key_states.shape[-2]
                if (self.room_keys is None or keys.data_ptr() != self.room_keys.data_ptr()
                        or values.data_ptr() != self.room_values.data_ptr()
                        or length + added > self.room_keys.shape[-2]):
                    self.reserve(added + max(length // 2, 32))
                self.room_keys[..., length:length + added, :] = key_states
                self.room_values[..., length:length + added, :] = value_states
                self.keys = self.room_keys[..., :length + added, :]
                self.values = self.room_values[..., :length + added, :]
                return self.keys, self.values

        _ROOMY = RoomyLayer
    return _ROOMY


def _reserve(cache: Any, extra: int) -> None:
    """Room for `extra` more tokens in every layer of a plain cache (see :func:`_roomy_layer`)."""
    roomy = _roomy_layer()
    for layer in cache.layers:
        if layer.is_initialized and layer.keys.numel() > 0 and type(layer) is not roomy:
            layer.__class__ = roomy
            layer.reserve(extra)


def _shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """How many tokens every row starts with, leaving each row at least one of its own (generate reads the
    last prompt token itself).

    >>> _shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]])
    2
    >>> _shared_prefix_length([[7, 8], [7, 8]])
    1
    """
    shortest = min(len(row) for row in rows)
    length = 0
    while length < shortest - 1 and all(row[length] == rows[0][length] for row in rows):
        length += 1
    return length


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [int(value)]
