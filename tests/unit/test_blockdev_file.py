"""FileBlockDevice: what each way of reading returns, and which reads
need a worker thread (large reads from the page cache do not)."""
from __future__ import annotations

import os

import pytest
import trio

from replfs.blockdev import FileBlockDevice


@pytest.fixture
def backing(tmp_path):
    p = tmp_path / "disk"
    data = os.urandom(1 << 20)
    p.write_bytes(data)
    return str(p), data


def _count_threads(monkeypatch) -> list:
    calls = []
    real = trio.to_thread.run_sync

    async def counting(fn, *a, **kw):
        calls.append(fn)
        return await real(fn, *a, **kw)
    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    return calls


def test_large_read_from_the_page_cache_needs_no_thread(backing, monkeypatch):
    path, data = backing
    calls = _count_threads(monkeypatch)

    async def main():
        dev = FileBlockDevice(path)
        try:
            with open(path, "rb") as f:
                f.read()                 # in the page cache now
            assert await dev.read(4096, 512 << 10) == data[4096:4096 + (512 << 10)]
            assert calls == []
            # the end of the device: a short read, as documented
            assert await dev.read(len(data) - 100000, 200000) == data[-100000:]
            assert calls == []
        finally:
            await dev.close()
    trio.run(main)


def test_large_read_not_in_the_page_cache_goes_to_a_thread_and_reads_right(backing,
                                                                            monkeypatch):
    path, data = backing
    calls = _count_threads(monkeypatch)

    async def main():
        dev = FileBlockDevice(path)
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            got = await dev.read(0, 768 << 10)
            assert got == data[:768 << 10]
            if dev._nowait:
                # the page cache was dropped: RWF_NOWAIT refused and a
                # thread read it (some filesystems keep pages anyway)
                assert len(calls) <= 1
        finally:
            await dev.close()
    trio.run(main)


def test_a_file_that_refuses_nowait_falls_back_for_good(backing, monkeypatch):
    path, data = backing
    calls = _count_threads(monkeypatch)

    def refuse(*a, **kw):
        raise OSError(95, "Operation not supported")
    monkeypatch.setattr(os, "preadv", refuse)

    async def main():
        dev = FileBlockDevice(path)
        try:
            assert await dev.read(0, 256 << 10) == data[:256 << 10]
            assert not dev._nowait and len(calls) == 1
            assert await dev.read(0, 256 << 10) == data[:256 << 10]
            assert len(calls) == 2
        finally:
            await dev.close()
    trio.run(main)


def test_frozen_keeps_immutable_data_and_copies_the_rest():
    from replfs.blockdev import frozen
    b = b"abc" * 1000
    assert frozen(b) is b
    v = memoryview(b)[3:9]
    assert frozen(v) is v
    ba = bytearray(b)
    got = frozen(ba)
    assert type(got) is bytes and got == b
    ba[0] = 0
    assert got[0] == ord("a")
    mv = memoryview(ba)[:3]
    assert type(frozen(mv)) is bytes
