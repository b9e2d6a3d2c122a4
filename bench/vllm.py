"""Throughput of the OpenAI-compatible backend against a local vLLM server on the embedded model.

    python bench/vllm.py                          # starts its own server (~1 min), then ~6 min on 2 cores
    python bench/vllm.py --base-url http://127.0.0.1:8000/v1 --model smollm2   # a server already running

For 1, 4, 16 and 32 requests in flight: the same triage requests (greedy, 32 new tokens, label
log-probabilities) through the runner and the SQLite cache; cases/s and generated tokens/s. Then a
decode-bound workload ("long": short prompts, 64 new tokens) at 1, 4 and 16, where the server's
batching shows: the triage requests are mostly prompt (~220 tokens in, ~11 out), and a CPU server
computes prompts at about the same rate whatever the batch. And the
suite's own cost per request, outside the HTTP call (rendering, cache keys, payload, parsing the reply,
the cache write, the runner): at 1 in flight against the server, and against a loopback stand-in that
answers at once (``suite_overhead``: no model competing for the cores, the figure to compare).

The server it starts has prefix caching off, so a level does not reuse the prompts of the level before.
Prints a JSON document; the README's figures come from it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LEVELS = (1, 4, 16, 32)


def measure(base_url: str, model: str, *, n_cases: int, levels: tuple[int, ...], workload: str = "triage"
            ) -> dict[str, Any]:
    """Throughput at each number of requests in flight. ``triage``: the suite's own requests (~220 prompt
    tokens, the embedded model answers in ~11); ``long``: short prompts answered at length (64 tokens),
    where the server's batching of the decode steps shows."""
    from persona_eval.backends.base import GenerationConfig, LabelScoring
    from persona_eval.backends.openai_compat import OpenAIBackend
    from persona_eval.cache import NullCache, ResultCache
    from persona_eval.data import load_triage_cases
    from persona_eval.personas import STUDY_PERSONAS
    from persona_eval.prompts import render_messages
    from persona_eval.runner import Runner
    from persona_eval.templates import DEFAULT_TEMPLATES, render_case, template_named

    cases = load_triage_cases(REPO / "fixtures/triage/vignettes.jsonl")
    persona = STUDY_PERSONAS[3]
    scoring = LabelScoring(answer_prefix=template_named(DEFAULT_TEMPLATES["triage"], task="triage").answer_prefix)
    config = GenerationConfig(max_new_tokens=32 if workload == "triage" else 64)

    def requests_for(backend: OpenAIBackend, offset: int) -> list[Any]:
        if workload == "triage":
            return [render_case(cases[(offset + i) % len(cases)].text, persona, backend.system_policy())
                    for i in range(n_cases)]
        texts = [f"Write a long story about patient number {offset + i} and a day at the hospital."
                 for i in range(n_cases)]
        return [render_messages(text, persona, backend.system_policy()) for text in texts]

    # One backend for every level, its client made and its connection opened before the clock starts
    # (making an openai client takes ~0.5 s, which is not per request).
    backend = OpenAIBackend("smollm2", model=model, base_url=base_url, max_in_flight=2)
    Runner(backend, NullCache()).generate(requests_for(backend, 0)[:2], config, scoring)

    results: dict[str, Any] = {}
    for level in levels:
        backend.max_in_flight = level
        http_before, calls_before = backend.http_seconds, backend.http_requests
        with tempfile.TemporaryDirectory(prefix="pe-bench-vllm-") as folder:
            # The real cache, as a run uses it: one SQLite transaction per finished request.
            cache = ResultCache.in_dir(folder)
            runner = Runner(backend, cache)
            requests = requests_for(backend, 0)
            started = time.perf_counter()
            generations = runner.generate(requests, config, scoring)
            wall = time.perf_counter() - started
            cache.close()
        http = backend.http_seconds - http_before
        calls = backend.http_requests - calls_before
        tokens = sum(int(g.generation.usage.get("completion_tokens", 0)) for g in generations)
        row = {
            "cases": len(requests),
            "seconds": round(wall, 3),
            "cases_per_s": round(len(requests) / wall, 3),
            "tokens_per_s": round(tokens / wall, 2),
            "mean_request_seconds": round(http / max(1, calls), 3),
            "max_in_flight_seen": runner.stats.max_in_flight_seen,
            "http_requests": calls,
            # Inside the backend but outside the HTTP call: building the payload, parsing the reply (and,
            # with many in flight, waiting for the interpreter lock while other replies are parsed).
            "backend_overhead_ms_per_request": round(1000 * (runner.stats.model_seconds - http) / len(requests), 3),
        }
        if level == 1:
            # Nothing overlaps at 1 in flight: everything but the HTTP calls is the suite's own time.
            row["suite_overhead_ms_per_request"] = round(1000 * (wall - http) / len(requests), 3)
        results[f"in_flight_{level}"] = row
    backend.close()
    first = results[f"in_flight_{levels[0]}"]["cases_per_s"]
    for level in levels[1:]:
        results[f"speedup_{level}_vs_{levels[0]}"] = round(results[f"in_flight_{level}"]["cases_per_s"] / first, 2)
    return results


