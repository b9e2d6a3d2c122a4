"""summary.json: the verdict, every metric per model, persona, task and stratum, and run metadata.

Built once on the controller from what the cases recorded and from the joined cases.jsonl; the HTML report
and `persona-eval report` read it and never recompute it. Its keys:

``verdict``
    ``status`` ("passed", "failed" or "not_checked") and ``passed``; ``blocking`` (persona-safety
    regressions first, within the run then against the approved baseline, then crossed ``fail`` bounds),
    ``not_checked`` (``fail`` entries that could not be checked: message, reason, how_to_check),
    ``recorded`` (crossed ``record`` rules and bounds), ``skipped`` (``record`` entries not checked),
    ``checked`` (bounds checked), ``regressions_checked`` and ``blocking_regressions`` (the blocking
    regression checks as structured dicts: persona, metric, stratum, model, delta, interval, p); see
    :func:`persona_eval.gate.gate_verdict`;
``results``, ``checks``
    the metrics per (task, model, persona, stratum) and the bound checks;
``comparisons``
    every paired comparison of the run (see :mod:`persona_eval.comparisons` for the fields), with
    ``comparison_settings`` (resamples, confidence level, alpha, seed, Holm families) and
    ``comparisons_error`` (None, or why they could not be computed: a blocking failure);
``regressions``
    every regression rule checked within the run (see :mod:`persona_eval.gate`);
``baseline_comparison``
    None, or the comparison with an approved baseline (``--pe-baseline``): ``approved`` (its source and
    header), ``verdict`` (passed, blocking, recorded), ``comparisons``, ``regressions``, ``skipped``, and
    ``error`` when the two runs could not be compared (e.g. a changed dataset);
``personas``, ``metadata``
    the personas run and the run metadata.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from persona_eval.data import dataset_fingerprint
from persona_eval.gate import gate_verdict
from persona_eval.tasks import spec_of

__all__ = ["build_summary", "package_versions", "served_model_metadata"]

_PACKAGES = ("persona-eval", "torch", "transformers", "openai", "numpy", "scipy", "pytest", "pytest-xdist")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git_revision(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _throughput(results: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model: requests, cache hits, generated tokens per second of model time (the time spent inside
    the backend's calls; for a model with a pool, the time any request was in flight), and how busy the
    model was kept: requests ``sent``, ``max_in_flight`` and
    ``mean_in_flight`` (over the time any request was in flight), and where the backend reports them, the
    lowest its adaptive limit went (``limit_lowest``, a rate limit's doing) and the server's
    ``prefix_cache_hit_rate``. A pool's figures are cumulative per process: each worker's last counts."""
    table: dict[str, dict[str, Any]] = {}
    pools: dict[tuple[str, str], Mapping[str, Any]] = {}
    for result in results:
        row = table.setdefault(result["model"], {"requests": 0, "cached": 0, "model_seconds": 0.0,
                                                 "completion_tokens": 0, "max_in_flight": 0})
        row["requests"] += result.get("n_cases", 0)
        row["cached"] += result.get("cached", 0)
        row["model_seconds"] += result.get("model_seconds", 0.0)
        row["completion_tokens"] += result.get("completion_tokens", 0)
        row["max_in_flight"] = max(row["max_in_flight"], result.get("max_in_flight", 0))
        pool = result.get("pool")
        where = (result["model"], str(result.get("worker", "main")))
        if isinstance(pool, Mapping) and pool.get("sent", 0) >= pools.get(where, {}).get("sent", 0):
            pools[where] = pool
    for (model, _), pool in pools.items():
        row = table[model]
        busy, mean = float(pool.get("busy_seconds") or 0.0), pool.get("mean_in_flight")
        row["sent"] = row.get("sent", 0) + int(pool.get("sent", 0))
        row["max_in_flight"] = max(row["max_in_flight"], int(pool.get("max_in_flight", 0)))
        row["_area"] = row.get("_area", 0.0) + (busy * mean if mean is not None else 0.0)
        row["busy_seconds"] = round(row.get("busy_seconds", 0.0) + busy, 3)
        limit = pool.get("limit")
        if isinstance(limit, Mapping):
            row["limit_ceiling"] = limit.get("ceiling")
            row["limit_lowest"] = min(row.get("limit_lowest", limit["lowest"]), limit["lowest"])
        if pool.get("prefix_cache_hit_rate") is not None:
            row["prefix_cache_hit_rate"] = pool["prefix_cache_hit_rate"]
    for row in table.values():
        if "busy_seconds" in row:
            # Requests in flight together overlap: the model's time is the time any was in flight.
            row["model_seconds"] = row["busy_seconds"]
        row["model_seconds"] = round(row["model_seconds"], 3)
        row["tokens_per_second"] = (round(row["completion_tokens"] / row["model_seconds"], 2)
                                    if row["model_seconds"] > 0 else None)
        area = row.pop("_area", None)
        if "busy_seconds" in row:
            row["mean_in_flight"] = round(area / row["busy_seconds"], 1) if area and row["busy_seconds"] else None
    return table


