"""Files that hold secrets: say so when users other than the owner can read them.

Used for the cluster key (locking) and for a replfs.conf that holds a
``shared-secret`` (replfsadm), with the same test and the same words.
"""
from __future__ import annotations

import os


def readable_by_others(mode: int) -> bool:
    """Can the file's group or other users read a file of this st_mode?"""
    return bool(mode & 0o044)


def exposed_secret_warning(path: str, mode: int, what: str, risk: str) -> str | None:
    """The warning for a secret in ``path`` (st_mode ``mode``) that group
    or others can read, or None if only its owner can:
    ``PATH: WHAT is readable by group or others (mode 0644); RISK: chmod 600 PATH``."""
    if not readable_by_others(mode):
        return None
    return (f"{path}: {what} is readable by group or others (mode {mode & 0o777:04o}); "
            f"{risk}: chmod 600 {path}")


def check_secret_file(path: str, what: str, risk: str) -> str | None:
    """exposed_secret_warning() for the file at path (None if it cannot be stat'ed)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return exposed_secret_warning(path, mode, what, risk)
