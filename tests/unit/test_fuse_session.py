"""replfs.fuse.Session against a fake kernel (a SEQPACKET socket pair, no mount).

A SEQPACKET socket keeps message boundaries as /dev/fuse does, so the
session's read loop, dispatch, error funnel, interrupts and notify
ordering run unchanged; the test plays the kernel.
"""
from __future__ import annotations

import errno
import socket

import pytest
import trio

from replfs.fuse import (EntryAttributes, FileInfo, FUSEError, Operations, Session,
                         UnsupportedKernel, proto, readdir_reply)
from replfs.fuse.proto import Opcode

MAX = 1 << 20


class FakeKernel:
    def __init__(self):
        k, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        d.setblocking(False)
        self.daemon_sock = d            # keeps the fd alive
        self.fd = d.fileno()
        self.sock = trio.socket.from_stdlib_socket(k)
        self.unique = 100

    async def send(self, op, args, *, nodeid=1, unique=None) -> int:
        if unique is None:
            self.unique += 2
            unique = self.unique
        await self.sock.send(proto.encode_request(op, args, unique=unique, nodeid=nodeid,
                                                  uid=0, gid=0, pid=42))
        return unique

    async def recv(self, timeout=5) -> tuple[int, int, bytes]:
        """(unique, error or notify code, payload)"""
        with trio.fail_after(timeout):
            msg = await self.sock.recv(MAX + 4096)
        length, error, unique = proto.OUT_HEADER.unpack_from(msg)
        assert length == len(msg)
        return unique, error, msg[proto.OUT_HEADER.size:]

    async def nothing(self, seconds=0.1) -> bool:
        with trio.move_on_after(seconds):
            await self.sock.recv(MAX)
            return False
        return True

    async def init(self, minor=45):
        await self.send(Opcode.INIT, proto.Init(7, minor, 1 << 17, 0xFFFFFFFF, 0), unique=2)
        return await self.recv()

    def close(self):
        self.sock.close()


def attrs(ino, mode=0o100644):
    return EntryAttributes(st_ino=ino, st_mode=mode, st_nlink=1, entry_timeout=1,
                           attr_timeout=1)


class Ops(Operations):
    task_opcodes = frozenset({Opcode.SETLKW, Opcode.READ})

    def __init__(self):
        self.forgotten = []
        self.session = None
        self.io = []

    def init(self, session):
        self.session = session

    async def lookup(self, parent, name, ctx):
        if name == b"boom":
            raise RuntimeError("a bug in the filesystem")
        if name == b"long":
            raise OSError(errno.ENAMETOOLONG, "too long")
        if name == b"missing":
            raise FUSEError(errno.ENOENT)
        if name == b"notify":
            self.session.invalidate_inode(7)
        return attrs(5)

    async def forget(self, inode_list):
        self.forgotten.extend(inode_list)

    async def getattr(self, inode, ctx):
        return attrs(inode, 0o40755 if inode == 1 else 0o100644)

    async def read(self, fh, off, size):
        if fh == 99:
            return b"x" * (size + 1)        # too long: our misuse, EIO
        await trio.sleep(0)
        return b"d" * size

    async def getxattr(self, inode, name, ctx):
        return b"0123456789"

    async def open(self, inode, flags, ctx):
        # inode 20 opens direct_io (as a device file), any other cached
        return FileInfo(fh=inode, direct_io=inode == 20)

    async def write(self, fh, off, buf):
        self.io.append(("write", fh))
        return len(buf)

    async def fsync(self, fh, datasync):
        self.io.append(("fsync", fh, datasync))

    async def release(self, fh):
        pass

    async def flush(self, fh):
        raise FUSEError(errno.ENOSYS)

    async def opendir(self, inode, ctx):
        return FileInfo(fh=3, cache_dir=True)

    async def readdir(self, fh, start_id, token):
        for i in range(start_id, 100):
            if not readdir_reply(token, f"e{i}".encode(), attrs(10 + i), i + 1):
                return

    async def getlk(self, *a):
        return None

    async def setlk(self, *a):
        pass

    async def setlkw(self, inode, fh, owner, lock, ctx):
        await trio.sleep_forever()


@pytest.fixture
async def served(nursery):
    k = FakeKernel()
    ops = Ops()
    s = Session(ops, "/nonexistent", debug=True)

    async def start(task_status=trio.TASK_STATUS_IGNORED):
        await s.run(fd=k.fd, task_status=task_status)

    async def handshake():
        uniq, err, payload = await k.init()
        assert (uniq, err) == (2, 0)
        return payload

    nursery.start_soon(start)
    init = await handshake()
    yield k, ops, s, init
    k.close()
    with trio.fail_after(5):
        await s.wait_ended()
    assert s.violations == []


