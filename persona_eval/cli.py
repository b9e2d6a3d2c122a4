"""`persona-eval` commands that are not test runs: prepare the embedded model, rebuild a report, compare runs.

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
