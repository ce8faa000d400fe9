"""Where the tests find a WikiText-2 copy, if any: $DEQBENCH_DATA/wikitext-2, else the shared
folder beside the repository (../shared/data, or ../../shared/data from a worktree)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def find_wikitext2() -> Path | None:
    roots = [Path(os.environ["DEQBENCH_DATA"])] if os.environ.get("DEQBENCH_DATA") else []
    roots += [REPO.parent / "shared" / "data", REPO.parent.parent / "shared" / "data"]
    for root in roots:
        if (root / "wikitext-2").is_dir():
            return root / "wikitext-2"
    return None


WIKITEXT2 = find_wikitext2()
