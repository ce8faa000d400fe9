"""The `deqbench` command line: the one module that parses arguments.

Exit codes: 0 done (cases may be oom); 1 a check found a regression; 2 bad input, reported as one
line saying what and how to fix it, before anything runs or is written. Library modules raise
`bench.errors.UserError` (or a ValueError from a registry) and never import this module; nothing
heavy (torch, pandas, matplotlib) is imported before a subcommand needs it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.arguments import BadInput, parse_override, parse_size, parse_tolerance, user_errors
from bench.errors import RunDirError, UserError, os_error

if TYPE_CHECKING:
    from bench.plots.pool import FigurePool

EXIT_OK, EXIT_REGRESSION, EXIT_BAD_INPUT = 0, 1, 2
DEFAULT_PRESET = "default"
SVG_HELP = "also write the figures as SVG (vector, searchable text; as long again as the PNGs)"


def load_matrix_arg(args: argparse.Namespace):
    from bench.spec import load_matrix, load_preset

    if args.preset and args.matrix:
        raise BadInput("give --preset or --matrix, not both")
    with user_errors():
        return load_matrix(args.matrix) if args.matrix else load_preset(args.preset or DEFAULT_PRESET)


def resolve_device_arg(requested: str) -> str:
    from bench.env import resolve_device

    with user_errors():
        return resolve_device(requested)


def check_writable_dir(path: Path) -> None:
    """The directory exists and is writable, or can be created; nothing is created here."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise RunDirError(f"output path {path} is not a directory ({probe} is a file)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunDirError(f"output directory {path} is not writable ({probe}); choose another --out")


def check_run_dir(text: str) -> Path:
    from bench.results import RESULTS

    run_dir = Path(text)
    if not (run_dir / RESULTS).is_file():
        raise RunDirError(f"{run_dir / RESULTS} does not exist; give a run directory written by "
                          "`deqbench run` or `deqbench predict`")
    return run_dir


def out_dir_arg(args: argparse.Namespace, suffix: str = "") -> Path:
    from bench.results import RESULTS
    from bench.rundir import holds_run
    from bench.runner import default_out_dir

    if args.retry_failed and not args.resume:
        raise BadInput("--retry-failed re-runs the failed cases of a run: use it with --resume")
    if args.resume:
        out = Path(args.out) if args.out else Path("results/latest")
        if not holds_run(out):
            raise RunDirError(f"nothing to resume: {out} holds no run (no env.json or "
                              f"{RESULTS}); start a run without --resume")
    else:
        out = Path(args.out) if args.out else default_out_dir()
        if suffix and not args.out:
            out = out.with_name(out.name + suffix)
        if (out / RESULTS).exists():
            raise RunDirError(f"{out} already holds {RESULTS}; use --resume to finish it or choose another --out")
    check_writable_dir(out)
    return out


# -- commands -------------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    from bench.spec import catalog

    listing = catalog()
    models, presets = listing["models"], listing["presets"]
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
    print("launchers:")
    for name, text in listing["launchers"].items():
        print(f"  {name:<8} {text}")
    return EXIT_OK


def cmd_env(args: argparse.Namespace) -> int:
    from bench.env import capture

    device = resolve_device_arg(args.device)
    print(json.dumps(capture(device), indent=2, default=str))
    return EXIT_OK


