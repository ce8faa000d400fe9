"""The `deqbench` command line.

Exit codes: 0 done (cases may be oom); 1 a check found a regression; 2 bad input, reported as one
line saying what and how to fix it, before anything runs or is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_OK, EXIT_REGRESSION, EXIT_BAD_INPUT = 0, 1, 2
DEFAULT_PRESET = "quick"
# Modules that add their own subcommands: each has `register(subparsers)` adding a parser whose
# defaults set `func(args) -> exit code` (raising BadInput for bad input).
COMMAND_MODULES: list[str] = ["bench.check", "bench.plots", "bench.report", "bench.train"]


class BadInput(Exception):
    """A user error: reported as one line, exit code 2, before anything runs or is written."""


# -- argument checks ------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """'2GB', '512MiB', '1.5G', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not m:
        raise BadInput(f"bad size {text!r}; use bytes or a unit, e.g. 2GB, 512MiB")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    scale = (1024 if binary else 1000) ** " KMGT".index(unit or " ")
    if value * scale <= 0:
        raise BadInput(f"size must be positive, got {text!r}")
    return int(value * scale)


def load_matrix_arg(args: argparse.Namespace):
    from bench.spec import SpecError, load_matrix, load_preset

    if args.preset and args.matrix:
        raise BadInput("give --preset or --matrix, not both")
    try:
        return load_matrix(args.matrix) if args.matrix else load_preset(args.preset or DEFAULT_PRESET)
    except SpecError as err:
        raise BadInput(str(err)) from None
    except ValueError as err:  # a model registry error raised while expanding
        raise BadInput(str(err)) from None


def resolve_device_arg(requested: str) -> str:
    from bench.env import resolve_device

    try:
        return resolve_device(requested)
    except ValueError as err:
        raise BadInput(str(err)) from None


