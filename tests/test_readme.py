"""The README's numbers are the committed default run's: its generated blocks are what
tools/update_readme.py makes from results/reference/cpu/default, and its verdict lines are the
ones that run's report.md opens with."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEFAULT_RUN = ROOT / "results" / "reference" / "cpu" / "default"


def _update_readme():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "tools" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _block(text: str, name: str) -> str:
    m = re.search(rf"<!-- generated:{name} -->\n(.*?)<!-- /generated:{name} -->", text, re.DOTALL)
    assert m, f"README.md has no generated:{name} block"
    return m.group(1)


def test_generated_blocks_are_up_to_date():
    text = README.read_text()
    _, changed = _update_readme().regenerate(text)
    assert changed == [], f"stale README block(s) {changed}: run python tools/update_readme.py"


def test_readme_verdict_is_the_committed_reports():
    readme = [line for line in _block(README.read_text(), "verdict").splitlines() if line.startswith("- ")]
    report = (DEFAULT_RUN / "report.md").read_text()
    section = report.split("## Verdict")[1].split("\n## ")[0]
    in_report = [line for line in section.splitlines() if line.startswith("- ")]
    assert readme and readme == in_report


def test_readme_figure_is_the_committed_runs():
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README.read_text())
    assert images, "the README shows a figure"
    for image in images:
        assert (ROOT / image).is_file(), image
        assert image.startswith("results/reference/"), image  # regenerated from a committed run
