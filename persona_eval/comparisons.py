"""Paired comparisons: each persona against a control condition, or a candidate run against an approved one.

Pure functions of per-case records (the lines of cases.jsonl); they never call a model and never read a
file. Every comparison pairs the two conditions case by case (matched on ``case_id``), for one model, task
and report stratum ("all", "emergency", "primary_care"), and is a plain dict (JSON types only):

``model, task, stratum, metric, persona, persona_group, baseline``
    what is compared: ``persona`` against ``baseline`` (a control persona id within a run, or
    ``"approved"`` against an approved baseline, whose model is then named by ``baseline_model``);
``value, baseline_value, delta``
    the metric under each condition on the matched cases, and ``delta = value - baseline_value``;
``ci_low, ci_high, confidence_level, interval_method, n_resamples``
    a paired percentile bootstrap interval of ``delta`` (see below);
``pvalue, pvalue_adjusted, significant, test, statistic``
    the raw two-sided p-value of the paired test, Holm-adjusted within its family (see below), whether
    the adjusted p-value is below ``alpha``, the name of the test the p-value comes from (below) and
    its statistic;
``n``
    the number of matched cases the comparison uses;
``persona_only, baseline_only``
    McNemar comparisons only: the discordant pairs, i.e. cases where the outcome (correct, or
    consistent) holds under the persona only, and under the baseline only;
``standard_error``
    the standard deviation of the kept resampled differences (the bootstrap's standard error of
    ``delta``), or None with fewer than two;
``mde, mde_level, mde_power, family_size``
    the minimum detectable effect: the smallest ``|delta|``, in the metric's own units (those of
    ``delta``: a share, percentage points for ``consistency_rate``), that the comparison's test would
    find significant with probability ``mde_power`` (0.8) at the two-sided level ``mde_level``, with
    ``family_size`` the number of comparisons with a p-value in its Holm family (see below). None, with
    a note, where no difference is detectable (too few cases) or the comparison has no p-value;
``note``
    why a value is None, or None. Undefined values (NaN: no parsable answer, no label probabilities,
    no resample that defines the difference) are written as None with a note, never as NaN.

Tests:

- ``accuracy`` (reference == generated label; an unparsable answer is wrong) and ``consistency_rate``
  (generated label == logit label, in percent, on the cases where both labels exist under both
  conditions) use McNemar's test (:func:`persona_eval.stats.mcnemar`, i.e.
  ``statsmodels.stats.contingency_tables.mcnemar``): the exact binomial test when the discordant pairs
  are fewer than 25 (``test`` = "McNemar exact binomial", ``statistic`` = the smaller discordant count),
  the continuity-corrected chi-square otherwise (``test`` = "McNemar continuity-corrected chi-square",
  ``statistic`` = the chi-square). No discordant pair gives p = 1 (exact). A comparison whose McNemar
  test is not defined (no case to pair) has ``test`` = "McNemar" and no p-value.
- ``risk_propensity``, ``under_triage_rate``, ``over_triage_rate`` and ``expected_calibration_error``
  use the paired bootstrap: cases are resampled with replacement, resample ``r`` being the ``r``-th draw
  ``rng.integers(0, n, size=n)`` of ``rng = numpy.random.default_rng(seed)`` (so the same seed gives the
  same resampled cases), and the same resampled cases are used for both conditions. A metric's values on
  the matched cases and on each resample come from the same per-case terms
  (:func:`persona_eval.metrics.ratio_terms`, :func:`persona_eval.metrics.calibration_terms`): their sums,
  each case weighted on a resample by how often it was drawn. The two-sided p-value comes from the same
  resamples: with ``d*`` the kept (non-NaN) resampled differences, ``R`` their number::

      p = min(1, 2 * min(1 + #{d* <= 0}, 1 + #{d* >= 0}) / (R + 1))

  the percentile-interval inversion (0 lies outside the equal-tailed ``1 - p`` interval), with the +1
  that keeps a finite number of resamples from claiming p = 0 (Davison & Hinkley 1997, ch. 4);
  ``test`` = "paired bootstrap".

Every comparison gets the bootstrap interval of its difference, McNemar ones included, so that each
delta reads with an interval; the McNemar p-value is the one that decides their significance.

Families: p-values are Holm-adjusted within each (model, task, stratum, metric, baseline), i.e. over the
personas compared with one control on one metric. Against an approved baseline the family is the same
with ``baseline = "approved"``.

Power (:mod:`persona_eval.power`): ``mde_level = alpha / m``, ``m = family_size``, the threshold of
Holm's first step. A raw p-value below it is significant whatever the other members' p-values: the
adjusted p of the j-th smallest is the largest ``(m - i + 1) p_(i)`` over ``i <= j``, and each of these is
at most ``m p_(j)``. So the MDE is the smallest difference the comparison detects with 80% power on its
own. Holm's later steps are more lenient (up to ``alpha`` itself), but a member reaches them only when
the members with smaller p-values are significant too; the MDE does not count on that, which makes it
conservative (a larger MDE, never a smaller one). McNemar comparisons use
:func:`persona_eval.power.mcnemar_mde` (exact power of the very test used) with the observed discordance
``(persona_only + baseline_only) / n``; bootstrap ones use :func:`persona_eval.power.normal_mde` with
``standard_error`` and the resolution of the bootstrap p-value with ``n_resamples`` resamples, floored,
for the shares of cases (risk propensity, under- and over-triage), at the spread of a shift in which a
share ``mde`` of the ``n`` cases change, so that two conditions that never differed on the cases seen do
not claim to detect every difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeAlias

import numpy as np

from persona_eval import metrics, stats
from persona_eval.errors import ConfigError, DataError
from persona_eval.personas import CONTROLS
from persona_eval.power import DEFAULT_POWER, mcnemar_mde, normal_mde
from persona_eval.tasks import TaskSpec, spec_of

__all__ = [
    "ALPHA",
    "APPROVED",
    "BOOTSTRAP_TEST",
    "CONTROLS",
    "DEFAULT_RESAMPLES",
    "MCNEMAR_TEST",
    "ComparisonSettings",
    "adjust_pvalues",
    "check_same_dataset",
    "compare_personas",
    "compare_to_approved",
    "compared_metrics",
    "family_of",
]

# The test families of COMPARED_METRICS; a McNemar comparison's `test` names the variant it used
# (stats.MCNEMAR_EXACT or stats.MCNEMAR_CHI_SQUARE), a bootstrap comparison's is BOOTSTRAP_TEST.
MCNEMAR_TEST = "McNemar"
BOOTSTRAP_TEST = "paired bootstrap"
INTERVAL_METHOD = "paired percentile bootstrap"
# Every persona is compared with each of CONTROLS, in that order; a control that did not run is skipped,
# and a control is never compared with itself.
APPROVED = "approved"
# The test family of each metric a task may compare (TaskSpec.compared): a paired test of the cases' right
# or wrong (McNemar) for the shares of cases, the paired bootstrap for the others.
TEST_FAMILIES: dict[str, str] = {
    "accuracy": MCNEMAR_TEST,
    "consistency_rate": MCNEMAR_TEST,
    "risk_propensity": BOOTSTRAP_TEST,
    "under_triage_rate": BOOTSTRAP_TEST,
    "over_triage_rate": BOOTSTRAP_TEST,
    "expected_calibration_error": BOOTSTRAP_TEST,
}
# Bootstrap metrics that are shares of cases with a binary outcome: their MDE is floored (normal_mde's n).
_CASE_SHARES = frozenset({"risk_propensity", "under_triage_rate", "over_triage_rate"})


def _spec(task: str) -> TaskSpec:
    spec = spec_of(task)
    if spec is None:  # compared_metrics is empty for such a task: never compared
        raise ConfigError(f"task {task!r} is not known to this process")
    return spec


def compared_metrics(task: str) -> dict[str, str]:
    """The metrics compared for `task`, in report order, and the family of the test each uses (empty for a
    task without paired comparisons, or one this process does not know)."""
    spec = spec_of(task)
    return {metric: TEST_FAMILIES[metric] for metric in spec.compared} if spec is not None and spec.labels else {}


FAMILY_KEYS: tuple[str, ...] = ("model", "task", "stratum", "metric", "baseline")
_NO_PROBS = "not available: no label probabilities for {who} (the model gives no log-probabilities)"
_UNDEFINED = "not defined on these cases ({why})"
_REQUIRED_FIELDS: tuple[str, ...] = ("model", "task", "persona", "case_id", "stratum", "reference")
DEFAULT_RESAMPLES = 2000
ALPHA = 0.05  # the significance level, after Holm's adjustment
# Bootstrap count matrices are built in blocks of at most this many entries (resamples x cases).
_BLOCK_ENTRIES = 1 << 22


@dataclass(frozen=True)
class ComparisonSettings:
    """How comparisons are computed: bootstrap resamples, interval level, significance level, seed and
    the calibration bins (as :func:`persona_eval.metrics.expected_calibration_error`)."""

    n_resamples: int = DEFAULT_RESAMPLES
    confidence_level: float = 0.95
    alpha: float = ALPHA
    seed: int = 0
    n_bins: int = 10

    def __post_init__(self) -> None:
        for name in ("n_resamples", "n_bins"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"comparison setting {name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"comparison setting seed must be a non-negative integer, got {self.seed!r}")
        for name in ("confidence_level", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ConfigError(f"comparison setting {name} must be a number strictly between 0 and 1, "
                                  f"got {value!r}")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "adjustment": "holm", "family": list(FAMILY_KEYS),
                "bootstrap_pvalue": "two-sided percentile inversion, min(1, 2 min(1 + #{d*<=0}, "
                                    "1 + #{d*>=0}) / (R + 1))",
                "mde": f"smallest difference detected with {DEFAULT_POWER:.0%} power at alpha / m (Holm's first "
                       "step, m = family_size): exact for McNemar, normal with the bootstrap's resolution otherwise"}


# --- conditions ----------------------------------------------------------------------------------------

@dataclass
class _Condition:
    """The records of one (model, task, persona), by case id in record order."""

    model: str
    task: str
    persona: str
    persona_group: str | None
    rows: dict[str, Mapping[str, Any]]

    def describe(self) -> str:
        return f"{self.persona} on {self.model}"

    def case_ids(self, stratum: str) -> list[str]:
        return [case_id for case_id, row in self.rows.items() if stratum == "all" or row["stratum"] == stratum]


def _conditions(records: Iterable[Mapping[str, Any]], *, side: str = "") -> dict[tuple[str, str, str], _Condition]:
    """Records grouped by (model, task, persona), in first-seen order; a case id twice in one condition
    is an error (a pairing by case id would be ambiguous)."""
    out: dict[tuple[str, str, str], _Condition] = {}
    for number, record in enumerate(records, start=1):
        if not isinstance(record, Mapping):
            raise DataError(f"{side}record {number} is {type(record).__name__}, not a mapping of case fields")
        for field in _REQUIRED_FIELDS:
            if record.get(field) is None:
                raise DataError(f"{side}record {number} has no field {field!r}; expected the fields of "
                                "cases.jsonl (model, task, persona, case_id, stratum, reference, ...)")
        key = (str(record["model"]), str(record["task"]), str(record["persona"]))
        case_id = str(record["case_id"])
        condition = out.get(key)
        if condition is None:
            condition = out[key] = _Condition(*key, persona_group=record.get("persona_group"), rows={})
        if case_id in condition.rows:
            raise DataError(f"{side}case {case_id!r} appears twice for {key[2]} on {key[0]} ({key[1]}); "
                            "each condition holds each case once")
        condition.rows[case_id] = record
    return out


def _check_same_cases(persona: _Condition, baseline: _Condition, stratum: str, *, persona_side: str,
                      baseline_side: str) -> list[str]:
    """The baseline's case ids of `stratum`, after checking that the persona has exactly the same."""
    wanted = baseline.case_ids(stratum)
    have = persona.case_ids(stratum)
    have_set, wanted_set = set(have), set(wanted)  # once, not per case: a stratum may hold thousands
    missing = [case_id for case_id in wanted if case_id not in have_set]
    extra = [case_id for case_id in have if case_id not in wanted_set]
    if missing or extra:
        where = f"{persona.task}, stratum {stratum}"
        problems = []
        if missing:
            problems.append(f"{_ids(missing)} in {baseline_side}{baseline.describe()} but not in "
                            f"{persona_side}{persona.describe()}")
        if extra:
            problems.append(f"{_ids(extra)} in {persona_side}{persona.describe()} but not in "
                            f"{baseline_side}{baseline.describe()}")
        raise DataError(f"cannot pair the cases ({where}): case {'; case '.join(problems)}. Paired tests need "
                        "the same cases under both conditions")
    return wanted