def check_instruments(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    from bench.measure import list_instruments

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for n in names:
        if n not in list_instruments():
            raise BadInput(f"unknown instrument {n!r}; valid: {', '.join(list_instruments())}")
    return names


def check_writable_dir(path: Path) -> None:
    """The directory exists and is writable, or can be created; nothing is created here."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise BadInput(f"output path {path} is not a directory ({probe} is a file)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BadInput(f"output directory {path} is not writable ({probe}); choose another --out")


def out_dir_arg(args: argparse.Namespace, suffix: str = "") -> Path:
    from bench.results import RESULTS
    from bench.runner import default_out_dir

    if args.resume:
        out = Path(args.out) if args.out else Path("results/latest")
        if not (out / RESULTS).exists():
            raise BadInput(f"nothing to resume: {out / RESULTS} does not exist; start a run without --resume")
    else:
        out = Path(args.out) if args.out else default_out_dir()
        if suffix and not args.out:
            out = out.with_name(out.name + suffix)
        if (out / RESULTS).exists():
            raise BadInput(f"{out} already holds {RESULTS}; use --resume to finish it or choose another --out")
    check_writable_dir(out)
    return out


# -- commands -------------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    from bench.measure import list_instruments
    from bench.spec import list_presets, load_preset
    from models import BACKWARDS, SOLVERS, list_models, model_spec

    models = {
        name: {"family": model_spec(name).family, "variant": model_spec(name).variant,
               "sizes": list(model_spec(name).sizes), "description": model_spec(name).description}
        for name in list_models()
    }
    presets = {}
    for name in list_presets():
        m = load_preset(name)
        presets[name] = {"description": m.description, "cases": len(m.cases)}
    listing = {"models": models, "presets": presets, "solvers": sorted(SOLVERS),
               "backwards": sorted(BACKWARDS), "instruments": list_instruments()}
    if args.json:
        print(json.dumps(listing, indent=2))
        return EXIT_OK
    print("models:")
    for name, info in models.items():
        print(f"  {name:<18} {info['family']:<12} {info['variant']:<7} sizes: {', '.join(info['sizes'])}")
    print("presets:")
    for name, info in presets.items():
        default = " (default)" if name == DEFAULT_PRESET else ""
        print(f"  {name:<14} {info['cases']:>4} cases{default}  {info['description']}")
    print(f"solvers:     {', '.join(listing['solvers'])}")
    print(f"backwards:   {', '.join(listing['backwards'])}")
    print(f"instruments: {', '.join(listing['instruments'])}")
    return EXIT_OK


def cmd_env(args: argparse.Namespace) -> int:
    from bench.env import capture

    device = resolve_device_arg(args.device)
    print(json.dumps(capture(device), indent=2, default=str))
    return EXIT_OK


def _run(args: argparse.Namespace, *, predict: bool) -> int:
    from bench import analysis
    from bench.results import read_results
    from bench.runner import RunOptions, link_latest, run_matrix, select_cases

    matrix = load_matrix_arg(args)
    device = "cpu" if predict else resolve_device_arg(args.device)
    instruments = ("predicted",) if predict else check_instruments(args.instruments)
    memory_limit = None if predict or args.memory_limit is None else parse_size(args.memory_limit)
    if memory_limit is not None and device != "cpu":
        raise BadInput("--memory-limit applies to CPU runs only (it limits the worker's address space)")
    if args.threads is not None:
        if args.threads < 1:
            raise BadInput(f"--threads must be >= 1, got {args.threads}")
        matrix = dataclasses.replace(
            matrix, settings=dataclasses.replace(matrix.settings, threads=args.threads))
    if args.only and not select_cases(matrix.cases, args.only):
        raise BadInput(f"--only {args.only!r} matches no case of {matrix.name}; "
                       f"`deqbench list` shows presets, case ids look like {matrix.cases[0].case_id}")
    out = out_dir_arg(args, suffix="-predict" if predict else "")
    for note in matrix.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"{'predicting' if predict else 'running'} {matrix.name}: {len(matrix.cases)} cases on "
          f"{device} -> {out}", file=sys.stderr)
    options = RunOptions(device=device, memory_limit=memory_limit, instruments=instruments,
                         progress=not args.no_progress)
    run_matrix(matrix, out, options, resume=args.resume, only=args.only,
               argv=["deqbench", *sys.argv[1:]])
    if not args.out and not args.resume:
        link_latest(out)
    df = read_results(out)
    for line in analysis.summary_lines(df):
        print(line)
    paper = analysis.paper_lines(df)
    if paper:
        print()
        for line in paper:
            print(line)
    failed = df[~df["status"].isin(["ok"])]
    if not failed.empty:
        print(f"\n{len(failed)} case(s) not ok:")
        for r in failed.itertuples():
            print(f"  {r.status:<9}{r.case_id}  {r.error or ''}")
    _outputs(out)
    print(f"\nresults: {out}")
    return EXIT_OK


def _outputs(out: Path) -> None:
    """Figures and report, where those modules exist (they are views of results.csv)."""
    try:
        from bench import plots, report
    except ImportError:
        return
    plots.plot_run(out)
    report.write_report(out)


def cmd_run(args: argparse.Namespace) -> int:
    return _run(args, predict=False)


def cmd_predict(args: argparse.Namespace) -> int:
    return _run(args, predict=True)


# -- parser ---------------------------------------------------------------------------------------
def _matrix_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"a preset from bench/presets (default {DEFAULT_PRESET})")
    p.add_argument("--matrix", help="a matrix TOML file")
    p.add_argument("--out", help="run directory (default results/runs/<timestamp>)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run in --out (default results/latest)")
    p.add_argument("--only", help="run only cases whose id contains or glob-matches these comma-separated patterns")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, help="torch threads per case (default: the preset's, else all cores)")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit 2) like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="deqbench", description="Memory and compute benchmarks "
                     "for Deep Equilibrium Models against matched explicit networks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("list", help="models, sizes, presets, solvers, instruments")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("run", help="run a benchmark matrix (default preset: quick)")
    _matrix_args(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--memory-limit", help="CPU only: address space each case may add, e.g. 2GB; "
                   "a case over it becomes an oom row")
    p.add_argument("--instruments", help="comma-separated subset of instruments (default: all the device allows)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("predict", help="peak memory of a matrix without allocating (fake tensors)")
    _matrix_args(p)
    p.set_defaults(func=cmd_predict, device="cpu", memory_limit=None, instruments=None)

    p = sub.add_parser("env", help="the environment a run would record")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_env)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BadInput as err:
        print(f"deqbench: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
