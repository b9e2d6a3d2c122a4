"""Speed of the triage path on the embedded model: batched throughput, overhead, cold vs warm run.

    python bench/run.py                # everything (about 10 minutes on 2 cores)
    python bench/run.py --only batch   # generation throughput by batch size only
    python bench/run.py --only plain   # the suite's model time against a plain transformers loop

Prints a JSON document; the README's figures come from it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def batch_throughput(cache_dir: Path, n_cases: int = 16) -> dict[str, float]:
    """Generated tokens per second at batch sizes 1, 4 and 16 on the same cases (greedy, 32 tokens)."""
    from persona_eval.backends.base import GenerationConfig, LabelScoring
    from persona_eval.backends.embedded import prepare_embedded_model
    from persona_eval.backends.hf import HFBackend
    from persona_eval.data import load_triage_cases
    from persona_eval.personas import STUDY_PERSONAS
    from persona_eval.templates import DEFAULT_TEMPLATES, render_case, template_named

    backend = HFBackend("smollm2", str(prepare_embedded_model(cache_dir)))
    cases = load_triage_cases(REPO / "fixtures/triage/vignettes.jsonl")[:n_cases]
    persona = STUDY_PERSONAS[2]
    requests = [render_case(c.text, persona, backend.system_policy()) for c in cases]
    config = GenerationConfig(max_new_tokens=32)
    scoring = LabelScoring(answer_prefix=template_named(DEFAULT_TEMPLATES["triage"], task="triage").answer_prefix)
    backend.generate(requests[:2], config, scoring)  # warm-up: load weights
    result = {}
    for batch_size in (1, 4, 16):
        started, tokens = time.perf_counter(), 0
        for start in range(0, len(requests), batch_size):
            generations = backend.generate(requests[start:start + batch_size], config, scoring)
            tokens += sum(g.usage["completion_tokens"] for g in generations)
        seconds = time.perf_counter() - started
        result[f"batch_{batch_size}_tokens_per_s"] = round(tokens / seconds, 2)
        result[f"batch_{batch_size}_cases_per_s"] = round(len(requests) / seconds, 3)
    result["speedup_16_vs_1"] = round(result["batch_16_cases_per_s"] / result["batch_1_cases_per_s"], 2)
    # The triage answers are short (~10 tokens after ~200 prompt tokens), so the figures above are
    # dominated by reading the prompt. Decode-bound: exactly 64 new tokens per prompt.
    import torch

    model, tokenizer = backend._load(), backend.tokenizer
    prompts = [backend.render_prompt(r) for r in requests]
    for batch_size in (1, 16):
        started = time.perf_counter()
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False)
            with torch.inference_mode():
                model.generate(**batch, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
        seconds = time.perf_counter() - started
        result[f"decode_batch_{batch_size}_tokens_per_s"] = round(64 * len(prompts) / seconds, 2)
    result["decode_speedup_16_vs_1"] = round(result["decode_batch_16_tokens_per_s"]
                                             / result["decode_batch_1_tokens_per_s"], 2)
    return result


def versus_plain_loop(cache_dir: Path, n_cases: int = 96, batch_size: int = 16) -> dict[str, object]:
    """The suite's model time on the embedded model (study template, latent labels read, 32 new tokens)
    against a plain transformers loop over the same rendered prompts in the same order (batch 16, left
    padding, greedy, `output_logits`, the same budget), in one run; and the suite without reading a
    batch's shared prompt prefix once (every row reads its whole prompt, in one padded pass per call).
    The suite runs as it does by default: the backend's own batch size (``suite_batch_size``, 64 on a
    CPU), its own reading of the prompts and cache. The generated texts of all three are compared."""
    import torch

    from persona_eval.backends.base import GenerationConfig, LabelScoring
    from persona_eval.backends.embedded import prepare_embedded_model
    from persona_eval.backends.hf import HFBackend
    from persona_eval.cache import NullCache
    from persona_eval.data import load_triage_cases
    from persona_eval.personas import STUDY_PERSONAS
    from persona_eval.runner import Runner
    from persona_eval.templates import DEFAULT_TEMPLATES, render_case, template_named

    backend = HFBackend("smollm2", str(prepare_embedded_model(cache_dir)))  # the suite's default batch size
    template = template_named(DEFAULT_TEMPLATES["triage"], task="triage")
    cases = load_triage_cases(REPO / "fixtures/triage/vignettes.jsonl")[:n_cases]
    requests = [render_case(c.text, STUDY_PERSONAS[2], backend.system_policy(), template=template) for c in cases]
    config = GenerationConfig(max_new_tokens=32)
    scoring = LabelScoring(answer_prefix=template.answer_prefix)
    backend.generate(requests[:2], config, scoring)  # warm-up: load weights
    model, tokenizer = backend._load(), backend.tokenizer
    prompts = [backend.render_prompt(r) for r in requests]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # the runner's order
    stop_ids = {tokenizer.eos_token_id, *([model.generation_config.eos_token_id]
                                          if isinstance(model.generation_config.eos_token_id, int)
                                          else model.generation_config.eos_token_id or [])}

    def plain() -> list[str]:
        texts: dict[int, str] = {}
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                output = model.generate(**batch, max_new_tokens=32, do_sample=False, temperature=None, top_p=None,
                                        top_k=None, pad_token_id=tokenizer.pad_token_id,
                                        return_dict_in_generate=True, output_logits=True)
            for i, ids in zip(rows, output.sequences[:, batch["input_ids"].shape[1]:].tolist(), strict=True):
                ids = ids[:next((k for k, t in enumerate(ids) if t in stop_ids), len(ids))]
                texts[i] = tokenizer.decode(ids, skip_special_tokens=True)
        return [texts[i] for i in range(len(prompts))]

    def suite(share_prefix: bool) -> tuple[list[str], float]:
        backend.share_prefix = share_prefix
        runner = Runner(backend, NullCache())
        generations = runner.generate(requests, config, scoring)
        assert all(g.generation.prompt_label_logprobs is not None for g in generations)  # latent labels read
        return [g.generation.text for g in generations], runner.stats.model_seconds

    started = time.perf_counter()
    plain_texts = plain()
    plain_seconds = time.perf_counter() - started
    shared_texts, shared_seconds = suite(True)
    whole_texts, whole_seconds = suite(False)
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    return {
        "cases": len(prompts),
        "plain_batch_size": batch_size,
        "suite_batch_size": backend.batch_size,
        "mean_prompt_tokens": round(sum(map(len, encoded)) / len(encoded), 1),
        "plain_loop_seconds": round(plain_seconds, 2),
        "suite_model_seconds": round(shared_seconds, 2),
        "suite_model_seconds_without_prefix_reuse": round(whole_seconds, 2),
        "suite_over_plain": round(shared_seconds / plain_seconds, 3),
        "without_reuse_over_plain": round(whole_seconds / plain_seconds, 3),
        "identical_texts_suite_vs_plain": sum(a == b for a, b in zip(shared_texts, plain_texts, strict=True)),
        "identical_texts_with_vs_without_reuse": sum(a == b for a, b in zip(shared_texts, whole_texts, strict=True)),
    }


def main_job(cache_dir: Path) -> dict[str, float]:
    """The main job (`pytest evals -k triage`) cold (empty result cache) and warm (everything cached).

    The prepared model directory is shared, so "cold" means no cached results, not a first install."""
    work = Path(tempfile.mkdtemp(prefix="pe-bench-"))
    (work / "cache").mkdir()
    os.symlink(cache_dir / "models", work / "cache" / "models")
    command = [sys.executable, "-m", "pytest", "evals", "-k", "triage", "-q", "-p", "no:cacheprovider",
               "--pe-cache-dir", str(work / "cache"), "--pe-reports-dir", str(work / "reports"), "--pe-quiet"]
    timings = {}
    for label in ("cold", "warm"):
        started = time.perf_counter()
        subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
        timings[f"{label}_seconds"] = round(time.perf_counter() - started, 2)
        summary = json.loads((work / "reports" / "latest" / "summary.json").read_text())
        meta = summary["metadata"]
        timings[f"{label}_inference_seconds"] = meta["inference_seconds"]
        timings[f"{label}_model_seconds"] = meta["model_seconds"]
        timings[f"{label}_cache_hits"] = meta["cache"]["hits"]
        timings[f"{label}_requests"] = meta["cache"]["requests"]
    timings["cold_share_outside_model_calls"] = round(
        1 - timings["cold_model_seconds"] / timings["cold_inference_seconds"], 4)
    timings["warm_share_of_cold"] = round(timings["warm_seconds"] / timings["cold_seconds"], 4)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("batch", "plain", "main"), help="run one benchmark")
    parser.add_argument("--cache-dir", type=Path, help="where the prepared model lives (default: the usual)")
    args = parser.parse_args()
    from persona_eval.backends.embedded import prepare_embedded_model
    from persona_eval.cache import default_cache_dir

    cache_dir = args.cache_dir or default_cache_dir()
    started = time.perf_counter()
    prepare_embedded_model(cache_dir)
    report: dict[str, object] = {"prepare_seconds": round(time.perf_counter() - started, 2),
                                 "cpu_count": os.cpu_count()}
    if args.only in (None, "batch"):
        report["batch"] = batch_throughput(cache_dir)
    if args.only in (None, "plain"):
        report["versus_plain_loop"] = versus_plain_loop(cache_dir)
    if args.only in (None, "main"):
        report["main_job"] = main_job(cache_dir)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