async def test_init_negotiates_7_36_and_the_class_flags(served):
    k, ops, s, init = served
    major, minor, ra, flags, bg, cong, mw, tg, mp, _, _ = proto.INIT_OUT.unpack(init)
    assert (major, minor, mw, mp) == (7, 36, 1 << 20, 256)
    assert flags & proto.POSIX_LOCKS and not flags & proto.FLOCK_LOCKS
    assert not flags & (proto.WRITEBACK_CACHE | proto.POSIX_ACL | proto.DONT_MASK
                        | proto.HANDLE_KILLPRIV | proto.SPLICE_READ)
    assert s.negotiated.flags == flags


async def test_old_kernel_is_refused_with_eproto():
    k = FakeKernel()
    s = Session(Ops(), "/nonexistent")
    async with trio.open_nursery() as n:
        async def run():
            with pytest.raises(UnsupportedKernel, match="7.30 is too old"):
                await s.run(fd=k.fd)
        n.start_soon(run)
        uniq, err, _ = await k.init(minor=30)
        assert (uniq, err) == (2, -errno.EPROTO)


async def test_error_funnel(served):
    k, ops, s, _ = served
    u = await k.send(Opcode.LOOKUP, proto.Name(b"boom"))
    assert await k.recv() == (u, -errno.EIO, b"")
    u = await k.send(Opcode.LOOKUP, proto.Name(b"long"))
    assert await k.recv() == (u, -errno.ENAMETOOLONG, b"")
    u = await k.send(Opcode.LOOKUP, proto.Name(b"missing"))
    assert await k.recv() == (u, -errno.ENOENT, b"")
    u = await k.send(Opcode.READ, proto.Read(99, 0, 10, 0, 0, 0))      # reply too long
    assert await k.recv() == (u, -errno.EIO, b"")
    u = await k.send(Opcode.MKDIR, proto.Mkdir(0o755, 0, b"d"))       # not implemented
    assert await k.recv() == (u, -errno.ENOSYS, b"")
    await k.sock.send(proto.IN_HEADER.pack(40, 9999, 77, 1, 0, 0, 0, 0, 0))   # unknown opcode
    assert await k.recv() == (77, -errno.ENOSYS, b"")
    await k.sock.send(proto.IN_HEADER.pack(43, Opcode.LOOKUP, 79, 1, 0, 0, 0, 0, 0) + b"abc")
    assert await k.recv() == (79, -errno.EIO, b"")                     # not NUL-terminated
    # ...and the reader still serves
    u = await k.send(Opcode.LOOKUP, proto.Name(b"fine"))
    uniq, err, payload = await k.recv()
    assert (uniq, err, len(payload)) == (u, 0, proto.ENTRY_OUT_SIZE)
    assert s.stats["handler_errors"] == 1 and s.stats["protocol_errors"] == 1


async def test_replies_carry_the_right_payloads(served):
    k, ops, s, _ = served
    u = await k.send(Opcode.GETXATTR, proto.Getxattr(0, b"user.x"))
    assert await k.recv() == (u, 0, proto.getxattr_out(10))
    u = await k.send(Opcode.GETXATTR, proto.Getxattr(4, b"user.x"))
    assert await k.recv() == (u, -errno.ERANGE, b"")
    u = await k.send(Opcode.GETXATTR, proto.Getxattr(64, b"user.x"))
    assert await k.recv() == (u, 0, b"0123456789")
    u = await k.send(Opcode.FLUSH, proto.Flush(1, 1234))               # ENOSYS flush -> 0
    assert await k.recv() == (u, 0, b"")
    u = await k.send(Opcode.OPENDIR, proto.Open(0, 0))
    assert await k.recv() == (u, 0, proto.open_out(3, proto.FOPEN_CACHE_DIR))
    u = await k.send(Opcode.GETATTR, proto.Getattr(0, 0))
    uniq, err, payload = await k.recv()
    assert len(payload) == proto.ATTR_OUT_SIZE and proto.ATTR.unpack_from(payload, 16)[9] == 0o40755


async def test_readdirplus_fills_the_buffer_and_counts_references(served):
    k, ops, s, _ = served
    u = await k.send(Opcode.READDIRPLUS, proto.Read(3, 0, 4096, 0, 0, 0))
    uniq, err, payload = await k.recv()
    assert err == 0 and 4096 - proto.direntplus_size(b"e10") < len(payload) <= 4096
    n = len(payload) // proto.direntplus_size(b"e0")
    assert n == 4096 // 160
    # the same reply lost (caller killed): the session forgets what it carried
    real_write = s._write

    def lose_big_replies(parts):
        if len(parts) > 1 and len(parts[1]) > 1000:
            return errno.ENOENT        # what /dev/fuse says when the caller is gone
        return real_write(parts)
    s._write = lose_big_replies
    await k.send(Opcode.READDIRPLUS, proto.Read(3, 0, 4096, 0, 0, 0))
    u = await k.send(Opcode.LOOKUP, proto.Name(b"fine"))
    uniq, _, _ = await k.recv()
    assert uniq == u
    assert sorted(ops.forgotten) == [(10 + i, 1) for i in range(n)]
    assert s.stats["reply_lost"] == 1 and s.stats["forgotten_undelivered"] == n


