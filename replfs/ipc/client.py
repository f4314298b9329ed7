"""Clients of replfsd's admin socket: the blocking one for the CLI here,
and -- in replfs.ipc.aclient, named here too -- the async (trio) one for
mounts, the device file and benchmarks, and ``DaemonBlockDevice``, the
BlockDevice of a replicated resource (a write returns when the resource's
protocol counts it complete).  This module imports no trio: replfsadm
starts a tenth of a second faster for it.
"""
from __future__ import annotations

import itertools
import os
import socket

from replfs.errors import EXIT_EXEC, BlockDeviceError, ReplfsError

from . import frames

DEFAULT_RUNDIR = "/run/replfs"
SOCKET_NAME = "replfsd.sock"


def rundir_from_env(rundir: str | None = None) -> str:
    return rundir or os.environ.get("REPLFS_RUNDIR") or DEFAULT_RUNDIR


def socket_path(rundir: str | None = None) -> str:
    return os.path.join(rundir_from_env(rundir), SOCKET_NAME)


def node_name(explicit: str | None = None) -> str:
    """This node's name: --node, else $REPLFS_NODE, else `uname -n`."""
    return explicit or os.environ.get("REPLFS_NODE") or os.uname().nodename


class DaemonNotRunning(ReplfsError):
    def __init__(self, path: str):
        super().__init__(f"replfsd is not running (no answer on {path}); "
                         f"start it with 'replfsadm up RESOURCE' or 'replfsd'", EXIT_EXEC)


def _raise_reply(reply: dict) -> None:
    if reply.get("ok"):
        return
    if "errno" in reply:
        raise BlockDeviceError(reply["errno"], reply.get("error", os.strerror(reply["errno"])))
    raise ReplfsError(reply.get("error", "replfsd refused the request"),
                      reply.get("exit", EXIT_EXEC))


class SyncClient:
    """One request at a time over a blocking socket (the CLI)."""

    def __init__(self, path: str, timeout: float | None = 120.0):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            self._sock.close()
            raise DaemonNotRunning(path) from None
        self._dec = frames.FrameDecoder()
        self._ids = itertools.count(1)

    def call(self, op: str, body: bytes = b"", **args) -> tuple[dict, bytes]:
        rid = next(self._ids)
        prefix, body = frames.encode_parts({"id": rid, "op": op, **args}, body)
        self._sock.sendall(prefix)
        if body:
            self._sock.sendall(body)
        while True:
            fr = self._dec.next_frame()
            if fr is not None:
                header, data = fr
                if header.get("id") != rid:
                    continue
                _raise_reply(header)
                return header, data
            chunk = self._sock.recv(1 << 20)
            if not chunk:
                raise ReplfsError("replfsd closed the connection", EXIT_EXEC)
            self._dec.receive_data(chunk)

    def close(self) -> None:
        self._sock.close()

    def abort(self) -> None:
        """Give up a call another thread is blocked in (it raises OSError
        or ReplfsError); the daemon sees the connection go."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def __getattr__(name: str):
    """AsyncClient and DaemonBlockDevice live in replfs.ipc.aclient (they
    need trio); they are still importable from here."""
    if name in ("AsyncClient", "DaemonBlockDevice"):
        from . import aclient
        return getattr(aclient, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
