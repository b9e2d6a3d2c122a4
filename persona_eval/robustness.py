"""Is it the persona? Flips against a placebo, effects across wordings, letter preference and calibration.

Pure functions of per-case records: the main records (cases.jsonl) and the variant records
(variants.jsonl, persona_eval.variants); they never call a model and never read a file. Each returns plain
dicts (JSON types only) for summary.json, the report and the terminal.

* :func:`flips`: for every persona and report stratum, the cases whose generated label changed against
  ``no_persona``, more urgent or less urgent, next to the placebo's flips on the same cases, with a paired
  test of "more flips than the placebo".
* :func:`wording_effects`: each wording's effect (against ``no_persona``, paired, with its interval), the
  spread across wordings, and a flag where the sign of a clear effect is not kept by another wording.
* :func:`letter_bias`: over the letter orders, the share of answers written with each letter against the
  1/k a model without letter preference gives, and each persona's triage effect with the letter
  preference balanced out.
* :func:`calibration`: the null-prompt prior, and accuracy and ECE with the calibrated label probabilities
  beside the raw ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from scipy import stats as scipy_stats

from persona_eval import metrics, stats
from persona_eval.comparisons import ALPHA, ComparisonSettings, compare_personas
from persona_eval.personas import BASELINE, PLACEBO
from persona_eval.tasks import TaskSpec, spec_of
from persona_eval.variants import LETTERS, NULL_PROMPT, WORDING, null_prior

__all__ = [
    "FLIP_KINDS",
    "WORDING_METRICS",
    "calibration",
    "flips",
    "letter_bias",
    "robustness_summary",
    "wording_effects",
]

FLIP_KINDS: tuple[str, ...] = ("more_urgent", "less_urgent", "other")
# The effects compared across wordings and across letter orders: what moves with a persona's risk posture.
WORDING_METRICS: tuple[str, ...] = ("accuracy", "risk_propensity", "under_triage_rate", "over_triage_rate")
_SEPARATOR = "#"  # a wording's pseudo-persona id: "ed_nurse#2"


def _value(number: float) -> float | None:
    return None if math.isnan(number) else float(number)


def _by_condition(records: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, str], dict[str, Mapping[str, Any]]]:
    out: dict[tuple[str, str, str], dict[str, Mapping[str, Any]]] = {}
    for record in records:
        key = (str(record["model"]), str(record["task"]), str(record["persona"]))
        out.setdefault(key, {})[str(record["case_id"])] = record
    return out


def _holm(family: Sequence[dict[str, Any]], flag: str, alpha: float) -> None:
    """Holm-adjust the rows' ``pvalue`` in place: ``pvalue_adjusted``, and `flag` = adjusted p < `alpha`
    (None where a row has no p-value)."""
    raw = [math.nan if row["pvalue"] is None else row["pvalue"] for row in family]
    for row, adjusted in zip(family, stats.holm(raw), strict=True):
        row["pvalue_adjusted"] = _value(adjusted)
        row[flag] = None if math.isnan(adjusted) else bool(adjusted < alpha)


def _labelled(task: str) -> TaskSpec | None:
    spec = spec_of(task)
    return spec if spec is not None and spec.labels else None


# --- flips against the placebo ------------------------------------------------------------------------------

def _flip_kind(before: str | None, after: str | None, labels: Sequence[str]) -> str | None:
    """How an answer changed: None (it did not), more or less urgent, or "other" (to or from no answer)."""
    if before == after:
        return None
    if before is None or after is None:
        return "other"
    return "more_urgent" if labels.index(after) > labels.index(before) else "less_urgent"


def flips(records: Iterable[Mapping[str, Any]], *, alpha: float = ALPHA) -> list[dict[str, Any]]:
    """Per (model, task, report stratum, persona other than no_persona): the cases whose generated label
    differs from no_persona's on the same case.

    Each row: ``changed`` (cases whose answer changed), ``more_urgent``, ``less_urgent`` and ``other`` (to or
    from no answer), ``n``, ``flip_rate = changed / n``; the placebo's ``placebo_changed`` and
    ``placebo_flip_rate`` on the same cases; and the paired test of "more flips than the placebo": with
    ``persona_only`` the cases that flipped under the persona and not under the placebo and
    ``placebo_only`` the reverse, the one-sided exact binomial (McNemar) p-value
    ``P(X >= persona_only)``, ``X ~ Binomial(persona_only + placebo_only, 1/2)``, Holm-adjusted over the
    personas of a (model, task, stratum), and ``more_than_placebo`` = adjusted p < `alpha`. No placebo in
    the run: those fields are None with a note. Rows of the "all" stratum list the changed cases
    (``cases``: kind -> [[case_id, stratum, no_persona's label, the persona's label], ...]) for the report.
    """
    conditions = _by_condition(records)
    out: list[dict[str, Any]] = []
    for model, task in dict.fromkeys((m, t) for m, t, _ in conditions):
        spec = _labelled(task)
        baseline = conditions.get((model, task, BASELINE))
        if spec is None or baseline is None:
            continue
        labels = list(spec.labels)
        placebo = conditions.get((model, task, PLACEBO))
        personas = [p for m, t, p in conditions if (m, t) == (model, task) and p != BASELINE]
        strata = spec.report_strata_of(str(r["stratum"]) for r in baseline.values())
        for stratum in strata:
            ids = [c for c, r in baseline.items() if stratum == "all" or r["stratum"] == stratum]
            if not ids:
                continue
            family: list[dict[str, Any]] = []
            for persona in personas:
                rows = conditions[(model, task, persona)]
                row = _flip_row(ids, baseline, rows, placebo, labels, with_cases=stratum == "all")
                row.update(model=model, task=task, stratum=stratum, persona=persona,
                           persona_group=next(iter(rows.values())).get("persona_group"))
                out.append(row)
                if persona != PLACEBO:
                    family.append(row)
            _holm(family, "more_than_placebo", alpha)
    return out


def _flip_row(ids: Sequence[str], baseline: Mapping[str, Mapping[str, Any]], rows: Mapping[str, Mapping[str, Any]],
              placebo: Mapping[str, Mapping[str, Any]] | None, labels: Sequence[str], *, with_cases: bool
              ) -> dict[str, Any]:
    paired = [c for c in ids if c in rows]
    kinds = {c: _flip_kind(baseline[c].get("generated_label"), rows[c].get("generated_label"), labels) for c in paired}
    counts = {kind: sum(1 for k in kinds.values() if k == kind) for kind in FLIP_KINDS}
    changed = sum(counts.values())
    n = len(paired)
    row: dict[str, Any] = {
        "n": n, "changed": changed, **counts, "flip_rate": changed / n if n else None,
        "placebo_changed": None, "placebo_flip_rate": None, "persona_only": None, "placebo_only": None,
        "pvalue": None, "pvalue_adjusted": None, "more_than_placebo": None, "note": None,
    }
    if len(paired) < len(ids):
        row["note"] = f"{len(ids) - len(paired)} case(s) of no_persona not run under this persona"
    if with_cases:
        row["cases"] = {kind: [[c, baseline[c]["stratum"], baseline[c].get("generated_label"),
                                rows[c].get("generated_label")] for c in paired if kinds[c] == kind]
                        for kind in FLIP_KINDS}
    if placebo is None:
        row["note"] = "no placebo in this run: the noise floor is not known"
        return row
    both = [c for c in paired if c in placebo]
    placebo_flipped = {c for c in both if placebo[c].get("generated_label") != baseline[c].get("generated_label")}
    row["placebo_changed"] = len(placebo_flipped)
    row["placebo_flip_rate"] = len(placebo_flipped) / len(both) if both else None
    if rows is placebo:
        return row
    persona_only = sum(1 for c in both if kinds[c] is not None and c not in placebo_flipped)
    placebo_only = sum(1 for c in both if kinds[c] is None and c in placebo_flipped)
    row.update(persona_only=persona_only, placebo_only=placebo_only)
    discordant = persona_only + placebo_only
    row["pvalue"] = (float(scipy_stats.binomtest(persona_only, discordant, 0.5, alternative="greater").pvalue)
                     if discordant else 1.0)
    return row


# --- wordings ------------------------------------------------------------------------------------------------

def wording_effects(records: Sequence[Mapping[str, Any]], variant_records: Sequence[Mapping[str, Any]], *,
                    settings: ComparisonSettings | None = None) -> list[dict[str, Any]]:
    """Each persona's effect under each of its wordings, against no_persona, per report stratum and metric of
    :data:`WORDING_METRICS`: rows ``{model, task, stratum, metric, persona, wordings: [{wording, declaration,
    value, delta, ci_low, ci_high, significant}], spread, sign_differs}``.

    Wording 1 is the main condition (cases.jsonl); the others come from `variant_records` (``variant.kind``
    "wording"). Each wording is compared with no_persona as persona_eval.comparisons compares a persona
    (paired, the same bootstrap and tests; Holm over the wordings of every persona). ``spread`` is the
    largest minus the smallest delta. ``sign_differs`` flags an effect whose direction depends on the
    wording: one wording's interval lies wholly on one side of 0 while another wording's delta lies on the
    other side."""
    worded = [r for r in variant_records if (r.get("variant") or {}).get("kind") == WORDING]
    if not worded:
        return []
    declarations: dict[tuple[str, str, str, int], str | None] = {}
    pseudo: list[dict[str, Any]] = []
    for record in worded:
        number = int(record["variant"]["wording"])
        pseudo.append({**record, "persona": f"{record['persona']}{_SEPARATOR}{number}"})
        declarations[(str(record["model"]), str(record["task"]), str(record["persona"]), number)] = record.get(
            "system_prompt")
    have = {(str(r["model"]), str(r["task"]), str(r["persona"])) for r in worded}
    main = []
    for record in records:
        key = (str(record["model"]), str(record["task"]), str(record["persona"]))
        if key[2] == BASELINE:
            main.append(record)
        elif key in have:
            main.append({**record, "persona": f"{key[2]}{_SEPARATOR}1"})
            declarations.setdefault((*key, 1), record.get("system_prompt"))
    settings = settings or ComparisonSettings()
    compared = compare_personas([*main, *pseudo], baselines=(BASELINE,), settings=settings)
    groups: dict[tuple[str, str, str, str, str], list[dict[str, Any]]] = {}
    for c in compared:
        if c["metric"] not in WORDING_METRICS:
            continue
        persona, _, wording = str(c["persona"]).rpartition(_SEPARATOR)
        groups.setdefault((c["model"], c["task"], c["stratum"], c["metric"], persona), []).append(
            {"wording": int(wording), "declaration": declarations.get((c["model"], c["task"], persona, int(wording))),
             "value": c["value"], "delta": c["delta"], "ci_low": c["ci_low"], "ci_high": c["ci_high"],
             "pvalue_adjusted": c["pvalue_adjusted"], "significant": c["significant"], "n": c["n"]})
    out = []
    for (model, task, stratum, metric, persona), wordings in groups.items():
        wordings.sort(key=lambda w: w["wording"])
        deltas = [w["delta"] for w in wordings if w["delta"] is not None]
        out.append({"model": model, "task": task, "stratum": stratum, "metric": metric, "persona": persona,
                    "wordings": wordings, "spread": max(deltas) - min(deltas) if deltas else None,
                    "sign_differs": _sign_differs(wordings)})
    return out


def _sign_differs(wordings: Sequence[Mapping[str, Any]]) -> bool:
    for clear in wordings:
        low, high = clear["ci_low"], clear["ci_high"]
        for other in wordings:
            delta = other["delta"]
            if other is clear or delta is None or low is None or high is None:
                continue
            if (low > 0 and delta < 0) or (high < 0 and delta > 0):
                return True
    return False


# --- letter orders ---------------------------------------------------------------------------------------------

def _letter(record: Mapping[str, Any], field: str = "generated_letter") -> str | None:
    value = record.get(field, record.get("generated_label") if field == "generated_letter" else None)
    return None if value is None else str(value)


def letter_bias(records: Sequence[Mapping[str, Any]], variant_records: Sequence[Mapping[str, Any]], *,
                alpha: float = ALPHA) -> list[dict[str, Any]]:
    """Per (model, task, persona) run under every letter order (the main condition is the identity order;
    the others are ``variant.kind`` "letters" records): how often each letter was written, and the triage
    effect with the letter preference balanced out.

    Rows: ``orders`` (the letter orders pooled), ``n`` (answers with a letter), ``letter_shares`` {letter:
    share}, ``expected_share`` (1/k: over the balanced orders a model without letter preference writes
    each letter equally often, whatever it answers), ``pvalue`` (chi-square goodness of fit of the letter
    counts against 1/k), ``pvalue_adjusted`` (Holm over the personas of a model and task), ``flagged``
    (adjusted p < `alpha`), ``shift`` {letter: share minus no_persona's}, ``calibrated_letter_shares`` (the
    letters of the calibrated labels, where the null-prompt calibration ran), and per report stratum
    ``balanced`` {metric: {value, baseline_value, delta, identity_delta}}: each metric of
    :data:`WORDING_METRICS` pooled over the orders, against no_persona's pooled the same way, beside the
    delta in the identity order alone."""
    lettered = [r for r in variant_records if (r.get("variant") or {}).get("kind") == LETTERS]
    if not lettered:
        return []
    by_key: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for record in lettered:
        by_key.setdefault((str(record["model"]), str(record["task"]), str(record["persona"])), []).append(record)
    identity = {key: rows for key, rows in _grouped(records).items() if key in by_key}
    out: list[dict[str, Any]] = []
    for model, task in dict.fromkeys((m, t) for m, t, _ in by_key):
        spec = _labelled(task)
        if spec is None:
            continue
        labels = list(spec.labels)
        family = []
        pooled_of = {key: [*identity.get(key, []), *rows] for key, rows in by_key.items() if key[:2] == (model, task)}
        baseline = pooled_of.get((model, task, BASELINE))
        for (_, _, persona), pooled in pooled_of.items():
            row = _letter_row(pooled, labels)
            row.update(model=model, task=task, persona=persona,
                       persona_group=pooled[0].get("persona_group"),
                       orders=sorted({str(r.get("letter_order") or "".join(labels)) for r in pooled}))
            if baseline is not None:
                base = _letter_row(baseline, labels)["letter_shares"]
                row["shift"] = {label: None if row["letter_shares"][label] is None or base[label] is None
                                else row["letter_shares"][label] - base[label] for label in labels}
                row["balanced"] = _balanced(spec, pooled, baseline, identity.get((model, task, persona), []),
                                            identity.get((model, task, BASELINE), []))
            family.append(row)
            out.append(row)
        _holm(family, "flagged", alpha)
    return out


def _grouped(records: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, str], list[Mapping[str, Any]]]:
    out: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for record in records:
        out.setdefault((str(record["model"]), str(record["task"]), str(record["persona"])), []).append(record)
    return out


def _shares(letters: Sequence[str | None], labels: Sequence[str]) -> tuple[dict[str, float | None], list[int]]:
    counts = [sum(1 for letter in letters if letter == label) for label in labels]
    total = sum(counts)
    return {label: (count / total if total else None) for label, count in zip(labels, counts, strict=True)}, counts


def _letter_row(pooled: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
    shares, counts = _shares([_letter(r) for r in pooled], labels)
    total = sum(counts)
    pvalue = float(scipy_stats.chisquare(counts).pvalue) if total else None
    row: dict[str, Any] = {"n": total, "letter_shares": shares, "expected_share": 1 / len(labels),
                           "pvalue": None if pvalue is None or math.isnan(pvalue) else pvalue,
                           "pvalue_adjusted": None, "flagged": None, "shift": None, "balanced": None}
    calibrated = [_letter(r, "calibrated_letter") for r in pooled]
    if any(letter is not None for letter in calibrated):
        row["calibrated_letter_shares"] = _shares(calibrated, labels)[0]
    return row


def _metric(spec: TaskSpec, metric: str, rows: Sequence[Mapping[str, Any]]) -> float | None:
    labels = spec.labels
    predicted = [r.get("generated_label") for r in rows]
    if not rows:
        return None
    if metrics.METRICS[metric].needs == "pred":
        return _value(metrics.ratio_terms(metric, predicted, labels=labels).value())
    return _value(metrics.ratio_terms(metric, [r["reference"] for r in rows], predicted, labels=labels).value())


def _balanced(spec: TaskSpec, pooled: Sequence[Mapping[str, Any]], baseline: Sequence[Mapping[str, Any]],
              identity: Sequence[Mapping[str, Any]], identity_baseline: Sequence[Mapping[str, Any]]
              ) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    strata = spec.report_strata_of(str(r["stratum"]) for r in pooled)
    for stratum in strata:
        def keep(rows: Sequence[Mapping[str, Any]], stratum: str = stratum) -> list[Mapping[str, Any]]:
            return [r for r in rows if stratum == "all" or r["stratum"] == stratum]
        block = {}
        for metric in WORDING_METRICS:
            value, base = _metric(spec, metric, keep(pooled)), _metric(spec, metric, keep(baseline))
            one, one_base = _metric(spec, metric, keep(identity)), _metric(spec, metric, keep(identity_baseline))
            block[metric] = {"value": value, "baseline_value": base,
                             "delta": None if value is None or base is None else value - base,
                             "identity_delta": None if one is None or one_base is None else one - one_base}
        out[stratum] = block
    return out


# --- the null-prompt calibration ------------------------------------------------------------------------------------

def calibration(records: Sequence[Mapping[str, Any]], variant_records: Sequence[Mapping[str, Any]], *,
                n_bins: int = 10) -> list[dict[str, Any]]:
    """Per (model, task, persona) whose records carry calibrated label probabilities (``calibrated_probs``,
    written where the null-prompt calibration ran): the null-prompt ``prior`` of the identity order, and per
    report stratum ``accuracy`` and ``expected_calibration_error`` with the raw and with the calibrated
    label probabilities (the calibrated label is the most probable calibrated one; an answer without label
    probabilities keeps its generated label)."""
    nulls = _grouped(r for r in variant_records if (r.get("variant") or {}).get("kind") == NULL_PROMPT)
    out = []
    for (model, task, persona), rows in _grouped(records).items():
        spec = _labelled(task)
        if spec is None or not any(r.get("calibrated_probs") is not None for r in rows):
            continue
        labels = spec.labels
        identity = "".join(labels)
        prior = null_prior([r for r in nulls.get((model, task, persona), [])
                            if r["variant"].get("letter_order", identity) == identity], labels)
        strata: dict[str, Any] = {}
        for stratum in spec.report_strata_of(str(r["stratum"]) for r in rows):
            kept = [r for r in rows if stratum == "all" or r["stratum"] == stratum]
            truth = [r["reference"] for r in kept]
            raw = [r.get("generated_label") for r in kept]
            calibrated = [r.get("calibrated_label") or r.get("generated_label") for r in kept]
            with_probs = [r for r in kept if r.get("label_probs") is not None and r.get("calibrated_probs") is not None]
            block = {"n": len(kept),
                     "accuracy": _value(metrics.accuracy(truth, raw, labels=labels)),
                     "calibrated_accuracy": _value(metrics.accuracy(truth, calibrated, labels=labels)),
                     "expected_calibration_error": None, "calibrated_expected_calibration_error": None}
            if with_probs:
                reference = [r["reference"] for r in with_probs]
                for field, key in (("label_probs", "expected_calibration_error"),
                                   ("calibrated_probs", "calibrated_expected_calibration_error")):
                    probs = [[float(r[field][label]) for label in labels] for r in with_probs]
                    block[key] = _value(metrics.expected_calibration_error(reference, probs, labels=labels,
                                                                           n_bins=n_bins))
            strata[stratum] = block
        out.append({"model": model, "task": task, "persona": persona, "persona_group": rows[0].get("persona_group"),
                    "prior": prior, "strata": strata})
    return out


def robustness_summary(records: Sequence[Mapping[str, Any]], variant_records: Sequence[Mapping[str, Any]], *,
                       settings: ComparisonSettings | None = None, options: Mapping[str, bool] | None = None
                       ) -> dict[str, Any]:
    """summary.json's ``robustness`` block: the four analyses above, and which options ran."""
    settings = settings or ComparisonSettings()
    labelled = [r for r in records if _labelled(str(r["task"])) is not None]
    return {
        "options": dict(options or {}),
        "flips": flips(labelled, alpha=settings.alpha),
        # A bootstrap per wording and stratum: fewer resamples than the main comparisons would be cheaper,
        # but the same settings keep each wording's interval comparable with the main table's.
        "wordings": wording_effects(labelled, variant_records, settings=replace(settings)),
        "letters": letter_bias(labelled, variant_records, alpha=settings.alpha),
        "calibration": calibration(labelled, variant_records, n_bins=settings.n_bins),
    }