def _ids(ids: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(case_id) for case_id in ids[:limit])
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return shown + more


# --- encoded outcomes on an ordered set of cases ----------------------------------------------------------

@dataclass
class _Outcomes:
    """One condition's answers on the cases of a comparison, in the comparison's case order."""

    condition: _Condition
    reference: list[str]
    generated: list[str | None]
    logit: list[str | None]
    probs: list[list[float] | None]
    labels: tuple[str, ...]

    @classmethod
    def of(cls, condition: _Condition, case_ids: Sequence[str]) -> _Outcomes:
        labels = _spec(condition.task).labels
        reference: list[str] = []
        generated: list[str | None] = []
        logit: list[str | None] = []
        probs: list[list[float] | None] = []
        for case_id in case_ids:
            row = condition.rows[case_id]
            for field in ("reference", "generated_label", "logit_label"):
                value = row.get(field)
                if value is not None and value not in labels:
                    raise DataError(f"case {case_id!r} of {condition.describe()}: field {field!r} is "
                                    f"{value!r}, not one of {', '.join(labels)}")
            reference.append(row["reference"])
            generated.append(row.get("generated_label"))
            logit.append(row.get("logit_label"))
            distribution = row.get("label_probs")
            if distribution is None:
                probs.append(None)
            else:
                try:
                    probs.append([float(distribution[label]) for label in labels])
                except (KeyError, TypeError, ValueError):
                    raise DataError(f"case {case_id!r} of {condition.describe()}: field 'label_probs' must "
                                    f"map each of {', '.join(labels)} to a probability, "
                                    f"got {distribution!r}") from None
        return cls(condition, reference, generated, logit, probs, labels)


