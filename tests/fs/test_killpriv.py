"""What the filesystem clears itself under FUSE's HANDLE_KILLPRIV_V2 (the
kernel no longer does it, nor asks GETXATTR security.capability before
each write): set-id bits on a write, truncate or O_TRUNC open by a caller
without CAP_FSETID and on every chown; file capabilities on any write,
truncate or chown -- the kernel's S_NOSEC, kept while attributes stay
cached, may not have seen capabilities the other node set."""
from __future__ import annotations

import errno
import os
import struct

import pytest

from .test_core import mkfile

CAPS = b"security.capability"
CAPSET = struct.pack("<5I", 0x02000001, 1 << 10, 0, 0, 0)


async def _file(fs, name, mode=0o6777, caps=True, other=False):
    ino = await mkfile(fs, name, b"0123456789")
    await fs.setattr(ino, mode=mode)
    if caps:
        await fs.setxattr(ino, CAPS, CAPSET)
    if other:
        await fs.setxattr(ino, b"user.keep", b"v")
    return ino


async def _state(fs, ino):
    a = await fs.getattr(ino)
    try:
        await fs.getxattr(ino, CAPS)
        caps = True
    except OSError as e:
        assert e.errno == errno.ENODATA
        caps = False
    return a.mode & 0o7777, caps


async def _write(fs, ino, **kw):
    fh = await fs.open(ino, os.O_WRONLY)
    try:
        await fs.write(fh, 0, b"x", **kw)
    finally:
        await fs.release(fh)


async def test_a_privileged_write_drops_capabilities_and_keeps_set_id_bits(fs):
    ino = await _file(fs, b"f", other=True)
    await _write(fs, ino)
    assert await _state(fs, ino) == (0o6777, False)
    # the other attribute stays, and with it the xattr block
    assert await fs.getxattr(ino, b"user.keep") == b"v"


async def test_an_unprivileged_write_drops_setuid_and_setgid_with_group_execute(fs):
    a = await _file(fs, b"a", mode=0o6777)
    b = await _file(fs, b"b", mode=0o6767, caps=False)     # setgid without g+x: kept
    await _write(fs, a, kill_suidgid=True)
    await _write(fs, b, kill_suidgid=True)
    assert await _state(fs, a) == (0o777, False)
    assert await _state(fs, b) == (0o2767, False)


@pytest.mark.parametrize("kill", [False, True])
async def test_truncate_and_chown(fs, kill):
    t = await _file(fs, b"t")
    await fs.setattr(t, size=3, kill_suidgid=kill)
    assert await _state(fs, t) == (0o777 if kill else 0o6777, False)
    c = await _file(fs, b"c")
    await fs.setattr(c, uid=65534, gid=65534, kill_suidgid=kill)
    assert await _state(fs, c) == (0o777 if kill else 0o6777, False)
    # a chmod alone keeps the capabilities (as Linux)
    m = await _file(fs, b"m")
    await fs.setattr(m, mode=0o755)
    assert await _state(fs, m) == (0o755, True)


async def test_o_trunc_open(fs):
    ino = await _file(fs, b"o")
    fh = await fs.open(ino, os.O_WRONLY | os.O_TRUNC, kill_suidgid=True)
    await fs.release(fh)
    assert await _state(fs, ino) == (0o777, False)
    assert (await fs.getattr(ino)).size == 0


async def test_reads_and_directories_are_left_alone(fs):
    ino = await _file(fs, b"r")
    fh = await fs.open(ino, os.O_RDONLY)
    await fs.read(fh, 0, 10)
    await fs.release(fh)
    assert await _state(fs, ino) == (0o6777, True)
    d = await fs.mkdir(fs.root_ino, b"d", 0o3777)
    await fs.setattr(d.ino, uid=65534, kill_suidgid=True)
    assert (await fs.getattr(d.ino)).mode & 0o7777 == 0o3777
