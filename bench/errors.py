"""The errors a user can cause, one class per kind; the CLI turns each into one line and exit 2.

Library code raises these (never `SystemExit`, never an argparse error) and never imports the CLI.
Each subclasses `ValueError` as well, so callers that only care that an input was bad can catch
that.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: an unknown name, a bad value, an unreadable or unwritable path. The message is
    one line that says what is wrong and how to fix it; nothing has run or been written."""


class SpecError(UserError):
    """A matrix (TOML) or case that cannot run."""


class CorpusError(UserError):
    """A corpus that cannot be loaded (missing directory or split, bad synthetic options)."""


class CheckpointError(UserError):
    """A training checkpoint that is missing, unreadable or of another format."""


class BaselineError(UserError):
    """A regression baseline that cannot be compared with this run (unreadable, other device)."""


class RunDirError(UserError):
    """A run directory that cannot be used (nothing to resume, already holds a run, not writable)."""