def _value(number: float) -> float | None:
    return None if math.isnan(number) else float(number)


_Terms: TypeAlias = "metrics.RatioTerms | metrics.CalibrationTerms"


def _terms(metric: str, side: _Outcomes, other: _Outcomes, n_bins: int) -> _Terms:
    """`metric`'s per-case terms for `side`, one row per case of the comparison: the sums its value and
    every resampled value come from."""
    labels = side.labels
    if metric == "expected_calibration_error":
        # A case without label probabilities counts for nothing: no gap, no weight.
        rows = np.array([i for i, p in enumerate(side.probs) if p is not None], dtype=int)
        present = metrics.calibration_terms([side.reference[i] for i in rows], [side.probs[i] for i in rows],
                                            labels=labels, n_bins=n_bins)
        gaps, weight = np.zeros((len(side.probs), n_bins)), np.zeros(len(side.probs))
        gaps[rows], weight[rows] = present.gaps, present.weight
        return metrics.CalibrationTerms(gaps, weight)
    if metric == "consistency_rate":
        # Paired on the cases both conditions can be compared on, so McNemar and the interval see one set.
        terms = metrics.ratio_terms(metric, side.generated, side.logit, labels=labels)
        both = _both_consistent_cases(side, other)
        return metrics.RatioTerms(terms.numerator * both, terms.denominator * both)
    if metrics.METRICS[metric].needs == "pred":
        return metrics.ratio_terms(metric, side.generated, labels=labels)
    return metrics.ratio_terms(metric, side.reference, side.generated, labels=labels)


