"""The errors a user can cause, one class per kind; the CLI turns each into one line and exit 2.

Library code raises these (never `SystemExit`, never an argparse error) and never imports the CLI.
Each subclasses `ValueError` as well, so callers that only care that an input was bad can catch
that.
"""

from __future__ import annotations

import errno


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


# OSErrors a user fixes by freeing space or choosing another place: errno -> how to fix it.
_NO_SPACE = "free some space and run the command again"
_NO_ACCESS = "choose a directory you can write to (or fix its permissions)"
_IN_THE_WAY = "move it out of the way or choose another directory"
FIXABLE_OS_ERRORS = {errno.ENOSPC: _NO_SPACE, errno.EDQUOT: _NO_SPACE, errno.EROFS: _NO_ACCESS,
                     errno.EACCES: _NO_ACCESS, errno.EPERM: _NO_ACCESS, errno.EEXIST: _IN_THE_WAY,
                     errno.EISDIR: _IN_THE_WAY, errno.ENOTDIR: _IN_THE_WAY}


def os_error(err: OSError) -> UserError | None:
    """The one line for an OSError the user can fix (a full disk, a read-only or forbidden path),
    naming the file; None for any other OSError (a bug, not an input)."""
    fix = FIXABLE_OS_ERRORS.get(err.errno)  # type: ignore[arg-type]
    if fix is None:
        return None
    where = f"{err.filename}: " if err.filename else ""
    return RunDirError(f"cannot write {where}{err.strerror or errno.errorcode[err.errno]}; {fix}")