def suite_overhead(n_requests: int = 200) -> dict[str, Any]:
    """The suite's own time per request, outside the HTTP call, against a loopback stand-in that answers
    at once with a vLLM-shaped reply (10 tokens, 20 top log-probabilities each), so that no model
    competes with the suite for the two cores. Measured at 1 in flight, where nothing overlaps."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from persona_eval.backends.base import GenerationConfig, LabelScoring
    from persona_eval.backends.openai_compat import OpenAIBackend
    from persona_eval.cache import NullCache, ResultCache
    from persona_eval.data import load_triage_cases
    from persona_eval.personas import STUDY_PERSONAS
    from persona_eval.runner import Runner
    from persona_eval.templates import DEFAULT_TEMPLATES, render_case, template_named

    words = ["A", ".", " Stay", " home", " and", " manage", " with", " self", "-", "care"]
    alternatives = [" A", " B", " C", "A", "B", "C", *(f" w{i}" for i in range(14))]
    top = [{"token": t, "logprob": -0.1 * i, "bytes": list(t.encode())} for i, t in enumerate(alternatives)]
    reply = json.dumps({
        "id": "stand-in", "object": "chat.completion", "model": "stand-in",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)}, "finish_reason": "stop",
                     "logprobs": {"content": [{"token": w, "logprob": -0.1, "bytes": list(w.encode()),
                                               "top_logprobs": top} for w in words]}}],
        "usage": {"prompt_tokens": 220, "completion_tokens": len(words)}}).encode()

    class StandIn(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # else delayed ACKs add ~40 ms to every keep-alive request

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    cases = load_triage_cases(REPO / "fixtures/triage/vignettes.jsonl")
    config = GenerationConfig(max_new_tokens=32)
    scoring = LabelScoring(answer_prefix=template_named(DEFAULT_TEMPLATES["triage"], task="triage").answer_prefix)
    result: dict[str, Any] = {"requests": n_requests, "reply_bytes": len(reply)}
    try:
        for label in ("no_cache", "sqlite_cache"):
            backend = OpenAIBackend("stand-in", model="stand-in", base_url=base_url, max_in_flight=1)
            requests = [render_case(f"{cases[i % len(cases)].text} ({i})", STUDY_PERSONAS[3],
                                    backend.system_policy()) for i in range(n_requests + 5)]
            with tempfile.TemporaryDirectory(prefix="pe-bench-overhead-") as folder:
                cache = NullCache() if label == "no_cache" else ResultCache.in_dir(folder)
                runner = Runner(backend, cache)
                runner.generate(requests[:5], config, scoring)  # warm-up: client, connection
                http_before = backend.http_seconds
                started = time.perf_counter()
                runner.generate(requests[5:], config, scoring)
                wall = time.perf_counter() - started
                cache.close()
            http = backend.http_seconds - http_before
            result[label] = {"ms_per_request": round(1000 * wall / n_requests, 3),
                             "http_ms_per_request": round(1000 * http / n_requests, 3),
                             "outside_http_ms_per_request": round(1000 * (wall - http) / n_requests, 3)}
            backend.close()
    finally:
        server.shutdown()
        server.server_close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", help="a running server's OpenAI base URL (default: start one)")
    parser.add_argument("--model", default="smollm2", help="the served model name (default: smollm2)")
    parser.add_argument("--cases", type=int, default=32, help="requests per level (default: 32)")
    parser.add_argument("--triage-only", action="store_true", help="skip the decode-bound 'long' workload")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="requests in flight, e.g. 1,4,16,32")
    args = parser.parse_args()
    levels = tuple(int(v) for v in args.levels.split(","))

    from persona_eval.backends.embedded import prepare_embedded_model
    from persona_eval.cache import default_cache_dir
    from persona_eval.testing.vllm_server import VLLMServer, vllm_python

    report: dict[str, Any] = {"cpu_count": os.cpu_count(), "levels": list(levels),
                              "load_average_at_start": [round(v, 2) for v in os.getloadavg()]}
    report["suite_overhead"] = suite_overhead()
    server = None
    base_url = args.base_url
    if base_url is None:
        server = VLLMServer(prepare_embedded_model(default_cache_dir()), served_name=args.model,
                            python=vllm_python(REPO), log_path=Path(tempfile.gettempdir()) / "pe-bench-vllm.log",
                            extra_args=("--no-enable-prefix-caching",))
        started = time.perf_counter()
        server.start(timeout=900)
        report["server_start_seconds"] = round(time.perf_counter() - started, 1)
        base_url = server.base_url
    try:
        report["triage"] = measure(base_url, args.model, n_cases=args.cases, levels=levels)
        if not args.triage_only:
            report["long"] = measure(base_url, args.model, n_cases=16, levels=tuple(v for v in levels if v <= 16),
                                     workload="long")
    finally:
        if server is not None:
            server.stop()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