# --- the bootstrap: sums of per-case columns over resamples, all comparisons of a stratum at once -----------

class _Resampling:
    """Bootstrap resamples of ``n`` cases, as counts of each case per resample, applied to any number of
    per-case columns in one pass: ``sums[r, k] = sum_i count[r, i] * column_k[i]``. Every metric compared is
    a function of such sums of its per-case terms, so no metric is recomputed per resample."""

    def __init__(self, n: int, settings: ComparisonSettings) -> None:
        self.n = n
        self.settings = settings
        self._columns: list[np.ndarray] = []
        self._index: dict[bytes, int] = {}

    def _column(self, values: np.ndarray) -> int:
        # Equal columns have equal sums, so they share one: the cases of every accuracy denominator, a
        # condition's parsable answers under three metrics, a control's terms in each of its pairs.
        key = np.ascontiguousarray(values, dtype=float).tobytes()
        if key not in self._index:
            self._index[key] = len(self._columns)
            self._columns.append(np.asarray(values, dtype=float))
        return self._index[key]

    def statistic(self, terms: _Terms) -> Callable[[np.ndarray], np.ndarray]:
        """`terms`' metric on every resample, from the sums :meth:`run` returns."""
        indices = [self._column(column) for column in terms.columns.T]
        return lambda sums: terms.from_sums(sums[:, indices])

    def run(self) -> np.ndarray:
        features = np.column_stack(self._columns) if self._columns else np.zeros((self.n, 0))
        rng = np.random.default_rng(self.settings.seed)
        total = self.settings.n_resamples
        block = max(1, min(total, _BLOCK_ENTRIES // max(self.n, 1)))
        sums = np.empty((total, features.shape[1]))
        for start in range(0, total, block):
            rows = min(block, total - start)
            # One draw of n indices per resample, in resample order, whatever the block size: the same seed
            # gives the same resampled cases, hence the same interval and p-value.
            draws = np.stack([rng.integers(0, self.n, size=self.n) for _ in range(rows)])
            flat = (np.arange(rows)[:, None] * self.n + draws).ravel()
            counts = np.bincount(flat, minlength=rows * self.n).reshape(rows, self.n).astype(float)
            sums[start:start + rows] = counts @ features
        return sums


@dataclass
class _Pair:
    """One comparison's two sides and how its result is labelled."""

    persona: _Outcomes
    baseline: _Outcomes
    labels: dict[str, Any]


def _both_consistent_cases(a: _Outcomes, b: _Outcomes) -> np.ndarray:
    """Cases where the generated and the logit label both exist under both conditions."""
    return np.array([all(label is not None for label in (ga, la, gb, lb)) for ga, la, gb, lb in
                     zip(a.generated, a.logit, b.generated, b.logit, strict=True)], dtype=bool)


def _interval_and_pvalue(differences: np.ndarray, settings: ComparisonSettings
                         ) -> tuple[float | None, float | None, float | None, int, float | None]:
    """The percentile interval, the bootstrap p-value, the number of kept resamples and their standard
    deviation (None with fewer than two)."""
    kept = differences[~np.isnan(differences)]
    if not kept.size:
        return None, None, None, 0, None
    alpha = (1.0 - settings.confidence_level) / 2.0
    low, high = (float(b) for b in np.percentile(kept, [100.0 * alpha, 100.0 * (1.0 - alpha)]))
    at_or_below = int(np.count_nonzero(kept <= 0))
    at_or_above = int(np.count_nonzero(kept >= 0))
    pvalue = min(1.0, 2.0 * min(1 + at_or_below, 1 + at_or_above) / (kept.size + 1))
    spread = float(np.std(kept, ddof=1)) if kept.size > 1 else None
    return low, high, pvalue, int(kept.size), spread


def _comparisons_of_stratum(case_ids: Sequence[str], pairs: Sequence[_Pair], metric_tests: Mapping[str, str],
                            settings: ComparisonSettings) -> list[dict[str, Any]]:
    boot = _Resampling(len(case_ids), settings)
    pending = []
    for pair in pairs:
        for metric in metric_tests:
            terms = (_terms(metric, pair.persona, pair.baseline, settings.n_bins),
                     _terms(metric, pair.baseline, pair.persona, settings.n_bins))
            pending.append((pair, metric, terms, boot.statistic(terms[0]), boot.statistic(terms[1])))
    sums = boot.run() if case_ids else np.zeros((0, 0))
    out = []
    for pair, metric, terms, persona_stat, baseline_stat in pending:
        test = metric_tests[metric]
        comparison = _compare(pair, metric, test, terms, settings)
        if comparison["delta"] is not None:
            with np.errstate(invalid="ignore"):
                differences = persona_stat(sums) - baseline_stat(sums)
            low, high, boot_p, kept, spread = _interval_and_pvalue(differences, settings)
            comparison.update(ci_low=low, ci_high=high, n_resamples=kept, standard_error=spread)
            if test == BOOTSTRAP_TEST:
                comparison["pvalue"] = boot_p
            if low is None:
                _add_note(comparison, "no bootstrap resample defines the difference")
        out.append(comparison)
    return out


def _add_note(comparison: dict[str, Any], note: str) -> None:
    comparison["note"] = f"{comparison['note']}; {note}" if comparison.get("note") else note


def _compare(pair: _Pair, metric: str, test: str, terms: tuple[_Terms, _Terms],
             settings: ComparisonSettings) -> dict[str, Any]:
    """The comparison's dict with value, baseline_value, delta, and the McNemar test and p; the interval
    (and the bootstrap p) filled in later. `terms` are the metric's per-case terms, persona then baseline."""
    persona, baseline = pair.persona, pair.baseline
    persona_terms, baseline_terms = terms
    result: dict[str, Any] = {
        **pair.labels, "metric": metric, "value": None, "baseline_value": None, "delta": None,
        "ci_low": None, "ci_high": None, "confidence_level": settings.confidence_level,
        "interval_method": INTERVAL_METHOD, "n_resamples": 0, "pvalue": None, "pvalue_adjusted": None,
        "significant": None, "test": test, "statistic": None, "n": len(persona.reference),
        "standard_error": None, "mde": None, "mde_level": None, "mde_power": DEFAULT_POWER, "family_size": None,
        "note": None,
    }
    value, baseline_value = persona_terms.value(), baseline_terms.value()
    if test == MCNEMAR_TEST:
        if not (isinstance(persona_terms, metrics.RatioTerms) and isinstance(baseline_terms, metrics.RatioTerms)):
            raise AssertionError(f"McNemar needs a per-case outcome, which {metric} does not have")
        # The cases the metric counts, the same under both conditions: every case for accuracy, those with
        # both labels under both conditions for consistency.
        paired = persona_terms.denominator > 0
        what = "correct" if metric == "accuracy" else "consistent"
        result["n"] = int(paired.sum())
        if metric == "consistency_rate" and not paired.any():
            missing = [o.condition.persona for o in (persona, baseline) if all(label is None for label in o.logit)]
            result["note"] = (_NO_PROBS.format(who=" and ".join(missing)) if missing else
                              _UNDEFINED.format(why="no case has a generated and a logit label under both"))
            return result
        # A case's outcome holds where it adds to the metric's numerator: a correct or a consistent answer.
        test_result = stats.mcnemar(persona_terms.numerator[paired] > 0, baseline_terms.numerator[paired] > 0)
        result.update(value=_value(value), baseline_value=_value(baseline_value),
                      statistic=test_result.statistic, pvalue=test_result.pvalue, test=test_result.method,
                      persona_only=test_result.n10, baseline_only=test_result.n01,
                      outcome=what)
    else:
        result.update(value=_value(value), baseline_value=_value(baseline_value))
        notes = []
        for side, number in ((persona, value), (baseline, baseline_value)):
            if math.isnan(number):
                if metric == "expected_calibration_error" and all(p is None for p in side.probs):
                    notes.append(f"{side.condition.persona}: {_NO_PROBS.format(who=side.condition.persona)}")
                else:
                    notes.append(f"{side.condition.persona}: "
                                 + _UNDEFINED.format(why="no parsable answer" if metric != "expected_calibration_error"
                                                     else "no case with label probabilities"))
        if notes:
            result["note"] = "; ".join(notes)
    if result["value"] is not None and result["baseline_value"] is not None:
        result["delta"] = result["value"] - result["baseline_value"]
    return result


# --- Holm within families ------------------------------------------------------------------------------

def family_of(comparison: Mapping[str, Any]) -> tuple[Any, ...]:
    """The Holm family of a comparison: (model, task, stratum, metric, baseline)."""
    return tuple(comparison[key] for key in FAMILY_KEYS)


def adjust_pvalues(comparisons: Sequence[dict[str, Any]], *, alpha: float = ALPHA) -> None:
    """Fill in ``pvalue_adjusted`` (Holm, within each family of :func:`family_of`) and ``significant``
    (adjusted p < alpha) in place, and the minimum detectable effect (``mde``, ``mde_level``,
    ``mde_power``, ``family_size``: see the module docstring) of each comparison of a compared metric. A
    comparison without a p-value is left out of its family's count and keeps None for all of them."""
    families: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for comparison in comparisons:
        families.setdefault(family_of(comparison), []).append(comparison)
    for members in families.values():
        raw = [math.nan if c["pvalue"] is None else float(c["pvalue"]) for c in members]
        tested = sum(1 for p in raw if not math.isnan(p))
        for comparison, adjusted in zip(members, stats.holm(raw), strict=True):
            comparison["pvalue_adjusted"] = _value(adjusted)
            comparison["significant"] = None if math.isnan(adjusted) else bool(adjusted < alpha)
            if not math.isnan(adjusted):
                _add_mde(comparison, level=alpha / tested, family_size=tested)


def _add_mde(comparison: dict[str, Any], *, level: float, family_size: int) -> None:
    """The comparison's minimum detectable effect at `level` (see the module docstring), in its metric's
    units; None with a note where no difference is detectable."""
    metric = comparison.get("metric")
    test = TEST_FAMILIES.get(str(metric))
    n = comparison.get("n")
    if test is None or not isinstance(n, int):
        return
    comparison.update(mde_level=level, mde_power=DEFAULT_POWER, family_size=family_size)
    if test == MCNEMAR_TEST:
        discordant = int(comparison.get("persona_only") or 0) + int(comparison.get("baseline_only") or 0)
        # A share of the pairs; consistency_rate is a percentage: its upper bound is its scale.
        mde = mcnemar_mde(n, discordant / n, alpha=level) * metrics.METRICS[str(metric)].upper if n else math.nan
        why = f"no difference is detectable on {n} paired cases at the level {level:.3g}"
    elif comparison.get("standard_error") is None:
        mde, why = math.nan, "fewer than two bootstrap resamples define the difference"
    else:
        mde = normal_mde(float(comparison["standard_error"]), alpha=level,
                         n=n if metric in _CASE_SHARES else None, n_resamples=int(comparison["n_resamples"]))
        why = f"no difference is detectable on {n} paired cases at the level {level:.3g}"
    comparison["mde"] = _value(mde)
    note = f"minimum detectable effect: {why}"
    if comparison["mde"] is None and note not in str(comparison.get("note")):
        _add_note(comparison, note)


# --- within a run -----------------------------------------------------------------------------------------

def compare_personas(records: Iterable[Mapping[str, Any]], *, baselines: Sequence[str] = CONTROLS,
                     settings: ComparisonSettings | None = None) -> list[dict[str, Any]]:
    """Every persona against each control in `baselines` that ran, for each model x task x report
    stratum, on every compared metric of the task; Holm-adjusted within families.

    `records` are the lines of cases.jsonl (any order; tasks without compared metrics are ignored).
    Within a (model, task) every condition must hold the same cases as the control it is compared with:
    a case missing on either side is a DataError naming it. The bootstrap resamples a stratum's cases in
    the record order of the first control present (the same resampled cases for every comparison of the
    stratum). The order of the result is model, task, stratum, baseline, persona (record order), metric.
    """
    settings = settings or ComparisonSettings()
    conditions = _conditions(records)
    out: list[dict[str, Any]] = []
    models_tasks = list(dict.fromkeys((model, task) for model, task, _ in conditions))
    for model, task in models_tasks:
        metric_tests = compared_metrics(task)
        if not metric_tests:
            continue
        here = [c for (m, t, _), c in conditions.items() if (m, t) == (model, task)]
        controls = [c for name in baselines for c in here if c.persona == name]
        if not controls:
            continue
        for stratum in _spec(task).report_strata_of(row["stratum"] for c in here for row in c.rows.values()):
            pairs = []
            case_ids = controls[0].case_ids(stratum)
            if not case_ids:
                continue
            for control in controls:
                _check_same_cases(control, controls[0], stratum, persona_side="", baseline_side="")
                for condition in here:
                    if condition is control:
                        continue
                    _check_same_cases(condition, control, stratum, persona_side="", baseline_side="")
                    labels = {"model": model, "task": task, "stratum": stratum, "persona": condition.persona,
                              "persona_group": condition.persona_group, "baseline": control.persona}
                    pairs.append(_Pair(_Outcomes.of(condition, case_ids), _Outcomes.of(control, case_ids),
                                       labels))
            out.extend(_comparisons_of_stratum(case_ids, pairs, metric_tests, settings))
    adjust_pvalues(out, alpha=settings.alpha)
    return out


# --- against an approved baseline ---------------------------------------------------------------------------

def _model_pairs(candidate: Sequence[str], approved: Sequence[str]) -> list[tuple[str, str]]:
    if list(candidate) == list(approved) or set(candidate) == set(approved):
        return [(model, model) for model in candidate]
    if len(candidate) == 1 and len(approved) == 1:
        return [(candidate[0], approved[0])]
    raise DataError(f"cannot tell which model to compare with which: this run has {', '.join(candidate)} and "
                    f"the approved baseline has {', '.join(approved)}; compare one model with one model, or "
                    "runs of the same models")


def _dataset(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, tuple[str, str]]]:
    """{task: {case_id: (reference, stratum)}} of per-case records (first record of a case id wins)."""
    found: dict[str, dict[str, tuple[str, str]]] = {}
    for record in records:
        cases = found.setdefault(str(record["task"]), {})
        cases.setdefault(str(record["case_id"]), (str(record["reference"]), str(record["stratum"])))
    return found


def check_same_dataset(candidate: Iterable[Mapping[str, Any]], approved: Iterable[Mapping[str, Any]], *,
                       tasks: Iterable[str] | None = None) -> None:
    """The same case ids, with the same reference label and stratum, on both sides for each task of
    `tasks` (default: the candidate's tasks), or a DataError naming the ids that differ: a changed dataset
    is never compared in part. Records need task, case_id, reference and stratum."""
    mine_all, theirs_all = _dataset(candidate), _dataset(approved)
    for task in (list(tasks) if tasks is not None else list(mine_all)):
        mine, theirs = mine_all.get(task, {}), theirs_all.get(task)
        if theirs is None:
            continue
        only_approved = [case_id for case_id in theirs if case_id not in mine]
        only_candidate = [case_id for case_id in mine if case_id not in theirs]
        relabelled = [f"{case_id!r} ({theirs[case_id][0]} in the approved baseline, {mine[case_id][0]} in "
                      "this run)" for case_id in theirs if case_id in mine and theirs[case_id][0] != mine[case_id][0]]
        moved = [f"{case_id!r} ({theirs[case_id][1]} in the approved baseline, {mine[case_id][1]} in this run)"
                 for case_id in theirs if case_id in mine and theirs[case_id][1] != mine[case_id][1]]
        problems = []
        if only_approved:
            problems.append(f"{len(only_approved)} case id(s) only in the approved baseline: "
                            f"{_ids(only_approved)}")
        if only_candidate:
            problems.append(f"{len(only_candidate)} case id(s) only in this run: {_ids(only_candidate)}")
        if relabelled:
            problems.append(f"{len(relabelled)} case(s) with a different reference label: "
                            f"{', '.join(relabelled[:10])}" + (" ..." if len(relabelled) > 10 else ""))
        if moved:
            problems.append(f"{len(moved)} case(s) in a different stratum: {', '.join(moved[:10])}"
                            + (" ..." if len(moved) > 10 else ""))
        if problems:
            raise DataError(f"the approved baseline and this run do not hold the same {task} cases (a changed "
                            "dataset, or a different --pe-limit?): " + "; ".join(problems) + ". Compare runs "
                            "of the same cases, or save a new approved baseline")


def compare_to_approved(candidate: Iterable[Mapping[str, Any]], approved: Iterable[Mapping[str, Any]], *,
                        settings: ComparisonSettings | None = None) -> dict[str, Any]:
    """The candidate's per-case results against an approved run's, persona by persona, case by case.

    Conditions are matched on task and persona (and case_id within them); the model names may differ
    when each side holds one model (a model swap), otherwise they must be the same. Each (task, persona,
    stratum, metric) gives one comparison with ``persona`` = the persona, ``baseline`` = "approved",
    ``model`` = the candidate's model and ``baseline_model`` = the approved one; the delta is candidate
    minus approved. Holm families are (model, task, stratum, metric, "approved").

    The two sides must hold the same case ids with the same reference labels (and strata), or a
    DataError names the ids that differ. Returns ``{"comparisons": [...], "skipped": [text, ...]}``,
    where `skipped` names the personas that only one side ran.
    """
    settings = settings or ComparisonSettings()
    mine = _conditions(candidate, side="this run: ")
    theirs = _conditions(approved, side="approved baseline: ")
    comparisons: list[dict[str, Any]] = []
    skipped: list[str] = []
    for task in dict.fromkeys(task for _, task, _ in mine):
        metric_tests = compared_metrics(task)
        if not metric_tests:
            continue
        candidate_models = list(dict.fromkeys(m for m, t, _ in mine if t == task))
        approved_models = list(dict.fromkeys(m for m, t, _ in theirs if t == task))
        if not approved_models:
            skipped.append(f"{task}: not in the approved baseline")
            continue
        check_same_dataset([row for c in mine.values() if c.task == task for row in c.rows.values()],
                           [row for c in theirs.values() if c.task == task for row in c.rows.values()],
                           tasks=[task])
        for model, approved_model in _model_pairs(candidate_models, approved_models):
            personas = [c for (m, t, _), c in mine.items() if (m, t) == (model, task)]
            references = {c.persona: c for (m, t, _), c in theirs.items() if (m, t) == (approved_model, task)}
            for persona in references:
                if all(c.persona != persona for c in personas):
                    skipped.append(f"{task} / {persona}: in the approved baseline but not run now")
            for stratum in _spec(task).report_strata_of(row["stratum"] for c in personas for row in c.rows.values()):
                pairs: list[_Pair] = []
                case_order: list[str] | None = None
                for condition in personas:
                    reference = references.get(condition.persona)
                    if reference is None:
                        if stratum == "all":
                            skipped.append(f"{task} / {condition.persona}: not in the approved baseline")
                        continue
                    case_ids = _check_same_cases(condition, reference, stratum, persona_side="this run's ",
                                                 baseline_side="the approved baseline's ")
                    if case_order is None:
                        case_order = case_ids
                    elif set(case_ids) != set(case_order):
                        # Guarded by check_same_dataset; kept as a clear error if conditions differ inside a side.
                        missing = sorted(set(case_order) ^ set(case_ids))
                        raise DataError(f"the approved baseline's conditions do not hold the same {task} cases "
                                        f"(stratum {stratum}): {_ids(missing)}")
                    if not case_ids:
                        continue
                    labels = {"model": model, "task": task, "stratum": stratum, "persona": condition.persona,
                              "persona_group": condition.persona_group, "baseline": APPROVED,
                              "baseline_model": approved_model}
                    pairs.append(_Pair(_Outcomes.of(condition, case_order), _Outcomes.of(reference, case_order),
                                       labels))
                if pairs and case_order:
                    comparisons.extend(_comparisons_of_stratum(case_order, pairs, metric_tests, settings))
    adjust_pvalues(comparisons, alpha=settings.alpha)
    return {"comparisons": comparisons, "skipped": skipped}
