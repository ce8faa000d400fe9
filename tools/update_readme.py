"""Regenerate the README's generated blocks from the committed reference runs, never by hand.

    python tools/update_readme.py           # rewrite README.md's blocks
    python tools/update_readme.py --check   # exit 1 (and say which) when a block is stale

A block sits between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->`; its text comes
from the named generator below, each reading a committed run directory through the same code as
the run's own report (bench.verdict, bench.analysis), so the README says what report.md says.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEFAULT_RUN = ROOT / "results" / "reference" / "cpu" / "default"
AUDIT_RUN = ROOT / "results" / "reference" / "cpu" / "paper-audit"
BLOCK = re.compile(r"(<!-- generated:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /generated:(?P=name) -->)",
                   re.DOTALL)


def verdict_block() -> str:
    from bench.analysis import RunView
    from bench.verdict import verdict_lines

    view = RunView.load(DEFAULT_RUN)
    rel = DEFAULT_RUN.relative_to(ROOT)
    lines = [f"From `{rel}` ({view.device}; `deqbench run` on the default preset, "
             f"its [report]({rel}/report.md)):", ""]
    lines += [f"- {line}" for line in verdict_lines(view)]
    return "\n".join(lines) + "\n"


def paper_block() -> str:
    from bench.analysis import RunView
    from bench.format import format_bytes, format_pct

    view = RunView.load(DEFAULT_RUN)
    t = view.paper
    t = t[t["reduction"].notna()]
    lines = ["| paper pair (paper table) | paper | ours | our baseline → DEQ peak | source |",
             "| --- | --- | --- | --- | --- |"]
    for r in t.itertuples():
        lines.append(f"| {r.pair} ({r.paper_table}) | {format_pct(r.paper_reduction)} | "
                     f"{format_pct(r.reduction)} | {format_bytes(r.baseline_peak_bytes)} → "
                     f"{format_bytes(r.deq_peak_bytes)} | {r.source} |")
    return "\n".join(lines) + "\n"


def explain_block() -> str:
    from bench.analysis import RunView
    from bench.explain_text import readme_section

    return readme_section(RunView.load(AUDIT_RUN), str(AUDIT_RUN.relative_to(ROOT)))


GENERATORS: dict[str, Callable[[], str]] = {"verdict": verdict_block, "paper-table": paper_block,
                                            "explain": explain_block}


def regenerate(text: str) -> tuple[str, list[str]]:
    """README text with every block regenerated, and the names of the blocks that changed."""
    changed: list[str] = []

    def replace(m: re.Match) -> str:
        name = m["name"]
        if name not in GENERATORS:
            raise SystemExit(f"README.md has a block {name!r} no generator makes; "
                             f"known: {', '.join(GENERATORS)}")
        body = GENERATORS[name]()
        if body != m["body"]:
            changed.append(name)
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(replace, text), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say whether README.md is stale")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    text = README.read_text()
    new, changed = regenerate(text)
    if args.check:
        if changed:
            print(f"README.md is stale in block(s) {', '.join(changed)}: run python tools/update_readme.py")
            return 1
        print("README.md is up to date")
        return 0
    README.write_text(new)
    print(f"regenerated {', '.join(changed) or 'nothing (up to date)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