def _run(args: argparse.Namespace, *, predict: bool) -> int:
    from bench import analysis
    from bench.plots.pool import FigurePool
    from bench.report import terminal_lines
    from bench.runner import RunOptions, interrupted_line, link_latest, run_matrix, select_cases
    from bench.spec import instrument_list

    matrix = load_matrix_arg(args)
    from bench.launchers import LAUNCHER_KEYS, launcher_config, launcher_device

    with user_errors():  # the matrix's [launcher] table, the command line's options over it
        launcher = launcher_config(matrix.launcher, f"{matrix.source or matrix.name} [launcher]",
                                   **{k: getattr(args, "launcher" if k == "name" else k) for k in LAUNCHER_KEYS})
        device = "cpu" if predict else launcher_device(args.device, launcher)
    instruments = ("predicted",) if predict else instrument_list(args.instruments, device, matrix.settings)
    memory_limit = None if predict or args.memory_limit is None else parse_size(args.memory_limit)
    if memory_limit is not None and device != "cpu":
        raise BadInput("--memory-limit applies to CPU runs only (it limits the worker's address space)")
    if args.threads is not None:  # RunSettings checks the value
        matrix = dataclasses.replace(
            matrix, settings=dataclasses.replace(matrix.settings, threads=args.threads))
    if args.only and not select_cases(matrix.cases, args.only):
        raise BadInput(f"--only {args.only!r} matches no case of {matrix.name}; "
                       f"`deqbench list` shows presets, case ids look like {matrix.cases[0].case_id}")
    out = out_dir_arg(args, suffix="-predict" if predict else "")
    lines = [*(f"note: {note}" for note in matrix.notes), f"{'predicting' if predict else 'running'} "
             f"{matrix.name}: {len(matrix.cases)} cases on {device}{launcher.summary()} -> {out}"]
    options = RunOptions(device=device, memory_limit=memory_limit, instruments=instruments,
                         progress=not args.no_progress, launcher=launcher)
    with contextlib.ExitStack() as stack:
        pools: list[FigurePool] = []

        def started() -> None:  # the header once the folder is ours (not in use; the same run when resuming)
            print("\n".join(lines), file=sys.stderr)
            if not args.no_report:  # the figures' helpers import matplotlib while the workers start
                pools.append(stack.enter_context(FigurePool.start()))

        try:
            run_matrix(matrix, out, options, resume=args.resume, retry_failed=args.retry_failed,
                       only=args.only, argv=["deqbench", *sys.argv[1:]], on_start=started)
        except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: one line, the rows are kept
            print(f"deqbench: {interrupted_line(out, sys.argv[1:], bool(args.out))}", file=sys.stderr)
            return 128 + getattr(err, "signum", 2)
        if not args.out and not args.resume:
            link_latest(out)
        print("\n".join(terminal_lines(analysis.RunView.load(out))))
        if not args.no_report:
            _outputs(out, figure_formats(args), pools[0] if pools else None)
    print(f"\nresults: {out}" + ("" if args.no_report else f" (every pair, figures: {out / 'report.md'})"))
    return EXIT_OK


def figure_formats(args: argparse.Namespace) -> tuple[str, ...]:
    return ("png", "svg") if args.svg else ("png",)


