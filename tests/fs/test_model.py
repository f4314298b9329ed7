"""Random operation sequences against the Filesystem and an in-memory
model of POSIX semantics: every result (success or errno) must agree, and
the whole tree (names, types, contents, sizes, link counts) must agree
after the sequence and again after a remount.  The volume is then checked
from raw blocks."""
from __future__ import annotations

import errno
import os
import random

import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from replfs.blockdev import FileBlockDevice
from replfs.fs.core import RENAME_EXCHANGE, RENAME_NOREPLACE, Filesystem
from tests import soak

from .conftest import check_image, format_image, make_image

NAMES = ["a", "b", "c", "dd", "e"]


class MFile:
    def __init__(self):
        self.data = bytearray()
        self.nlink = 1


class MDir:
    def __init__(self, parent):
        self.entries: dict[str, object] = {}
        self.parent = parent if parent is not None else self


class Model:
    def __init__(self):
        self.root = MDir(None)
        self.root.entries["lost+found"] = MDir(self.root)

    def dirs(self):
        out = []

        def walk(d):
            out.append(d)
            for n in sorted(d.entries):
                if isinstance(d.entries[n], MDir):
                    walk(d.entries[n])
        walk(self.root)
        return out

    def files(self):
        seen, out = set(), []
        for d in self.dirs():
            for n in sorted(d.entries):
                x = d.entries[n]
                if isinstance(x, MFile) and id(x) not in seen:
                    seen.add(id(x))
                    out.append(x)
        return out

    def is_ancestor(self, a, d):
        while True:
            if d is a:
                return True
            if d is self.root:
                return False
            d = d.parent


class Err(Exception):
    def __init__(self, code):
        self.code = code


def model_rename(m: Model, od, on, nd, nn, flags):
    if on not in od.entries:
        raise Err(errno.ENOENT)
    src = od.entries[on]
    dst = nd.entries.get(nn)
    if flags & RENAME_EXCHANGE:
        if dst is None:
            raise Err(errno.ENOENT)
        if od is not nd:
            if isinstance(src, MDir) and m.is_ancestor(src, nd):
                raise Err(errno.EINVAL)
            if isinstance(dst, MDir) and m.is_ancestor(dst, od):
                raise Err(errno.EINVAL)
        if src is dst:
            return
        od.entries[on], nd.entries[nn] = dst, src
        if isinstance(src, MDir):
            src.parent = nd
        if isinstance(dst, MDir):
            dst.parent = od
        return
    if dst is not None and flags & RENAME_NOREPLACE:
        raise Err(errno.EEXIST)
    if isinstance(src, MDir) and od is not nd and m.is_ancestor(src, nd):
        raise Err(errno.EINVAL)
    if dst is not None:
        if dst is src:
            return
        if isinstance(src, MDir) and not isinstance(dst, MDir):
            raise Err(errno.ENOTDIR)
        if isinstance(dst, MDir) and not isinstance(src, MDir):
            raise Err(errno.EISDIR)
        if isinstance(dst, MDir) and dst.entries:
            raise Err(errno.ENOTEMPTY)
        if isinstance(dst, MFile):
            dst.nlink -= 1
    del od.entries[on]
    nd.entries[nn] = src
    if isinstance(src, MDir):
        src.parent = nd


OPS = ["create", "create", "write", "write", "truncate", "unlink", "mkdir", "rmdir",
       "rename", "rename", "link", "remount", "fsync"]

op_strategy = st.tuples(st.sampled_from(OPS), st.integers(0, 50), st.integers(0, 50),
                        st.integers(0, 4), st.integers(0, 5), st.integers(0, 3))


