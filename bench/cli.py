"""The `deqbench` command line. Bad input exits 2 with one line saying what and how to fix it."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

EXIT_OK, EXIT_REGRESSION, EXIT_BAD_INPUT = 0, 1, 2


class BadInput(Exception):
    """A user error: reported as one line, exit code 2, before anything runs or is written."""


def cmd_list(args: argparse.Namespace) -> int:
    from models import BACKWARDS, SOLVERS, list_models, model_spec

    models = {
        name: {"family": model_spec(name).family, "variant": model_spec(name).variant,
               "sizes": list(model_spec(name).sizes)}
        for name in list_models()
    }
    listing = {"models": models, "solvers": sorted(SOLVERS), "backwards": sorted(BACKWARDS)}
    if args.json:
        print(json.dumps(listing, indent=2))
        return EXIT_OK
    print("models:")
    for name, info in models.items():
        print(f"  {name:<20} {info['family']:<12} {info['variant']:<7} sizes: {', '.join(info['sizes'])}")
    print(f"solvers:   {', '.join(listing['solvers'])}")
    print(f"backwards: {', '.join(listing['backwards'])}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deqbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="models, sizes, presets, solvers")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BadInput as err:
        print(f"deqbench: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
