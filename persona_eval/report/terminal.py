"""The end-of-session terminal summary: the verdict first (persona-safety regressions, then bounds), then
persona x metric tables per stratum and the significant paired comparisons; and the text of
`persona-eval compare`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from persona_eval.comparisons import ALPHA, compared_metrics
from persona_eval.gate import STATE_WORDS
from persona_eval.personas import BASELINE, CONTROLS
from persona_eval.report.judge_text import judge_diagnostic_lines
from persona_eval.report.power_text import mde_phrase
from persona_eval.report.robustness_text import robustness_lines
from persona_eval.tasks import TaskSpec, metric_text, safety, spec_of, stratum_phrase

__all__ = ["render_baseline_comparison", "render_run_notes", "render_terminal_summary", "render_verdict",
           "served_model_lines"]



def _columns(metrics: Sequence[str], sign: str = "") -> list[tuple[str, str, str]]:
    """Table columns: metric, header, format of a value (of a difference: `sign` "+")."""
    columns = []
    for metric in metrics:
        text = metric_text(metric)
        columns.append((metric, text.column if text else metric, f"{{:{sign}.{text.decimals if text else 2}f}}"))
    return columns


def _cell(value: Any, fmt: str, note: str | None) -> str:
    if value is None:
        return "n/a" if note and "not available" in note else "-"
    return fmt.format(value)


def _metric_words(metric: str) -> str:
    text = metric_text(metric)
    return text.delta_label if text else metric


def _delta_text(comparison: Mapping[str, Any]) -> str:
    """"+0.583 (95% CI +0.375 to +0.792), adjusted p < 0.001 (paired bootstrap)"."""
    fmt = "{:+.1f}" if comparison["metric"] == "consistency_rate" else "{:+.3f}"
    text = fmt.format(comparison["delta"])
    if comparison.get("ci_low") is not None and comparison.get("ci_high") is not None:
        level = round(100 * float(comparison["confidence_level"]))
        text += f" ({level}% CI {fmt.format(comparison['ci_low'])} to {fmt.format(comparison['ci_high'])})"
    adjusted = comparison.get("pvalue_adjusted")
    if adjusted is not None:
        text += ", adjusted p " + ("< 0.001" if adjusted < 0.001 else f"= {adjusted:.3f}")
    return text + f" ({comparison['test']})"


def _significant(comparisons: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per significant comparison, under a heading per model, task and baseline."""
    lines: list[str] = []
    heading = None
    for c in comparisons:
        if not c.get("significant"):
            continue
        against = (f"the approved baseline ({c.get('baseline_model')})" if c["baseline"] == "approved"
                   else c["baseline"])
        if (c["task"], c["model"], against) != heading:
            heading = (c["task"], c["model"], against)
            lines.append(f"  {c['task']} / {c['model']} vs {against}:")
        lines.append(f"    {c['stratum']}: {c['persona']}: {_metric_words(c['metric'])} "
                     f"{_delta_text(c)}")
    return lines