def _outputs(out: Path, formats: tuple[str, ...] = ("png",), pool: FigurePool | None = None) -> None:
    from bench.report import write_outputs

    for line in write_outputs(out, formats, pool):
        print(f"warning: {line}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    return _run(args, predict=False)


def cmd_predict(args: argparse.Namespace) -> int:
    return _run(args, predict=True)


def cmd_plot(args: argparse.Namespace) -> int:
    from bench import plots

    run_dir = check_run_dir(args.run_dir)
    with plots.FigurePool.start() as pool:
        figures = plots.plot_run(run_dir, formats=figure_formats(args), pool=pool)
    for fig in figures.made:
        print(f"wrote {fig.files[0]}")
    for name, why in figures.skipped.items():
        print(f"skipped {name}: {why}")
    for note in figures.notes:
        print(f"note: {note}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from bench import plots, report

    run_dir = check_run_dir(args.run_dir)
    stale = args.svg or plots.load_index(run_dir) is None  # current figures are reused, not drawn
    with plots.FigurePool.start(None if stale else 0) as pool:
        path = report.write_report(run_dir, formats=figure_formats(args) if args.svg else None, pool=pool)
    print(f"wrote {path}")
    return EXIT_OK


def cmd_baseline(args: argparse.Namespace) -> int:
    from bench.check import load_baseline, make_baseline
    from bench.results import write_json

    run_dir = check_run_dir(args.run_dir)
    out = Path(args.output)
    if out.is_dir():
        raise BadInput(f"-o {out} is a directory; give a file path, e.g. {out / 'baseline.json'}")
    try:  # an older baseline is replaced; anything else (a run's results.csv) is kept
        if out.exists():
            load_baseline(out)
    except UserError:
        raise BadInput(f"{out} exists and is not a deq-bench baseline; refusing to overwrite it "
                       "(choose another -o, or delete it)") from None
    check_writable_dir(out.parent)
    data = make_baseline(run_dir, require_measurements=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_json(out, data)
    finally:  # a full disk leaves no half-written <file>.tmp
        Path(f"{out}.tmp").unlink(missing_ok=True)
    print(f"baseline of {len(data['cases'])} cases ({data['device_kind']}: {data['device_name']}) -> {out}")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from bench.check import comparison, format_findings, load_baseline

    run_dir = check_run_dir(args.run_dir)
    tol_memory = parse_tolerance(args.tol_memory, "--tol-memory")
    tol_speed = parse_tolerance(args.tol_speed, "--tol-speed")
    baseline = load_baseline(Path(args.baseline))
    result = comparison(run_dir, baseline, tol_memory, tol_speed)
    for line in [*format_findings(result.findings), "", *result.lines(args.allow_missing)]:
        print(line)
    print(f"\n{len(result.regressions)} regression(s) against {args.baseline} "
          f"(memory tolerance {100 * tol_memory:g}%, speed {100 * tol_speed:g}%)")
    return EXIT_REGRESSION if result.failed(args.allow_missing) else EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    from bench import explain

    explain.run(load_matrix_arg(args), out_dir_arg(args, suffix="-explain"), resolve_device_arg("auto"),
                progress=sys.stderr.isatty(), resume=args.resume, argv=["deqbench", *sys.argv[1:]])
    return EXIT_OK


# -- train ----------------------------------------------------------------------------------------
def train_options() -> list[tuple[str, str, Callable[[str], Any], str]]:
    """(option, TrainConfig field, type, help) for every field that is an option; the help ends
    with the field's default (TrainConfig is the one source of defaults)."""
    from bench.data import SYNTHETIC_KEYS, SyntheticSource
    from bench.train.config import TrainConfig

    types = {"int": int, "float": float, "str": str}
    synthetic = ", ".join(f"{k} ({getattr(SyntheticSource(), k)})" for k in SYNTHETIC_KEYS)
    options = []
    for f in dataclasses.fields(TrainConfig):
        if "help" not in f.metadata:
            continue
        text = f.metadata["help"].format(synthetic=synthetic) if f.name == "data" else f.metadata["help"]
        if "default" not in text and f.default is not None:
            text += f" (default {f.default})"
        kind = types[str(f.type).split("|")[0].strip()]
        options.append((f"--{f.name.replace('_', '-')}", f.name, kind, text))
    return options


def train_config_from_args(args: argparse.Namespace):
    from bench.train.config import TrainConfig

    if not args.model:
        raise BadInput("--model is required (`deqbench list` shows the models)")
    values = {dest: getattr(args, dest) for _, dest, _, _ in train_options()
              if getattr(args, dest) is not None}
    train = values.get("train_split", "train")
    for role in ("valid", "test"):  # never evaluate on the split trained on, unless asked to
        key = f"{role}_split"
        if key in values:
            values[key] = None if values[key].lower() == "none" else values[key]
        elif train == role:
            values[key] = None
    if args.device is not None:
        values["device"] = args.device
    overrides = tuple(parse_override(s) for s in args.set_)
    with user_errors():
        return TrainConfig(model=args.model, overrides=overrides, **values)


def cmd_train(args: argparse.Namespace) -> int:
    from bench.train import EXIT_INTERRUPTED, Trainer, header_lines, summary_lines

    command = ["deqbench", *sys.argv[1:]]
    if args.device is not None:
        resolve_device_arg(args.device)
    if args.resume:
        if not args.out:
            raise BadInput("--resume needs --out: the run directory to continue")
        given = [opt for opt, dest, _, _ in train_options() if getattr(args, dest) is not None]
        given += ["--model"] * bool(args.model) + ["--set"] * bool(args.set_)
        if given:
            raise BadInput(f"--resume continues {args.out} with the settings it started with; "
                           f"drop {', '.join(given)}")
        with user_errors():
            trainer = Trainer.resume(Path(args.out), progress=not args.no_progress,
                                     device=args.device, command=command)
    else:
        config = train_config_from_args(args)
        from bench.runner import default_train_dir
        from bench.train.checkpoint import check_new_run_dir
        from models import model_spec

        with user_errors():
            model_spec(config.model)  # an unknown name fails here, listing the valid ones
        out = Path(args.out) if args.out else default_train_dir(config.model)
        check_new_run_dir(out)
        check_writable_dir(out)
        with user_errors():  # a config field the model does not take, a corpus that is not there
            trainer = Trainer(config, out, progress=not args.no_progress, command=command)
    for line in header_lines(trainer):
        print(line, file=sys.stderr)
    outcome = trainer.run()
    for line in summary_lines(trainer, outcome):
        print(line)
    return EXIT_INTERRUPTED if outcome.status == "interrupted" else EXIT_OK


# -- parser ---------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit 2) like every other bad input."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _matrix_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"a preset from bench/presets (default {DEFAULT_PRESET})")
    p.add_argument("--matrix", help="a matrix TOML file")
    p.add_argument("--out", help="run directory (default results/runs/<timestamp>)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run in --out (default results/latest)")
    p.add_argument("--only", help="run only cases whose id contains or glob-matches these comma-separated patterns")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-report", action="store_true", help="no figures or report.md (`deqbench report D` makes them later)")
    p.add_argument("--svg", action="store_true", help=SVG_HELP)
    p.add_argument("--threads", type=int, help="torch threads per case (default: the preset's, else all cores)")
    p.add_argument("--retry-failed", action="store_true", help="with --resume: also run again the "
                   "cases whose row failed (oom, error, timeout); killed ones always run again")
    g = p.add_argument_group("launcher (defaults: the matrix's [launcher] table, else local with one worker)")
    for option, kind, text in (
            ("--launcher", str, "local | slurm (`deqbench list` shows them)"),
            ("--workers", int, "local: cases at once, each in its own worker (CPU: one torch thread "
                               "each, timings marked concurrent)"),
            ("--gpus", str, "local: CUDA devices, one worker pinned to each, e.g. 0,1,3"),
            ("--slurm-partition", str, "slurm: the partition to submit to"),
            ("--slurm-gpus-per-task", int, "slurm: GPUs per job (default none: CPU)"),
            ("--slurm-time", str, "slurm: time limit per job, minutes or [H:]MM:SS (default the case "
                                  "time limit + 1 min); a job over it becomes a timeout row"),
            ("--slurm-mem", str, "slurm: memory per job (sbatch --mem, e.g. 4G); over it: an oom row"),
            ("--slurm-array-parallelism", int, "slurm: one job array, at most this many jobs "
                                               "running (default one job per case)")):
        g.add_argument(option, type=kind, help=text)
    g.add_argument("--slurm-setup", action="append", metavar="LINE", help="slurm: a shell line "
                   "run in each job before the case, repeatable (e.g. 'module load cuda')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="deqbench", description="Memory and compute benchmarks "
                     "for Deep Equilibrium Models against matched explicit networks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("list", help="models, sizes, presets, solvers, instruments")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("run", help=f"run a benchmark matrix (default preset: {DEFAULT_PRESET})")
    _matrix_args(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--memory-limit", help="CPU only: address space each case may add, e.g. 2GB; "
                   "a case over it becomes an oom row")
    p.add_argument("--instruments", help="comma-separated subset of instruments (default: the "
                   "matrix's [settings] instruments, else all the device allows)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("predict", help="peak memory of a matrix without allocating (fake tensors)")
    _matrix_args(p)
    p.set_defaults(func=cmd_predict, device="cpu", memory_limit=None, instruments=None)

    p = sub.add_parser("plot", help="draw a run's figures (PNG; --svg: and SVG) from its results.csv")
    p.add_argument("run_dir", help="run directory holding results.csv (and env.json)")
    p.add_argument("--svg", action="store_true", help=SVG_HELP)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("report", help="write a run's report.md (and its figures) from its results.csv")
    p.add_argument("run_dir", help="run directory holding results.csv (and env.json)")
    p.add_argument("--svg", action="store_true", help=SVG_HELP)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("baseline", help="a regression baseline (JSON) from a run")
    p.add_argument("run_dir")
    p.add_argument("-o", "--output", required=True, help="baseline file to write")
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("check", help="compare a run with a baseline; exit 1 on regression")
    p.add_argument("run_dir")
    p.add_argument("--baseline", required=True)
    p.add_argument("--tol-memory", default="5%", help="memory growth allowed (default 5%%)")
    p.add_argument("--tol-speed", default="30%", help="slowdown allowed (default 30%%; timings drift)")
    p.add_argument("--allow-missing", action="store_true", help="pass although baseline cases are "
                   "missing from the run (checking a subset); they fail the check otherwise")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "train", help="train a model on a corpus: perplexity, speed and memory as it learns",
        description="Train one model (lm mode) with Adam, warm-up + cosine, clipping and, for "
                    "DEQs, unrolled pretraining; writes train_log.csv, train.json and a checkpoint.")
    p.add_argument("--model", help="a registered model (deqbench list)")
    for option, dest, kind, text in train_options():
        p.add_argument(option, dest=dest, type=kind, default=None, help=text)
    p.add_argument("--set", dest="set_", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override, repeatable, e.g. --set mem_len=32 --set solver=anderson")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--out", help="run directory (default results/train/<model>-<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("explain", help="every paper pair rebuilt from named factors (predicted on a CPU)")
    p.add_argument("--preset", default="paper-audit", help="a preset holding the chains' cases (default paper-audit)")
    p.add_argument("--out", help="run directory (default results/runs/<timestamp>-explain)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted explain (or a paper-audit run) in --out")
    p.set_defaults(func=cmd_explain, matrix=None, retry_failed=False)  # resume never re-runs failed

    p = sub.add_parser("env", help="the environment a run would record")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_env)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    empty = [k for k, v in vars(args).items() if isinstance(v, str) and not v.strip()]
    if empty:  # `--out "$DIR"` with DIR unset must not quietly mean the default
        name = empty[0] if empty[0] == "run_dir" else "--" + empty[0].replace("_", "-")
        print(f"deqbench: error: argument {name} is empty (see deqbench {args.command} --help)",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return args.func(args)
    except UserError as err:
        print(f"deqbench: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:  # a full disk, a read-only folder: one line; anything else is a bug
        user = os_error(err)
        if user is None:
            raise
        print(f"deqbench: error: {user}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValueError as err:
        from models.registry import PluginError  # only now: it imports torch

        if not isinstance(err, PluginError):
            raise
        print(f"deqbench: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as err:
        print("deqbench: interrupted", file=sys.stderr)
        return 128 + getattr(err, "signum", 2)
