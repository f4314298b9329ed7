"""The one exception a FUSE handler raises to answer with an errno.

Everything a handler raises ends in the session's single error funnel
(``dispatch.run_request``): ``FUSEError`` and ``OSError`` keep their errno,
anything else is a bug and answers EIO.  The protocol's own error classes
(malformed kernel input, misuse of the builders) live in ``proto``.
"""
from __future__ import annotations

import errno as _errno
import os

from .proto import FuseUsageError, KernelProtocolError, UnsupportedKernel  # noqa: F401


class FUSEError(Exception):
    """Answer the current request with ``errno`` (a positive errno value)."""

    def __init__(self, errno: int):
        if not isinstance(errno, int) or not 0 < errno < 4096:
            raise FuseUsageError(f"FUSEError needs a positive errno, got {errno!r}")
        super().__init__(errno)
        self.errno = errno

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"{name}: {os.strerror(self.errno)}"
