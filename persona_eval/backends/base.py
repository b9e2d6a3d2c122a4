"""The interface every model backend implements: a list of requests in, one result per request out.

A backend knows how to talk to one model. It does not cache, retry across runs, or decide how many
requests are in flight: the runner does that (persona_eval.runner).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from persona_eval.prompts import RenderedMessages, SystemPolicy

__all__ = [
    "Backend",
    "Capabilities",
    "Generation",
    "GenerationConfig",
    "LabelScoring",
    "TokenScores",
    "cut_at_stop",
    "logsumexp",
    "requested_decoding",
]


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings. Greedy (temperature 0) is the only mode the evals use."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    # When set to k: the reply must be the JSON object {"ranking": [...]} holding a permutation of
    # 1..k (judge rankings). Backends constrain decoding to it where they can (vLLM: a JSON schema;
    # transformers: a logits processor); the caller validates the reply either way.
    constrained_ranking: int | None = None
    # Stop sequences (a models file's ``stop``): the answer ends before the first one it writes, which is
    # not part of the text (as OpenAI-compatible servers return it), with finish reason "stop".
    stop: tuple[str, ...] = ()

    def key(self) -> dict[str, Any]:
        """The cache key's part of these settings; a setting at its default is left out, so that adding a
        setting keeps the keys of the runs that do not use it."""
        key = asdict(self)
        if not self.stop:
            del key["stop"]
        else:
            key["stop"] = list(self.stop)
        return key


@dataclass(frozen=True)
class LabelScoring:
    """Which labels to read log-probabilities for, and how they may be spelled as one token.

    ``spellings`` are patterns with ``{label}``: "A", " A", "\\nA" are the same answer. Their
    probabilities are summed (logsumexp) before the softmax over labels. ``answer_prefix`` follows the
    prompt when the labels are scored at the prompt boundary (the latent label; persona_eval.evaluation).
    ``read_prompt``: a backend that can read that boundary in the generation pass (from the prompt's KV
    cache) does so, into :attr:`Generation.prompt_label_logprobs`.
    """

    labels: tuple[str, ...] = ("A", "B", "C")
    spellings: tuple[str, ...] = ("{label}", " {label}", "\n{label}")
    answer_prefix: str = "Answer:"
    top_logprobs: int = 20
    read_prompt: bool = True

    def variants(self, label: str) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.format(label=label) for s in self.spellings))

    def key(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TokenScores:
    """One generated token: where it starts in the generated text, and each label's log-probability
    at that position (logsumexp over the label's spellings). A label whose spellings were all absent
    from the backend's top-k is None."""

    offset: int
    token: str
    label_logprobs: dict[str, float | None]
    # For top-k APIs: the lowest log-probability in the top-k, an upper bound for any absent label.
    floor: float | None = None


@dataclass
class Generation:
    """The output of one request. ``tokens`` is None when the backend gives no log-probabilities.

    ``sent`` is the decoding actually sent for it, in the shape of :func:`requested_decoding` without
    ``dropped``, from a backend that may send less than was planned (a server refused a parameter while
    the request was in flight); None from a backend that always sends what :meth:`Backend.decoding`
    said. The runner stores the generation under the cache key of what was sent.

    ``masked`` names the secrets (see persona_eval.redaction) that were found in the answer and masked
    in ``text`` and ``tokens``: a server that echoes its request headers is reported, not hidden.

    ``prompt_label_logprobs``: each label's log-probability at the prompt boundary after
    ``LabelScoring.answer_prefix``, from a backend that reads it in the generation pass; None otherwise
    (then it is scored with :meth:`Backend.score_labels`)."""

    text: str
    tokens: list[TokenScores] | None = None
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    sent: dict[str, Any] | None = None
    masked: list[str] = field(default_factory=list)
    prompt_label_logprobs: dict[str, float | None] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Generation:
        tokens = data.get("tokens")
        return cls(
            text=data["text"],
            tokens=None if tokens is None else [TokenScores(**t) for t in tokens],
            finish_reason=data.get("finish_reason"),
            usage=dict(data.get("usage") or {}),
            sent=data.get("sent"),
            masked=list(data.get("masked") or []),  # rows cached before it was recorded hold none
            prompt_label_logprobs=data.get("prompt_label_logprobs"),
        )


@dataclass(frozen=True)
class Capabilities:
    """What a backend can give beyond text."""

    logprobs: bool = True          # label log-probabilities at each generated position
    prompt_scoring: bool = True    # label log-probabilities at the prompt boundary (the fallback)
    constrained_json: bool = False  # JSON-schema-constrained generation


@runtime_checkable
class Backend(Protocol):
    """A model behind one small batch interface (after lm-evaluation-harness's LM class).

    ``generate`` and ``score_labels`` take a list and return one result per item, in order. They may be
    called from several threads at once when ``max_in_flight`` > 1.

    Two more methods are optional and looked up with ``getattr`` (persona_eval.lengths), not members of
    this protocol, so that a backend without them still is one:

    ``context_length() -> int | None``
        The model's context window in tokens (prompt and answer together), None when unknown; it must not
        load the weights. Without it the ``max_model_len`` of :meth:`identity` is used, when a server
        reports one.
    ``count_prompt_tokens(requests: Sequence[RenderedMessages]) -> list[int | None]``
        The token count of each request's prompt exactly as it is sent (chat template and generation
        prompt included), one per request, in order; cheap (the tokenizer in one batch, no weights; a
        server's tokenizer endpoint). None for a prompt it cannot count. Without it (or for a None)
        prompt lengths are judged by their characters alone.
    """

    name: str
    batch_size: int
    max_in_flight: int

    def identity(self) -> dict[str, Any]:
        """What identifies the model's outputs: backend kind, model, weights fingerprint (for a served
        model: what the server reports about its weights and process). Plain JSON, memoized: it must not
        load the model, it may ask a server once, and it never holds a secret (it is part of every cache
        key)."""
        ...

    def address(self) -> dict[str, Any]:
        """Where the model is found (backend kind, served name and URL, or model path), whatever is
        behind it: the runner compares the identity found at an address with the one cached before.
        Optional: without it the address is the identity's backend, model and base_url."""
        ...

    def decoding(self, config: GenerationConfig, scoring: LabelScoring | None) -> dict[str, Any]:
        """What a request with `config` and `scoring` sends now, in the shape of
        :func:`requested_decoding`, with ``dropped`` naming each parameter the model refused and why.
        Optional: without it the runner reports :func:`requested_decoding`."""
        ...

    def dropped_parameters(self) -> dict[str, str]:
        """Each parameter this backend no longer sends because the model refused it -> the reason.
        Optional, with :meth:`learn_dropped_parameters`."""
        ...

    def learn_dropped_parameters(self, known: dict[str, str]) -> None:
        """Parameters recorded as refused by this model in an earlier run: not sent from now on, so
        that the cache keys computed before sending are those of what is sent."""
        ...

    def system_policy(self) -> SystemPolicy: ...

    def capabilities(self) -> Capabilities: ...

    def render_prompt(self, request: RenderedMessages) -> str:
        """The exact text the model sees for `request` (or, for a remote chat API, a transcript)."""
        ...

    def generate(self, requests: Sequence[RenderedMessages], config: GenerationConfig,
                 scoring: LabelScoring | None) -> list[Generation]: ...

    def score_labels(self, requests: Sequence[RenderedMessages], scoring: LabelScoring
                     ) -> list[dict[str, float | None]]:
        """Each label's log-probability right after the prompt, the assistant turn opened and
        ``scoring.answer_prefix`` written: the fallback when no answer was found in the text."""
        ...

    def close(self) -> None: ...


def requested_decoding(config: GenerationConfig, scoring: LabelScoring | None) -> dict[str, Any]:
    """The decoding record of what `config` and `scoring` ask for (plain JSON): a backend that sends
    something else says so in its own :meth:`Backend.decoding`.

    >>> requested_decoding(GenerationConfig(max_new_tokens=8), None)["max_tokens"]
    8
    """
    return {
        "temperature": config.temperature,
        "top_p": None,
        "max_tokens": config.max_new_tokens,
        "stop": list(config.stop) or None,
        "logprobs": scoring is not None,
        "top_logprobs": scoring.top_logprobs if scoring is not None else None,
        "constrained_ranking": config.constrained_ranking,
        "dropped": {},
    }


def logsumexp(values: Sequence[float]) -> float:
    """log(sum(exp(v))) without overflow; -inf for an empty sequence."""
    finite = [v for v in values if v != -math.inf]
    if not finite:
        return -math.inf
    top = max(finite)
    return top + math.log(sum(math.exp(v - top) for v in finite))


def cut_at_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where `text` ends at its first stop sequence (the index of that sequence's start), or None when it
    holds none: the answer is ``text[:cut]``.

    >>> cut_at_stop("B\\n\\nBecause it is urgent", ["\\n\\n"])
    1
    >>> cut_at_stop("B", ["</answer>"]) is None
    True
    """
    found = [index for index in (text.find(s) for s in stop if s) if index >= 0]
    return min(found) if found else None
