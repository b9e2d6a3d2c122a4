"""`persona-eval` commands that are not test runs: prepare the embedded model, and more to come."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from persona_eval.cache import default_cache_dir
from persona_eval.errors import PersonaEvalError

__all__ = ["main"]


def _prepare(args: argparse.Namespace) -> int:
    from persona_eval.backends.embedded import embedded_gguf_path, prepare_embedded_model

    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    print(f"embedded model: {embedded_gguf_path()}", file=sys.stderr)
    print("converting to safetensors once (about a minute on two cores) ...", file=sys.stderr)
    directory = prepare_embedded_model(cache_dir)
    print(directory)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persona-eval", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="convert the embedded model once; prints its directory last")
    prepare.add_argument("--cache-dir", help="default: $PERSONA_EVAL_CACHE_DIR or ~/.cache/persona-eval")
    prepare.set_defaults(handler=_prepare)
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
