"""`deqbench` as tools/gpu_check.sh calls it (DEQBENCH), with a stand-in `explain` subcommand.

FAKE_EXPLAIN=present: `explain --help` lists --preset, --out and --no-progress, and `explain`
writes its arguments into OUT/explain.csv; FAKE_EXPLAIN=absent: `explain` is an unknown command,
as in a tree without it; FAKE_EXPLAIN=slow / stubborn: `explain` writes its pid into OUT/pid and
sleeps (stubborn: deaf to SIGINT), to be ended at its budget. Every other subcommand is the real one.
"""

import os
import signal
import sys
import time
from pathlib import Path

from bench.cli import main

HELP = "usage: deqbench explain [-h] [--preset PRESET] [--out OUT] [--no-progress]"


def explain(argv: list[str]) -> int:
    if "--help" in argv:
        print(HELP)
        return 0
    out = Path(argv[argv.index("--out") + 1])
    out.mkdir(parents=True)
    if os.environ["FAKE_EXPLAIN"] in ("slow", "stubborn"):
        if os.environ["FAKE_EXPLAIN"] == "stubborn":
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        (out / "pid").write_text(str(os.getpid()))
        time.sleep(120)
    (out / "explain.csv").write_text("argv\n" + " ".join(argv) + "\n")
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["explain"] and os.environ.get("FAKE_EXPLAIN", "absent") != "absent":
        sys.exit(explain(args[1:]))
    if args[:1] == ["explain"]:
        print("deqbench: error: argument COMMAND: invalid choice: 'explain'", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(args))