async def test_forget_gets_no_reply(served):
    k, ops, s, _ = served
    await k.send(Opcode.FORGET, proto.Forget(3), nodeid=9)
    await k.send(Opcode.BATCH_FORGET, proto.BatchForget(((10, 1), (11, 2))))
    assert await k.nothing()
    assert ops.forgotten == [(9, 3), (10, 1), (11, 2)]


async def test_interrupt_cancels_a_blocked_lock_wait(served):
    k, ops, s, _ = served
    lk = proto.Lk(1, 77, 0, 9, 1, 42, 0)
    u = await k.send(Opcode.SETLKW, lk, nodeid=5)
    assert await k.nothing()                         # blocked
    await k.send(Opcode.INTERRUPT, proto.Interrupt(12345))     # unknown: ignored, no reply
    assert await k.nothing()
    await k.send(Opcode.INTERRUPT, proto.Interrupt(u))
    assert await k.recv() == (u, -errno.EINTR, b"")
    await k.send(Opcode.INTERRUPT, proto.Interrupt(u))         # late duplicate: ignored
    assert await k.nothing()
    assert s.stats["interrupted"] == 1 and s.stats["interrupt_unknown"] == 2


async def test_notify_from_a_handler_follows_its_reply(served):
    k, ops, s, _ = served
    u = await k.send(Opcode.LOOKUP, proto.Name(b"notify"))
    first = await k.recv()
    second = await k.recv()
    assert first[0] == u and first[1] == 0
    assert second[0] == 0 and second[1] == proto.NotifyCode.INVAL_INODE
    assert proto.NOTIFY_INVAL_INODE.unpack(second[2]) == (7, 0, 0)
    s.invalidate_entry(1, b"name")                   # outside a handler: straight to the sender
    await s.notify_barrier()
    uniq, code, payload = await k.recv()
    assert code == proto.NotifyCode.INVAL_ENTRY and payload.endswith(b"name\0")
    assert s.stats["notify_ok"] == 2


async def test_sync_writes_to_direct_io_handles_are_synced(served):
    """The kernel sends no FSYNC after an O_DSYNC/O_SYNC write to a
    direct_io handle (it does after a cached one): the session makes it
    durable (write_sync: write then fsync by default)."""
    import os
    k, ops, s, _ = served

    async def open_(ino):
        u = await k.send(Opcode.OPEN, proto.Open(os.O_RDWR, 0), nodeid=ino)
        assert (await k.recv())[:2] == (u, 0)

    async def write(fh, flags):
        ops.io.clear()
        u = await k.send(Opcode.WRITE, proto.Write(fh, 0, 4, 0, 0, flags, b"data"))
        assert (await k.recv())[:2] == (u, 0)
        return list(ops.io)

    await open_(20)
    await open_(20)
    await open_(21)
    assert await write(20, os.O_RDWR) == [("write", 20)]
    assert await write(20, os.O_RDWR | os.O_DSYNC) == [("write", 20), ("fsync", 20, True)]
    assert await write(20, os.O_RDWR | os.O_SYNC) == [("write", 20), ("fsync", 20, False)]
    # a cached handle: the kernel's own FSYNC follows, nothing added
    assert await write(21, os.O_RDWR | os.O_DSYNC) == [("write", 21)]
    # two opens of fh 20: still direct after one release, not after both
    for left in ([("write", 20), ("fsync", 20, True)], [("write", 20)]):
        u = await k.send(Opcode.RELEASE, proto.Release(20, 0, 0, 0), nodeid=20)
        assert (await k.recv())[:2] == (u, 0)
        assert await write(20, os.O_DSYNC) == left


async def test_session_end_answers_pending_requests(nursery):
    k = FakeKernel()
    s = Session(Ops(), "/nonexistent", debug=True)
    nursery.start_soon(lambda: s.run(fd=k.fd))
    await k.init()
    u = await k.send(Opcode.SETLKW, proto.Lk(1, 77, 0, 9, 1, 42, 0), nodeid=5)
    assert await k.nothing()
    s.stop()
    assert await k.recv() == (u, -errno.EIO, b"")    # never left without an answer
    with trio.fail_after(5):
        await s.wait_ended()
    assert s.violations == [] and s._fd is None
