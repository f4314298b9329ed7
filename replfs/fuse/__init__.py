"""replfs.fuse: our own FUSE session layer on /dev/fuse (no libfuse, no pyfuse3).

Layout (docs/fuse-layer.md tells the whole story):

* ``proto``    pure: kernel structs pinned at protocol 7.36, request decoding,
               reply and notify builders, INIT negotiation;
* ``locks``    pure: POSIX/flock lock table with deadlock detection;
* ``lockops``  trio: blocking lock waits over the table, ``LockService``;
* ``api``      what a filesystem implements: ``Operations`` (pyfuse3-shaped)
               and its value types, ``readdir_reply``, the ``LocalLocks`` mixin;
* ``dispatch`` the request -> method table and the single error funnel;
* ``session``  the trio driver of one mount; notify sender thread;
* ``mount``    mount(2)/umount2, stale-mount cleanup, connection abort.

A filesystem ported from pyfuse3 imports these names from here.
"""
from .api import (ROOT_INODE, EntryAttributes, FileInfo, FileLock, LocalLocks, Operations,
                  ReaddirToken, RequestContext, SetattrFields, StatvfsData, readdir_reply)
from .errors import FUSEError, FuseUsageError, KernelProtocolError, UnsupportedKernel
from .lockops import LockService
from .locks import F_RDLCK, F_UNLCK, F_WRLCK, Kind, LockTable, Owner
from .mount import abort_connection, clean_stale_mounts, connection_id, unmount
from .session import ALL_INLINE, ALL_TASKS, DEFAULT_TASK_OPCODES, NotifySender, Session, serve

__all__ = [
    "ROOT_INODE", "EntryAttributes", "FileInfo", "FileLock", "LocalLocks", "Operations",
    "ReaddirToken", "RequestContext", "SetattrFields", "StatvfsData", "readdir_reply",
    "FUSEError", "FuseUsageError", "KernelProtocolError", "UnsupportedKernel", "LockService",
    "F_RDLCK", "F_UNLCK", "F_WRLCK", "Kind", "LockTable", "Owner", "abort_connection",
    "clean_stale_mounts", "connection_id", "unmount", "ALL_INLINE", "ALL_TASKS", "DEFAULT_TASK_OPCODES",
    "NotifySender", "Session", "serve",
]
