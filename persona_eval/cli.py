"""`persona-eval` commands that are not test runs: prepare the embedded model, rebuild a report, compare runs,
plan the number of cases (``persona-eval power``).

``persona-eval compare RUN_A RUN_B`` compares run B (the candidate) with run A (the approved reference),
case by case, with the paired tests and the regression rules of the thresholds file, as
``pytest evals --pe-baseline RUN_A`` does at the end of a run. RUN_A and RUN_B are run folders (e.g.
reports/latest) or approved baseline files (``--pe-save-baseline``). It prints the verdict first and exits
1 when a ``fail`` regression rule is crossed, 0 otherwise, and 2 on bad input (a changed dataset
included).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from persona_eval.cache import default_cache_dir
from persona_eval.comparisons import DEFAULT_RESAMPLES
from persona_eval.errors import ConfigError, PersonaEvalError
from persona_eval.gate import POWER_METRICS
from persona_eval.registry import unknown_name_message
from persona_eval.review import ARGILLA_MIN_SUBMITTED, EXPORT_FORMATS, REVIEW_FILENAME

__all__ = ["main"]


def _prepare(args: argparse.Namespace) -> int:
    from persona_eval.backends.embedded import embedded_gguf_path, prepare_embedded_model

    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    print(f"embedded model: {embedded_gguf_path()}", file=sys.stderr)
    print("converting to safetensors once (about a minute on two cores) ...", file=sys.stderr)
    directory = prepare_embedded_model(cache_dir)
    print(directory)
    return 0


def _compare(args: argparse.Namespace) -> int:
    import json

    from persona_eval.comparisons import ComparisonSettings
    from persona_eval.gate import approved_comparison, load_results
    from persona_eval.report.terminal import render_baseline_comparison
    from persona_eval.results import write_json
    from persona_eval.thresholds import load_thresholds

    thresholds = load_thresholds(args.thresholds)
    settings = ComparisonSettings(n_resamples=args.resamples)
    approved = load_results(args.run_a)
    candidate = load_results(args.run_b)
    document = approved_comparison(candidate.records, approved, thresholds.regressions, settings=settings)
    document["candidate"] = {"source": str(candidate.source), "run_id": candidate.header.get("run_id"),
                             "models": candidate.header.get("models")}
    document["thresholds"] = {"path": str(thresholds.path), "fingerprint": thresholds.fingerprint}
    document["comparison_settings"] = settings.to_json()
    if args.json == "-":
        print(json.dumps(document, indent=2))
    else:
        for line in render_baseline_comparison(document, candidate=candidate.label):
            print(line)
        if args.json:
            write_json(Path(args.json), document)
    return 0 if document["verdict"]["passed"] else 1


_POWER_HELP = """\
How many cases per stratum a study needs for a comparison of METRIC to detect a worsening of
DIFFERENCE (in the metric's units: a share of cases, 0.10 = one case in ten) with the given power, by
the exact power of the McNemar test the suite runs (exact binomial below 25 discordant pairs,
continuity-corrected chi-square from 25) at the level alpha / COMPARISONS (Holm's first step over a
family of that many personas compared with one control).

The answer depends on the discordance: the share of cases whose outcome (right or wrong for accuracy;
under-triaged or not for under_triage_rate, ...) differs between the persona and the control. It is at
least the difference. Give it with --discordance (one or more values), read it from a run with --run, or
leave it out for a table of assumed values (the difference times 1, 1.5, 2 and 3).

With --run, accuracy's discordance is read from each comparison's discordant pairs (persona_only +
baseline_only over n, in summary.json). The rates (under_triage_rate, over_triage_rate, risk_propensity)
are compared by the paired bootstrap, which keeps no discordant pairs: their discordance is the one its
standard error implies for a share of paired binary outcomes, n * SE^2 + delta^2 (approximate when some
answers were unreadable). The verdict uses the largest discordance seen, the most demanding.
"""


def _share_option(value: str, option: str, *, zero: bool = False, one: bool = True) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{option} must be a number, got {value!r}") from None
    if not ((number >= 0 if zero else number > 0) and (number <= 1 if one else number < 1)):
        bounds = f"{'[' if zero else '('}0, 1{']' if one else ')'}"
        raise ConfigError(f"{option} must be a number in {bounds}, got {value}")
    return number


def _percent(share: float) -> str:
    return f"{100 * share:.3g}%"


def _run_discordances(run_dir: Path, metric: str) -> tuple[list[tuple[float, str]], int | None]:
    """(discordance, which comparison) of every comparison of `metric` in a run's summary.json, and the
    largest Holm family seen."""
    from persona_eval.power import implied_discordance

    path = run_dir / "summary.json"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"--run {run_dir}: cannot read summary.json ({exc.strerror}); give a run folder such as "
                          "reports/latest") from None
    except ValueError:
        raise ConfigError(f"--run {run_dir}: summary.json is not valid JSON") from None
    found: list[tuple[float, str]] = []
    sizes: list[int] = []
    comparisons = document.get("comparisons") if isinstance(document, dict) else None
    for comparison in comparisons or []:
        if not isinstance(comparison, dict) or comparison.get("metric") != metric:
            continue
        n = comparison.get("n")
        if not isinstance(n, int) or n <= 0 or comparison.get("delta") is None:
            continue
        how = ""
        if comparison.get("persona_only") is not None and comparison.get("baseline_only") is not None:
            discordance = (comparison["persona_only"] + comparison["baseline_only"]) / n
        elif comparison.get("standard_error") is not None:
            discordance = implied_discordance(comparison["standard_error"], n, difference=comparison["delta"])
            how = ", as its bootstrap standard error implies"
        else:
            continue
        if isinstance(comparison.get("family_size"), int):
            sizes.append(comparison["family_size"])
        found.append((discordance, f"{comparison.get('persona')} vs {comparison.get('baseline')}, "
                                   f"{comparison.get('stratum')}, n={n}{how}"))
    if not found:
        raise ConfigError(f"--run {run_dir}: summary.json holds no comparison of {metric} to read a discordance "
                          "from (did the run compare personas with a control?)")
    return found, max(sizes) if sizes else None


def _power(args: argparse.Namespace) -> int:
    from persona_eval.metrics import METRICS
    from persona_eval.personas import STUDY_PERSONAS
    from persona_eval.power import MAX_CASES, cases_needed
    from persona_eval.thresholds import metric_label

    if args.metric is None or args.difference is None:
        missing = "--metric" if args.metric is None else "--difference"
        raise ConfigError(f"{missing} is required: persona-eval power --metric {{{','.join(POWER_METRICS)}}} "
                          "--difference D")
    if args.metric not in POWER_METRICS:
        raise ConfigError(f"--metric: {unknown_name_message('metric', args.metric, POWER_METRICS)}")
    difference = _share_option(args.difference, "--difference")
    alpha = _share_option(args.alpha, "--alpha", one=False)
    power = _share_option(args.power, "--power", one=False)
    if args.run and args.discordance:
        raise ConfigError("--run reads the discordance from a run: give --run or --discordance, not both")
    observed: list[tuple[float, str]] = []
    run_size = None
    if args.run:
        observed, run_size = _run_discordances(Path(args.run), args.metric)
    if args.comparisons is not None:
        if not args.comparisons.isdigit() or int(args.comparisons) < 1:
            raise ConfigError(f"--comparisons must be a whole number >= 1, got {args.comparisons!r}")
        comparisons = int(args.comparisons)
    else:
        comparisons = run_size or len(STUDY_PERSONAS) - 1
    level = alpha / comparisons
    given = [_share_option(value, "--discordance") for value in args.discordance or []]
    for value in given:
        if value < difference:
            raise ConfigError(f"--discordance {value:g} is smaller than --difference {difference:g}: a difference "
                              f"of {difference:g} needs at least {_percent(difference)} of the cases to change")

    def needed(discordance: float) -> str:
        n = cases_needed(difference, discordance=discordance, alpha=level, power=power)
        return f"{n}" if n is not None else f"more than {MAX_CASES:,}"

    better = METRICS[args.metric].higher_is_better
    change = "drop" if better else "rise" if better is False else "change"
    at = f"alpha {alpha:g}/{comparisons}" if comparisons > 1 else f"alpha {alpha:g}"
    shown = f"{difference:.2f}" if round(difference, 2) == difference else f"{difference:g}"
    head = f"To detect a {shown} {change} in {metric_label(args.metric)} with {power * 100:.3g}% power at {at}"
    lines: list[str] = []
    if observed:
        largest, which = max(observed)
        discordances = sorted(value for value, _ in observed)
        median = discordances[len(discordances) // 2]
        floor = f", raised to the difference {_percent(difference)}" if largest < difference else ""
        lines.append(f"{head}: {needed(max(largest, difference))} cases per stratum (at the largest discordance "
                     f"in {args.run}: {_percent(largest)} of cases changed, {which}{floor}).")
        lines.append(f"{len(observed)} comparisons of {args.metric} in the run: discordance median {_percent(median)}, "
                     f"which needs {needed(max(median, difference))} cases per stratum; largest {_percent(largest)}.")
    elif len(given) == 1:
        lines.append(f"{head}: {needed(given[0])} cases per stratum (assuming {_percent(given[0])} of cases change "
                     "between the two conditions).")
    else:
        assumed = not given
        values = given or sorted({min(1.0, factor * difference) for factor in (1.0, 1.5, 2.0, 3.0)})
        counts = [needed(value) for value in values]
        lines.append(f"{head}: {counts[0]} to {counts[-1]} cases per stratum, depending on the share of cases that "
                     "change between the two conditions" + (" (assumed: give --discordance or --run)." if assumed
                                                            else "."))
        lines.append(f"  {'cases that change':>17}  {'cases per stratum':>17}")
        lines.extend(f"  {_percent(value):>17}  {count:>17}" for value, count in zip(values, counts, strict=True))
        if assumed:
            lines.append("The share of cases that change (the discordance) is assumed here, not measured: it is at "
                         "least the difference, and more when the persona also changes answers both ways.")
    test = ("McNemar's test as the suite runs it" if args.metric == "accuracy" else
            f"McNemar's test of the per-case outcome (the suite tests {metric_label(args.metric)} with the paired "
            "bootstrap, whose power on such paired outcomes is close)")
    lines.append(f"{test}, exact power, at the level {level:.4g} (Holm's first step over {comparisons} "
                 f"comparison{'s' if comparisons != 1 else ''}).")
    for line in lines:
        print(line)
    return 0


def _report(args: argparse.Namespace) -> int:
    from persona_eval.report.html import write_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "summary.json").exists():
        raise PersonaEvalError(f"{run_dir}: no summary.json here; give a run folder such as reports/latest")
    print(write_report(run_dir))
    return 0


def _review_export(args: argparse.Namespace) -> int:
    from persona_eval.review import check_argilla_client, create_argilla_dataset, export_review

    if args.argilla_url:
        if args.format != "argilla":
            raise ConfigError("--argilla-url creates the Argilla dataset: give it with --format argilla")
        check_argilla_client()  # before anything is written: a missing extra or key is all that happens
    paths = export_review(args.run_dir, args.out, per_side=args.per_side, seed=args.seed, format=args.format,
                          dataset_name=args.argilla_dataset, min_submitted=args.argilla_min_submitted)
    manifest = json.loads(Path(paths["manifest"]).read_text(encoding="utf-8"))
    for note in manifest.get("notes") or []:
        print(f"note: {note}", file=sys.stderr)
    for name, path in paths.items():
        print(f"{name}: {path}")
    if args.argilla_url:
        dataset = create_argilla_dataset(paths["argilla_dir"], api_url=args.argilla_url,
                                         workspace=args.argilla_workspace)
        print(f"argilla dataset: {dataset.name} created at {args.argilla_url} with {manifest['n_pairs']} records")
    return 0


def _review_import(args: argparse.Namespace) -> int:
    from persona_eval.report.html import write_report
    from persona_eval.review import import_review

    result = import_review(args.run_dir, args.files)
    for status, count in (result.get("skipped_responses") or {}).items():
        print(f"note: {count} {status} Argilla response(s) left out", file=sys.stderr)
    preference = result.get("preference", {}).get("all", {}).get("all", {})
    print(f"clinician review: {preference.get('n', 0)} annotations read; results in "
          f"{Path(args.run_dir) / REVIEW_FILENAME}")
    if (Path(args.run_dir) / "summary.json").exists():
        print(f"report updated: {write_report(Path(args.run_dir))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persona-eval", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="convert the embedded model once; prints its directory last")
    prepare.add_argument("--cache-dir", help="default: $PERSONA_EVAL_CACHE_DIR or ~/.cache/persona-eval")
    prepare.set_defaults(handler=_prepare)
    compare = commands.add_parser(
        "compare", help="compare run B (candidate) with run A (approved), case by case; exit 1 on a regression",
        description="Compare RUN_B (the candidate) with RUN_A (the approved reference) case by case: the paired "
                    "tests of every persona, metric and stratum, and the regression rules of the thresholds "
                    "file. Exit status: 1 when a fail rule is crossed, 0 otherwise, 2 on bad input.")
    compare.add_argument("run_a", metavar="RUN_A", help="the approved run: a run folder or a baseline file")
    compare.add_argument("run_b", metavar="RUN_B", help="the candidate run: a run folder or a baseline file")
    compare.add_argument("--thresholds", metavar="PATH", help="thresholds YAML (default: the bundled one)")
    compare.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, metavar="N",
                         help=f"bootstrap resamples (default {DEFAULT_RESAMPLES})")
    compare.add_argument("--json", metavar="PATH",
                         help="also write the comparison as JSON to PATH ('-': print only the JSON)")
    compare.set_defaults(handler=_compare)
    power = commands.add_parser(
        "power", help="how many cases per stratum a comparison needs to detect a given worsening",
        description=_POWER_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    power.add_argument("--metric", metavar="METRIC",
                       help=f"the compared metric, a share of cases: {', '.join(POWER_METRICS)} (required)")
    power.add_argument("--difference", metavar="D",
                       help="the worsening to detect, a share of cases (e.g. 0.10; a rule's tolerance) (required)")
    power.add_argument("--discordance", nargs="+", metavar="P",
                       help="the share(s) of cases whose outcome differs between the persona and the control "
                            "(at least D); default: a table of assumed values")
    power.add_argument("--comparisons", metavar="M",
                       help="personas compared with one control (the Holm family; default: the run's with --run, "
                            "else the study's 5)")
    power.add_argument("--alpha", default="0.05", metavar="A", help="significance level before Holm (0.05)")
    power.add_argument("--power", default="0.8", metavar="P", help="the power wanted (0.8)")
    power.add_argument("--run", metavar="DIR", help="read the discordance from this run folder's summary.json")
    power.set_defaults(handler=_power)
    report = commands.add_parser("report", help="rebuild a run's report.html from its files (no model is called)")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run folder, e.g. reports/latest")
    report.set_defaults(handler=_report)

    review = commands.add_parser("review", help="the clinician review round trip of the judges' consensus cases")
    review_commands = review.add_subparsers(dest="review_command", required=True)
    export = review_commands.add_parser(
        "export", help="write blinded pairs (CSV and JSONL), a separate key and the guideline text")
    export.add_argument("run_dir", metavar="RUN_DIR", help="a run folder with judgments.jsonl")
    export.add_argument("--out", metavar="DIR", help="where to write (default: RUN_DIR/review)")
    export.add_argument("--per-side", type=int, default=25, metavar="N",
                        help="consensus cases per side (medical / non-medical preferred) and task (25)")
    export.add_argument("--seed", type=int, default=0, help="seed of the sampling and the side order (0)")
    export.add_argument("--format", choices=EXPORT_FORMATS, default="suite",
                        help="suite: pairs as CSV and JSONL to fill in (default); argilla: an Argilla dataset "
                             "folder (settings and records, as rg.Dataset.from_disk reads it)")
    export.add_argument("--argilla-url", metavar="URL",
                        help="also create the dataset on this Argilla server (needs the argilla extra and the "
                             "API key in $ARGILLA_API_KEY)")
    export.add_argument("--argilla-workspace", metavar="NAME", help="Argilla workspace (default: the server's)")
    export.add_argument("--argilla-dataset", metavar="NAME",
                        help="Argilla dataset name (default: persona-eval-review-<run folder name>)")
    export.add_argument("--argilla-min-submitted", type=int, default=ARGILLA_MIN_SUBMITTED, metavar="N",
                        help=f"annotators per record in Argilla (default {ARGILLA_MIN_SUBMITTED}: two make a kappa)")
    export.set_defaults(handler=_review_export)
    importer = review_commands.add_parser(
        "import", help=f"read filled annotation files; write {REVIEW_FILENAME} and update the report")
    importer.add_argument("run_dir", metavar="RUN_DIR")
    importer.add_argument("files", metavar="FILES", nargs="+",
                          help="filled pairs (CSV or JSONL) or Argilla exports (records.to_json .json or its "
                               "to_disk folder, to_list(flatten=True) as .json, the Hugging Face export as .jsonl)")
    importer.set_defaults(handler=_review_import)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except PersonaEvalError as exc:
        print(f"persona-eval: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
