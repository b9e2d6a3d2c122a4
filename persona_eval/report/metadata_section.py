"""The report's run metadata: provenance (revision, seed, times, cache), model identities, the decoding
sent, datasets, thresholds, templates and package versions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from markupsafe import Markup

from persona_eval.report.format import DASH, duration, esc, ordered_unique
from persona_eval.report.fragments import kv_table, value_html
from persona_eval.report.run import Run


def metadata_section(run: Run) -> Markup:
    metadata = dict(run.summary.get("metadata") or {})
    parts = ['<section id="metadata"><h2>Run metadata</h2>']
    general: list[tuple[str, Any]] = [("run id", run.summary.get("run_id")), ("created", run.summary.get("created"))]
    general.append(("git revision", metadata.pop("git_revision", None) or "unknown (not a git checkout)"))
    if "seed" in metadata:
        general.append(("seed", metadata.pop("seed")))
    general.append(("duration", duration(metadata.pop("duration_seconds", None))))
    for key, label in (("inference_seconds", "inference time"), ("model_seconds", "time in the model")):
        if key in metadata:
            general.append((label, duration(metadata.pop(key))))
    cache = metadata.pop("cache", None)
    if isinstance(cache, Mapping):
        general.append(("cache", f"{cache.get('hits', DASH)} of {cache.get('requests', DASH)} requests answered "
                                  f"from the cache ({'enabled' if cache.get('enabled') else 'disabled'})"))
    elif cache is not None:
        general.append(("cache", cache))
    if "models_loaded" in metadata:
        general.append(("models loaded", metadata.pop("models_loaded") or "none (all answers cached)"))
    if "cases_file" in metadata:
        general.append(("cases file", metadata.pop("cases_file")))
    parts.append(kv_table(general))
    models = metadata.pop("models", None)
    if isinstance(models, Mapping) and models:
        keys = ordered_unique(k for identity in models.values() if isinstance(identity, Mapping) for k in identity)
        head = "<th>name</th>" + "".join(f"<th>{esc(k)}</th>" for k in keys)
        body = "".join(
            f"<tr><td><code>{esc(name)}</code></td>"
            + "".join(f"<td>{value_html(identity.get(k)) if isinstance(identity, Mapping) else DASH}</td>"
                      for k in keys) + "</tr>"
            for name, identity in models.items())
        parts.append(f'<h3>Models</h3><div class="table-wrap"><table class="kv wide"><thead><tr>{head}</tr></thead>'
                     f"<tbody>{body}</tbody></table></div>")
    changes = metadata.pop("identity_changes", None)
    if isinstance(changes, Mapping) and changes:
        listed = "".join(f"<li>{esc(message)}</li>" for message in changes.values())
        parts.append(f'<h3>Model changes</h3><ul class="blocking">{listed}</ul>')
    sent = metadata.pop("decoding_sent", None)
    if isinstance(sent, Mapping) and sent:
        rows = []
        for name, tasks in sent.items():
            for task, record in (tasks.items() if isinstance(tasks, Mapping) else []):
                if not isinstance(record, Mapping):
                    continue
                shown = ", ".join(f"{esc(k)} {value_html(v)}" for k, v in record.items()
                                  if k != "dropped" and v is not None)
                dropped = record.get("dropped") or {}
                refused = "; ".join(f"{esc(k)} refused by the server ({esc(v)}), not sent"
                                    for k, v in dropped.items()) if isinstance(dropped, Mapping) else ""
                rows.append(f"<tr><td><code>{esc(name)}</code></td><td>{esc(task)}</td><td>{shown}</td>"
                            f'<td class="{"bad" if refused else ""}">{refused or "none"}</td></tr>')
        parts.append('<h3>Decoding sent</h3><div class="table-wrap"><table class="kv wide"><thead><tr><th>model</th>'
                     "<th>task</th><th>sent</th><th>dropped</th></tr></thead><tbody>" + "".join(rows)
                     + "</tbody></table></div>")
    blocks = []
    for key, title in (("datasets", "Datasets"), ("thresholds", "Thresholds"), ("templates", "Prompt templates"),
                       ("decoding", "Decoding"), ("packages", "Package versions")):
        if key not in metadata:
            continue
        value = metadata.pop(key)
        pairs = list(value.items()) if isinstance(value, Mapping) else [(key, value)]
        blocks.append(f"<div><h3>{title}</h3>{kv_table(pairs)}</div>")
    settings = run.summary.get("comparison_settings")
    if isinstance(settings, Mapping):
        blocks.append(f"<div><h3>Paired comparisons</h3>{kv_table(list(settings.items()))}</div>")
    if metadata:
        blocks.append(f"<div><h3>Other</h3>{kv_table(list(metadata.items()))}</div>")
    parts.append(f'<div class="meta">{"".join(blocks)}</div></section>')
    return Markup("".join(parts))
