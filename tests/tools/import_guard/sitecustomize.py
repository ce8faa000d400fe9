"""Makes distributions a CUDA image lacks unimportable in every Python process of a test run.

tests/tools/test_gpu_check.py puts this directory on PYTHONPATH, so every interpreter the script
starts (pip's build backend, deqbench, its spawned workers, pytest) loads it at start-up.
DEQBENCH_IMPORT_GUARD_BLOCK: comma-separated top-level module names to refuse, as if they were
not installed; DEQBENCH_IMPORT_GUARD_LOG: a file that gets one line per refused import: the module, the file
and line that imported it, the process's command line (tab-separated), so a test can tell our
imports from a library's optional ones (torch tries colorama, and goes on without it).
"""

import os
import sys
import traceback

BLOCK = frozenset(filter(None, os.environ.get("DEQBENCH_IMPORT_GUARD_BLOCK", "").split(",")))
LOG = os.environ.get("DEQBENCH_IMPORT_GUARD_LOG")


class ImportGuard:
    """A meta path finder in front of all others: a blocked module is not found, and logged."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in BLOCK:
            return None
        if LOG:
            frames = [f for f in traceback.extract_stack()[:-1] if "importlib" not in f.filename]
            where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
            with open(LOG, "a") as fh:
                fh.write(f"{name}\t{where}\t{' '.join(sys.argv)[:200]}\n")
        raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU image)", name=name)


if BLOCK:
    sys.meta_path.insert(0, ImportGuard())