class Runner:
    def __init__(self, fs: Filesystem):
        self.fs = fs
        self.m = Model()
        self.ino = {id(self.m.root): fs.root_ino}
        self.keep = []      # model objects stay alive so their id() is never reused

    async def start(self):
        lf = await self.fs.lookup(self.fs.root_ino, "lost+found")
        self.ino[id(self.m.root.entries["lost+found"])] = lf.ino

    def _pick_dir(self, i):
        ds = self.m.dirs()
        return ds[i % len(ds)]

    async def compare_tree(self):
        fs, m = self.fs, self.m

        async def walk(d, ino, path):
            got = {n.decode(): i for n, i, _ in await fs.readdir(ino)}
            assert sorted(got) == sorted(d.entries), path
            a = await fs.getattr(ino)
            nsub = sum(isinstance(x, MDir) for x in d.entries.values())
            assert a.nlink == 2 + nsub, path
            for n, x in d.entries.items():
                child = got[n]
                assert self.ino.setdefault(id(x), child) == child, path + "/" + n
                if isinstance(x, MDir):
                    await walk(x, child, path + "/" + n)
                else:
                    a = await fs.getattr(child)
                    assert (a.size, a.nlink) == (len(x.data), x.nlink), path + "/" + n
                    fh = await fs.open(child)
                    assert await fs.read(fh, 0, len(x.data) + 5) == bytes(x.data), path + "/" + n
                    await fs.release(fh)
        await walk(m.root, fs.root_ino, "")

    async def step(self, op, i, j, k, s, flags):
        fs, m = self.fs, self.m
        d = self._pick_dir(i)
        dino = self.ino[id(d)]
        name = NAMES[k]
        files = m.files()
        try:
            if op == "create":
                if name in d.entries:
                    want = errno.EEXIST
                else:
                    want = None
                data = random.Random(j).randbytes(s * 3000)
                try:
                    fh, attr = await fs.create(dino, name)
                except OSError as e:
                    assert e.errno == want, (op, e)
                    return
                assert want is None
                f = MFile()
                self.keep.append(f)
                d.entries[name] = f
                self.ino[id(f)] = attr.ino
                if data:
                    await fs.write(fh, j * 1000, data)
                    f.data = bytearray(j * 1000) + data
                await fs.release(fh)
            elif op in ("write", "truncate"):
                if not files:
                    return
                f = files[j % len(files)]
                fino = self.ino[id(f)]
                if op == "write":
                    off = (i * 1777 + s * 4096) % 50000
                    data = random.Random(i + j).randbytes(k * 2500 + 1)
                    fh = await fs.open(fino, os.O_RDWR)
                    await fs.write(fh, off, data)
                    await fs.release(fh)
                    if len(f.data) < off:
                        f.data.extend(bytes(off - len(f.data)))
                    f.data[off:off + len(data)] = data
                else:
                    size = (i * 997 + s * 4096) % 40000
                    await fs.setattr(fino, size=size)
                    if size < len(f.data):
                        del f.data[size:]
                    else:
                        f.data.extend(bytes(size - len(f.data)))
            elif op == "unlink":
                x = d.entries.get(name)
                want = errno.ENOENT if x is None else errno.EISDIR if isinstance(x, MDir) else None
                try:
                    await fs.unlink(dino, name)
                except OSError as e:
                    assert e.errno == want, (op, e)
                    return
                assert want is None, op
                del d.entries[name]
                x.nlink -= 1
            elif op == "mkdir":
                want = errno.EEXIST if name in d.entries else None
                try:
                    a = await fs.mkdir(dino, name)
                except OSError as e:
                    assert e.errno == want, (op, e)
                    return
                assert want is None, op
                nd = MDir(d)
                self.keep.append(nd)
                d.entries[name] = nd
                self.ino[id(nd)] = a.ino
            elif op == "rmdir":
                x = d.entries.get(name)
                want = (errno.ENOENT if x is None else errno.ENOTDIR if isinstance(x, MFile)
                        else errno.ENOTEMPTY if x.entries else None)
                try:
                    await fs.rmdir(dino, name)
                except OSError as e:
                    assert e.errno == want, (op, e)
                    return
                assert want is None, op
                del d.entries[name]
            elif op == "rename":
                nd = self._pick_dir(j)
                nn = NAMES[s % len(NAMES)]
                fl = [0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE][flags]
                try:
                    model_rename(m, d, name, nd, nn, fl)
                    want = None
                except Err as e:
                    want = e.code
                try:
                    await fs.rename(dino, name, self.ino[id(nd)], nn, fl)
                except OSError as e:
                    assert e.errno == want, (op, e)
                    return
                assert want is None, (op, want)
            elif op == "link":
                if not files:
                    return
                f = files[j % len(files)]
                want = errno.EEXIST if name in d.entries else None
                try:
                    await fs.link(self.ino[id(f)], dino, name)
                except OSError as e:
                    assert e.errno == want, (op, e)
                    return
                assert want is None, op
                d.entries[name] = f
                f.nlink += 1
            elif op == "remount":
                await fs.unmount()
                self.fs = await Filesystem.mount(fs.dev)
            elif op == "fsync":
                await fs.fsync()
        finally:
            # drop model files with no names left
            pass


async def run_sequence(path: str, ops) -> None:
    dev = FileBlockDevice(path)
    fs = await Filesystem.mount(dev)
    r = Runner(fs)
    await r.start()
    for op in ops:
        await r.step(*op)
    await r.compare_tree()
    await r.fs.unmount()
    r.fs = await Filesystem.mount(dev)
    await r.compare_tree()
    await r.fs.unmount()
    await dev.close()
    problems = await check_image(path)
    assert not problems, problems


def _run(tmp_path_factory, ops):
    path = str(tmp_path_factory.mktemp("model") / "v.img")
    make_image(path, 32 << 20)
    trio.run(format_image, path, )
    trio.run(run_sequence, path, ops)
    os.unlink(path)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(op_strategy, min_size=1, max_size=60))
# RENAME_EXCHANGE of a directory with a missing name inside itself: ENOENT
# (the missing target) before EINVAL (the loop), as Linux orders them
@example(ops=[("create", 0, 0, 0, 0, 0), ("mkdir", 1, 0, 0, 0, 0),
              ("rename", 1, 20, 0, 0, 3)])
# RENAME_NOREPLACE of a directory onto an existing name inside itself:
# EEXIST before EINVAL (the loop), as Linux orders them
@example(ops=[("create", 0, 0, 0, 0, 0)] * 14 + [("mkdir", 1, 0, 2, 0, 0),
              ("create", 8, 0, 0, 0, 0), ("rename", 1, 2, 2, 0, 2)])
def test_model_random_sequences(tmp_path_factory, ops):
    _run(tmp_path_factory, ops)


@pytest.mark.soak
@settings(max_examples=soak.size(1000, 10), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(ops=st.lists(op_strategy, min_size=1, max_size=soak.size(300, 60)))
def test_model_random_sequences_soak(tmp_path_factory, ops):
    _run(tmp_path_factory, ops)
