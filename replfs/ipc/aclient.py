"""The async (trio) clients of replfsd's admin socket: ``AsyncClient``
(many requests in flight over one connection) and ``DaemonBlockDevice``,
the BlockDevice of a replicated resource reached through the daemon.

Apart from replfs.ipc.client so that the CLI, which needs only the
blocking client, does not import trio (a tenth of a second on every
replfsadm call); replfs.ipc.client still names both.
"""
from __future__ import annotations

import errno
import itertools
import socket

import trio

from replfs.errors import BlockDeviceError, ReplfsError

from . import frames
from .client import DaemonNotRunning, _raise_reply, socket_path


class AsyncClient:
    """Many requests in flight over one connection (trio)."""

    def __init__(self, stream: trio.abc.Stream):
        self._stream = stream
        self._dec = frames.FrameDecoder()
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel] = {}
        self._send_lock = trio.Lock()
        self._closed = False
        self._withdrawn: set[int] = set()      # lock requests cancelled here
        self._nursery: trio.Nursery | None = None
        # Unsolicited frames from the daemon ({"event": ...}), in order.
        self._events_send, self.events = trio.open_memory_channel(float("inf"))
        self.closed_event = trio.Event()   # set when the daemon connection ends

    @classmethod
    async def connect(cls, path: str, nursery: trio.Nursery) -> "AsyncClient":
        try:
            stream = await trio.open_unix_socket(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunning(path) from None
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            stream.socket.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
        client = cls(stream)
        client._nursery = nursery
        nursery.start_soon(client._reader)
        return client

    async def _reader(self) -> None:
        try:
            while True:
                data = await self._stream.receive_some(1 << 20)
                if not data:
                    break
                self._dec.receive_data(data)
                while (fr := self._dec.next_frame()) is not None:
                    if "event" in fr[0]:
                        self._events_send.send_nowait(fr)
                        continue
                    rid = fr[0].get("id")
                    send = self._waiting.pop(rid, None)
                    if send is not None:
                        send.send_nowait(fr)
                    elif rid in self._withdrawn:
                        self._withdrawn.discard(rid)
                        if fr[0].get("ok") and "handle" in fr[0] and self._nursery:
                            # granted before the withdrawal arrived: give it back
                            self._nursery.start_soon(self._unlock_late, fr[0]["handle"])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._closed = True
            self.closed_event.set()
            self._events_send.close()
            for send in self._waiting.values():
                send.close()
            self._waiting.clear()

    async def call(self, op: str, body: bytes = b"", **args) -> tuple[dict, bytes]:
        if self._closed:
            raise BlockDeviceError(errno.EIO, "connection to replfsd is closed")
        rid = next(self._ids)
        send, recv = trio.open_memory_channel(1)
        self._waiting[rid] = send
        prefix, body = frames.encode_parts({"id": rid, "op": op, **args}, body)
        try:
            async with self._send_lock:
                if len(body) < 65536:
                    await self._stream.send_all(prefix + body)
                else:
                    await self._stream.send_all(prefix)
                    await self._stream.send_all(body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._waiting.pop(rid, None)
            raise BlockDeviceError(errno.EIO, "connection to replfsd lost") from None
        try:
            header, data = await recv.receive()
        except trio.EndOfChannel:
            raise BlockDeviceError(errno.EIO, "replfsd went away") from None
        except trio.Cancelled:
            self._waiting.pop(rid, None)
            if op in ("dlm-lock", "dlm-convert"):
                # withdraw the request: granted to nobody, it would block
                # every other holder until this connection closes
                await self._withdraw(rid)
            raise
        _raise_reply(header)
        return header, data

    async def _unlock_late(self, handle: int) -> None:
        try:
            await self.call("dlm-unlock", handle=handle)
        except (ReplfsError, OSError):
            pass

    async def _withdraw(self, rid: int) -> None:
        self._withdrawn.add(rid)
        prefix, body = frames.encode_parts({"id": next(self._ids), "op": "cancel",
                                            "target": rid}, b"")
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            try:
                async with self._send_lock:
                    await self._stream.send_all(prefix + body)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def aclose(self) -> None:
        await self._stream.aclose()


class DaemonBlockDevice:
    """The BlockDevice of a replicated resource, served by replfsd."""

    def __init__(self, client: AsyncClient, resource: str, size: int, handle: int):
        self._c = client
        self.resource = resource
        self._size = size
        self._handle = handle

    @classmethod
    async def open(cls, nursery: trio.Nursery, resource: str, *, rundir: str | None = None,
                   write: bool = True, single_node: bool = False) -> "DaemonBlockDevice":
        """``single_node``: the opener is a filesystem mounted on this node
        alone; the daemon refuses the open while the peer is Primary and
        the peer's promotion while it is open."""
        client = await AsyncClient.connect(socket_path(rundir), nursery)
        reply, _ = await client.call("open", res=resource, write=write,
                                     **({"single_node": True} if single_node else {}))
        return cls(client, resource, reply["size"], reply["handle"])

    @property
    def size(self) -> int:
        return self._size

    async def read(self, offset: int, length: int) -> bytes:
        _, data = await self._c.call("read", res=self.resource, off=offset, len=length)
        return data

    write_flags = True      # PREFLUSH/FUA travel with the request

    async def write(self, offset: int, data: bytes, flags: int = 0) -> None:
        await self._c.call("write", bytes(data), res=self.resource, off=offset,
                           **({"flags": flags} if flags else {}))

    async def flush(self) -> None:
        await self._c.call("flush", res=self.resource)

    async def discard(self, offset: int, length: int) -> None:
        await self._c.call("discard", res=self.resource, off=offset, len=length)

    async def close(self) -> None:
        try:
            await self._c.call("close", res=self.resource, handle=self._handle)
        except (BlockDeviceError, ReplfsError):
            pass
        await self._c.aclose()