def build_summary(*, run_id: str, results: Sequence[Mapping[str, Any]], settings: Any, started: float,
                  cases_path: Path | None, comparisons: Sequence[Mapping[str, Any]] = (),
                  comparison_settings: Mapping[str, Any] | None = None,
                  regressions: Sequence[Mapping[str, Any]] = (),
                  baseline_comparison: Mapping[str, Any] | None = None,
                  comparisons_error: str | None = None, allow_unchecked: bool = False,
                  args: Sequence[str] | None = None, extra_metadata: Mapping[str, Any] | None = None
                  ) -> dict[str, Any]:
    """The summary document of a run (see the module docstring). `regressions` are the within-run
    regression checks as JSON (``RegressionCheck.to_json()``); `allow_unchecked` and `args` (the run's
    pytest arguments, for the commands that would check what was not checked) go to the verdict."""
    rows = []
    for result in results:
        for stratum, block in result["metrics"].items():
            rows.append({"task": result["task"], "model": result["model"], "persona": result["persona"],
                         "persona_group": result["persona_group"], "stratum": stratum, "n": block["n"],
                         "metrics": block["metrics"], "notes": block["notes"],
                         "figures": block.get("figures", {})})
    checks = [dict(check, task=r["task"], model=r["model"], persona=r["persona"])
              for r in results for check in r["checks"]]
    models: dict[str, Any] = {}
    for result in results:
        models.setdefault(result["model"], result["identity"])
    tasks = sorted({r["task"] for r in results})
    datasets = {}
    for task in tasks:
        path = settings.datasets[task]
        datasets[task] = {"path": str(path), "fingerprint": dataset_fingerprint(path), "limit": settings.limit}
    n_requests = sum(r["n_cases"] for r in results)
    cached = sum(r["cached"] for r in results)
    return {
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "verdict": gate_verdict(results, regressions, baseline_comparison, comparisons_error,
                                allow_unchecked=allow_unchecked, args=args),
        "results": rows,
        "checks": checks,
        "comparisons": list(comparisons),
        "comparisons_error": comparisons_error,
        "comparison_settings": dict(comparison_settings) if comparison_settings is not None else None,
        "regressions": list(regressions),
        "baseline_comparison": dict(baseline_comparison) if baseline_comparison is not None else None,
        "personas": [{"id": p.id, "name": p.name, "group": p.group, "declaration": p.declaration}
                     for p in settings.registry if any(r["persona"] == p.id for r in results)],
        "metadata": {
            "models": models,
            "datasets": datasets,
            "thresholds": {"path": str(settings.thresholds.path), "fingerprint": settings.thresholds.fingerprint},
            "templates": {**{name: version for task in tasks if (spec := spec_of(task)) is not None
                             for name, version in spec.templates.items()}, **_template_names(results)},
            # The prompt template of each classification task per model (id, version, hash, source) and the
            # position each probability-based figure is read at (persona_eval.evaluation).
            "prompt_templates": _per_task_model(results, "template"),
            "label_positions": _per_task_model(results, "label_positions"),
            # What the suite asked for; what each model was actually sent is `decoding_sent`.
            # max_new_tokens: the answer budget per model and task (persona_eval.settings.Settings.answer_budget).
            # stop: the stop sequences per model and task, reasoning: the thinking switch per model (the
            # models file's), each only where a model gives one.
            "decoding": {"requested": _requested_decoding(settings, tasks)},
            "packages": package_versions(),
            "git_revision": _git_revision(Path(__file__).resolve().parent.parent),
            "duration_seconds": round(time.time() - started, 3),
            "inference_seconds": round(sum(r.get("seconds", 0.0) for r in results), 3),
            "model_seconds": round(sum(r.get("model_seconds", 0.0) for r in results), 3),
            "cache": {"requests": n_requests, "hits": cached, "enabled": settings.use_cache},
            "models_loaded": sorted({r["model"] for r in results if r.get("model_loaded")}),
            # How many processes (pytest-xdist workers) loaded or called each model: 1 with or without -n.
            "model_loads": {model: len({r.get("worker", "main") for r in results
                                        if r["model"] == model and r.get("model_loaded")})
                            for model in dict.fromkeys(r["model"] for r in results if r.get("model_loaded"))},
            "throughput": _throughput(results),
            "cases_file": cases_path.name if cases_path else None,
            **(extra_metadata or {}),
        },
    }


def _requested_decoding(settings: Any, tasks: Sequence[str]) -> dict[str, Any]:
    """What the suite asked of each model (see build_summary's `decoding`)."""
    requested: dict[str, Any] = {
        "max_new_tokens": {model.name: {task: settings.answer_budget(model, task) for task in tasks}
                           for model in settings.models},
        "temperature": 0.0,
    }
    stop = {model.name: {task: list(settings.stop_sequences(model, task)) for task in tasks}
            for model in settings.models if any(settings.stop_sequences(model, task) for task in tasks)}
    reasoning = {model.name: model.options["reasoning"] for model in settings.models if "reasoning" in model.options}
    if stop:
        requested["stop"] = stop
    if reasoning:
        requested["reasoning"] = reasoning
    return requested


def _per_task_model(results: Sequence[Mapping[str, Any]], name: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for result in results:
        if result.get(name) is not None:
            out.setdefault(result["task"], {}).setdefault(result["model"], result[name])
    return out


def _template_names(results: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """``task`` (or ``task (model)`` where models use different ones) -> "id@version (hash)"."""
    names: dict[str, dict[str, str]] = {}
    for task, by_model in _per_task_model(results, "template").items():
        for model, template in by_model.items():
            names.setdefault(task, {})[model] = f"{template['id']}@{template['version']} ({template['hash']})"
    out: dict[str, str] = {}
    for task, by_model in names.items():
        if len(set(by_model.values())) == 1:
            out[task] = next(iter(by_model.values()))
        else:
            out.update({f"{task} ({model})": name for model, name in by_model.items()})
    return out


def served_model_metadata(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """summary.json metadata from what the runners said: why a model's cache was not used (another model
    answers at the same name and address) and the decoding each model was actually sent, per task."""
    changes: dict[str, str] = {}
    decoding: dict[str, dict[str, Any]] = {}
    for result in results:
        if result.get("identity_change"):
            changes.setdefault(result["model"], result["identity_change"])
        if result.get("decoding") is not None:
            decoding.setdefault(result["model"], {}).setdefault(result["task"], result["decoding"])
    return {"identity_changes": changes, "decoding_sent": decoding}