def _detectable(comparisons: Sequence[Mapping[str, Any]]) -> list[str]:
    """What the comparisons that are not significant could have detected: per task, model and stratum, the
    median minimum detectable effect of each metric over the personas (persona_eval.power). Not significant
    on a few cases is not "no effect"."""
    groups: dict[tuple[str, str, str], dict[str, list[Mapping[str, Any]]]] = {}
    for c in comparisons:
        if mde_phrase(c, short=True) is not None:
            groups.setdefault((c["task"], c["model"], c["stratum"]), {}).setdefault(c["metric"], []).append(c)
    if not groups:
        return []
    lines = ["", "Not significant is not safe: the smallest differences this run could detect (80% power, at the "
                 "Holm level of each family), median over the personas:"]
    for (task, model, stratum), by_metric in groups.items():
        cells = []
        for metric, members in by_metric.items():
            values = sorted(m["mde"] for m in members if isinstance(m.get("mde"), (int, float)))
            median = values[len(values) // 2] if values else None
            phrase = mde_phrase({**members[0], "mde": median}, short=True) or ""
            cells.append(f"{_metric_words(metric)} {phrase.replace('could detect ', '')}")
        lines.append(f"  {task} / {model} / {stratum_phrase(stratum, task)}: {'; '.join(cells)}")
    return lines


def render_verdict(verdict: Mapping[str, Any], checks: Sequence[Mapping[str, Any]]) -> list[str]:
    """The verdict's lines: its headline, each blocking and unchecked entry (with the command that would
    check it), then the record-only entries crossed. `checks` are the run's bound checks."""
    blocking: Sequence[str] = verdict["blocking"]
    not_checked: Sequence[Mapping[str, Any]] = verdict.get("not_checked") or []
    regressions = len(verdict.get("blocking_regressions", []))
    bounds = sum(1 for check in checks if check.get("blocking"))
    status = verdict.get("status") or ("passed" if verdict["passed"] else "failed")
    unchecked = f"{len(not_checked)} fail rule(s) or bound(s) not checked"
    if status == "passed":
        lines = [f"persona-eval verdict: {STATE_WORDS['passed']} ({verdict['checked']} bounds and "
                 f"{verdict.get('regressions_checked', 0)} regression checks, none crossed that blocks; "
                 f"{len(verdict['recorded'])} record-only crossed)"]
    elif status == "not_checked":
        allowed = " (allowed by --pe-allow-unchecked: the session does not fail)" if verdict["passed"] else ""
        lines = [f"persona-eval verdict: {STATE_WORDS['not_checked']}: {unchecked}, none crossed{allowed}"]
    else:
        others = len(blocking) - regressions - bounds
        parts = [f"{regressions} persona-safety regression(s)", f"{bounds} blocking bound(s) crossed"]
        if others > 0:
            parts.append(f"{others} gate error(s)")
        if not_checked:
            parts.append(unchecked)
        lines = [f"persona-eval verdict: {STATE_WORDS['failed']}: {', '.join(parts)}"]
        lines.extend(f"  - {message}" for message in blocking)
    for entry in not_checked:
        lines.append(f"  - {entry['message']}")
        lines.append(f"    to check it: {entry['how_to_check']}")
    if verdict["recorded"]:
        lines.append(f"Record-only bounds and regressions crossed ({len(verdict['recorded'])}):")
        lines.extend(f"  - {message}" for message in verdict["recorded"])
    return lines


# The headers of safety.REPORT_STRATA's columns, in its order: short enough for a 7-character column.
_SAFETY_HEADERS = ("all", "harmful", "misdiag", "unlic.", "misinfo", "bias")


def _safety_lines(model: str, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Persona rows, category columns: the persona's safety MRR minus the baseline's (pooled judges)."""
    by_persona: dict[str, dict[str, Any]] = {}
    for row in rows:
        by_persona.setdefault(row["persona"], {})[row["stratum"]] = row["metrics"].get("safety_mrr_delta")
    invalid = next((r["metrics"].get("invalid_ranking_share") for r in rows if r["stratum"] == "all"), None)
    width = max(len(p) for p in by_persona)
    lines = ["", f"safety / {model}: safety MRR minus {BASELINE}'s, pooled over judges (+ judges prefer the persona)",
             f"  {'persona':<{width}} " + " ".join(f"{h:>7}" for h in _SAFETY_HEADERS)]
    for persona, cells in by_persona.items():
        values = [cells.get(stratum) for stratum in safety.REPORT_STRATA]
        lines.append(f"  {persona:<{width}} " + " ".join(
            f"{'-' if v is None else f'{v:+.2f}':>7}" for v in values))
    if invalid is not None:
        lines.append(f"  invalid rankings: {invalid:.0%} of the panel's rankings of {model}")
    return lines


def render_terminal_summary(summary: Mapping[str, Any]) -> list[str]:
    """Lines for the terminal: verdict, blocking failures (regressions first), then one table per model,
    task and stratum, the significant paired comparisons, and the comparison with an approved baseline."""
    lines: list[str] = render_verdict(summary["verdict"], summary.get("checks", []))
    results = summary["results"]
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in results:
        groups.setdefault((row["model"], row["task"]), []).append(row)
    for (model, task), rows in groups.items():
        spec = spec_of(task)
        if task == safety.TASK:
            lines.extend(_safety_lines(model, rows))
            continue
        if spec is None or not spec.labels:
            continue
        columns = _columns(_table_metrics(spec))
        for stratum in spec.report_strata_of(r["stratum"] for r in rows if r["stratum"] != "all"):
            stratum_rows = [r for r in rows if r["stratum"] == stratum]
            if not stratum_rows:
                continue
            n = stratum_rows[0]["n"]
            lines.append("")
            lines.append(f"{task} / {model} / {stratum_phrase(stratum, task)} (n={n} cases per persona)")
            width = max(len(r["persona"]) for r in stratum_rows)
            header = f"  {'persona':<{width}} " + " ".join(f"{h:>7}" for _, h, _ in columns)
            lines.append(header)
            for row in stratum_rows:
                cells = [_cell(row["metrics"].get(m), fmt, row["notes"].get(m)) for m, _, fmt in columns]
                lines.append(f"  {row['persona']:<{width}} " + " ".join(f"{c:>7}" for c in cells))
    comparisons = summary.get("comparisons") or []
    if comparisons:
        # The terminal lists the differences from the baseline; every comparison is in summary.json.
        primary = [c for c in comparisons if c["baseline"] == BASELINE]
        count = sum(1 for c in primary if c.get("significant"))
        alpha = (summary.get("comparison_settings") or {}).get("alpha", ALPHA)
        lines.append("")
        lines.append(f"Significant differences from {BASELINE} (Holm-adjusted p < {alpha}): {count} of "
                     f"{len(primary)} comparisons; all {len(comparisons)} comparisons, {', '.join(CONTROLS[1:])} as "
                     "baseline too, are in summary.json")
        lines.extend(_significant(primary))
        lines.extend(_detectable(primary))
    baseline = summary.get("baseline_comparison")
    if baseline:
        lines.append("")
        lines.extend(_baseline_lines(baseline))
    lines.extend(robustness_lines(summary))
    for key in ("safety", "triage_judging"):
        section = summary.get(key)
        judged = judge_diagnostic_lines(section) if isinstance(section, Mapping) else []
        if judged:
            lines += ["", f"Judges ({'safety' if key == 'safety' else 'triage'}):", *(f"  {line}" for line in judged)]
    notes = sorted({note for row in results for note in row["notes"].values() if "not available" in note})
    if notes:
        lines.append("")
        lines.extend(f"n/a: {note}" for note in notes)
    labelled = _labelled(row["task"] for row in results)
    if labelled:
        lines.append("")
        lines.append(_legend(labelled, [m for spec in labelled for m in _table_metrics(spec)])
                     + ", - not defined on these cases")
    return lines


def _table_metrics(spec: TaskSpec) -> list[str]:
    return [m for m in spec.metric_names if m != "too_long_rate"]


def _labelled(tasks: Iterable[str]) -> list[TaskSpec]:
    """The specs of the labelled tasks among `tasks`, once each, in order."""
    return [spec for task in dict.fromkeys(tasks) if (spec := spec_of(task)) is not None and spec.labels]


def _legend(specs: Sequence[TaskSpec], metrics: Iterable[str]) -> str:
    """What the columns of `metrics` mean ("acc accuracy, risk share of C answers, ..."), each once."""
    most_urgent = "/".join(dict.fromkeys(spec.labels[-1] for spec in specs))
    parts = []
    for metric in dict.fromkeys(metrics):
        text = metric_text(metric)
        if text is not None:
            parts.append(f"{text.column} {text.legend.replace('{most_urgent}', most_urgent)}")
    return ", ".join(parts)


def _baseline_lines(baseline: Mapping[str, Any]) -> list[str]:
    approved = baseline.get("approved") or {}
    source = f"{approved.get('source')} (run {approved.get('run_id')})"
    if baseline.get("error"):
        return [f"Against the approved baseline {source}: not compared: {baseline['error']}"]
    verdict = baseline.get("verdict") or {}
    comparisons = baseline.get("comparisons") or []
    count = sum(1 for c in comparisons if c.get("significant"))
    lines = [f"Against the approved baseline {source}: {STATE_WORDS['passed' if verdict.get('passed') else 'failed']}; "
             f"{count} of {len(comparisons)} comparisons significant (candidate minus approved)"]
    lines.extend(_significant(comparisons))
    lines.extend(f"  not compared: {note}" for note in baseline.get("skipped") or [])
    return lines


def _delta_tables(comparisons: Sequence[Mapping[str, Any]]) -> list[str]:
    lines: list[str] = []
    groups: dict[tuple[str, str, str, str], list[Mapping[str, Any]]] = {}
    for c in comparisons:
        groups.setdefault((c["model"], c["task"], c["stratum"], str(c.get("baseline_model") or c["baseline"])),
                          []).append(c)
    for (model, task, stratum, against), rows in groups.items():
        personas = list(dict.fromkeys(c["persona"] for c in rows))
        cells = {(c["persona"], c["metric"]): c for c in rows}
        lines.append("")
        columns = _columns(list(compared_metrics(task)), "+")
        lines.append(f"{task} / {model} vs {against} / {stratum_phrase(stratum, task)} "
                     f"(n={rows[0]['n']} paired cases)")
        width = max(len(p) for p in personas)
        lines.append(f"  {'persona':<{width}} " + " ".join(f"{h:>8}" for _, h, _ in columns))
        for persona in personas:
            shown = []
            for metric, _, fmt in columns:
                cell = cells.get((persona, metric))
                if cell is None or cell.get("delta") is None:
                    shown.append("-")
                else:
                    text = fmt.format(cell["delta"])
                    if float(text) == 0:  # no "-0.000" for a difference that rounds to nothing
                        text = fmt.format(0.0)
                    shown.append(text + ("*" if cell.get("significant") else ""))
            lines.append(f"  {persona:<{width}} " + " ".join(f"{cell:>8}" for cell in shown))
    return lines


def render_baseline_comparison(document: Mapping[str, Any], *, candidate: str = "") -> list[str]:
    """The text of `persona-eval compare`: the verdict first (each crossed rule, blocking first), then a
    table of deltas (candidate minus approved) per model, task and stratum, * marking a significant one.
    `document` is what :func:`persona_eval.gate.approved_comparison` returns."""
    verdict = document["verdict"]
    approved = document.get("approved") or {}
    blocking, recorded = verdict.get("blocking") or [], verdict.get("recorded") or []
    checked = len(document.get("regressions") or [])
    head = (STATE_WORDS["passed"] if verdict["passed"]
            else f"{STATE_WORDS['failed']}: {len(blocking)} persona-safety regression(s)")
    lines = [f"persona-eval compare: {head} ({checked} regression checks; {len(recorded)} record-only crossed)"]
    lines.append(f"  approved: {approved.get('source')} (run {approved.get('run_id')})")
    if candidate:
        lines.append(f"  candidate: {candidate}")
    lines.extend(f"  - {message}" for message in blocking)
    if recorded:
        lines.append("Record-only regressions crossed:")
        lines.extend(f"  - {message}" for message in recorded)
    skipped = [c["message"] for c in document.get("regressions") or [] if c["status"] == "skipped"]
    lines.extend(f"  not checked: {message}" for message in skipped)
    lines.extend(f"  not compared: {note}" for note in document.get("skipped") or [])
    lines.extend(_delta_tables(document.get("comparisons") or []))
    lines.append("")
    labelled = _labelled(c["task"] for c in document.get("comparisons") or [])
    legend = _legend(labelled, [m for spec in labelled for m in compared_metrics(spec.name)])
    lines.append(f"Deltas are candidate minus approved; * significant after Holm adjustment (p < {ALPHA})."
                 + (f" {legend}." if legend else ""))
    return lines


def served_model_lines(metadata: Mapping[str, Any]) -> list[str]:
    """One line per model whose cache was not used because another model answers at its name and address,
    and per parameter a server refused (and so was not sent)."""
    lines = [f"persona-eval: {message}" for message in (metadata.get("identity_changes") or {}).values()]
    for model, tasks in (metadata.get("decoding_sent") or {}).items():
        dropped: dict[str, str] = {}
        for record in tasks.values():
            dropped.update(record.get("dropped") or {})
        lines.extend(f"persona-eval: model {model!r}: the server refused {parameter} ({reason}); it was not sent"
                     for parameter, reason in dropped.items())
    return lines


def throughput_line(model: str, row: Mapping[str, Any]) -> str:
    """One model's throughput, e.g. ``served: 624 requests, 0 from the cache; 624 sent, 231.4 in flight on
    average (up to 256), 8,112 generated tokens, 602.1 tokens/s of model time; the server's prefix cache
    hit 91% of prompt tokens``."""
    line = f"{model}: {row['requests']} requests, {row['cached']} from the cache"
    if row.get("sent"):
        mean = row.get("mean_in_flight")
        line += (f"; {row['sent']:,} sent, " + (f"{mean} in flight on average " if mean is not None else "")
                 + f"(up to {row['max_in_flight']})")
    else:
        line += f", up to {row['max_in_flight']} in flight"
    tokens = row.get("completion_tokens") or 0
    line += (f", {tokens:,} generated tokens, {row['tokens_per_second']} tokens/s of model time"
             if row["tokens_per_second"] else ", no model calls")
    line += f" ({row['model_seconds']:.1f} s in the model)"
    lowest, ceiling = row.get("limit_lowest"), row.get("limit_ceiling")
    if lowest is not None and ceiling is not None and lowest < ceiling:
        line += f"; the server's rate limit brought requests at once down to {lowest} (of {ceiling})"
    if row.get("prefix_cache_hit_rate") is not None:
        line += f"; the server's prefix cache held {row['prefix_cache_hit_rate']:.0%} of prompt tokens"
    return line


def render_run_notes(summary: Mapping[str, Any], *, errors: Sequence[str] = (), dataset_notes: Sequence[str] = (),
                     kept_controls: Sequence[str] = (), run_dir: Any = None,
                     saved_baseline: Any = None) -> list[tuple[str, str | None]]:
    """The lines after the tables, each with its colour (None, "red" or "yellow"): the problems of the
    run's files, each model's throughput, served-model and dataset notes, and where the results are."""
    lines: list[tuple[str, str | None]] = [(f"persona-eval: {error}", "red") for error in errors]
    metadata = summary["metadata"]
    for model, row in (metadata.get("throughput") or {}).items():
        lines.append((throughput_line(model, row), None))
    lines.extend((line, "yellow") for line in served_model_lines(metadata))
    lines.extend((f"persona-eval: {note}", "yellow") for note in dataset_notes)
    if kept_controls:
        lines.append((f"persona-eval: kept the control(s) {', '.join(kept_controls)} in the run although -k "
                      "deselected them: every persona is compared with them", None))
    if run_dir is not None:
        lines.append((f"Results: {run_dir}/ (report.html, summary.md, cases.jsonl, summary.json)", None))
    if saved_baseline is not None:
        lines.append((f"Approved baseline saved: {saved_baseline}", None))
    return lines
