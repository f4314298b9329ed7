"""The local backing disk and its meta-data, as the resource driver uses them.

``LocalDisk`` owns the data area (a FileBlockDevice limited to the usable
size), the meta-data area (internal or external), the superblock, the
bitmap and the activity log, and knows how to persist each of them.
``create_md`` writes fresh meta-data (replfsadm create-md).

Finding the superblock.  Internal meta-data sits at the end of the
backing disk, so a disk that grew (``truncate``, ``lvextend``) no longer
has it at the end until ``replfsadm resize`` moves it there.  As DRBD
keeps a "last known backing device size" file, replfs keeps, per backing
disk, the sizes at whose end a valid superblock may sit (``size hints``
under $REPLFS_STATEDIR, /var/lib/replfs by default).  An online grow adds
the new size before it writes anything at the new place and leaves only
the new size once the new superblock is durable; attach looks at the end
of the disk first, then at the end of each hinted size, largest first,
and takes the first superblock that is valid and records its own place.
After a crash between the two writes of a grow, that is the old one (the
new one is not there yet, or torn and failing its CRC) or the new one:
never a mixture, since the new meta-data area lies wholly past the old.
"""
from __future__ import annotations

import hashlib
import logging
import os
import secrets

from replfs.blockdev import FileBlockDevice
from replfs.errors import EXIT_CONFIG, EXIT_EXEC, ReplfsError

from ..conf.model import Host
from ..core.actlog import BLOCKS_PER_EXTENT, ActivityLog
from ..core.bitmap import Bitmap
from ..core.uuids import Uuids
from ..meta import format as md

log = logging.getLogger("replfs.blockrepl")


def _size_of(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def layout_for(host: Host) -> tuple[str, md.Layout]:
    """(meta-data path, layout) for a host section, from the disk sizes."""
    if not os.path.exists(host.disk):
        raise ReplfsError(f"{host.disk}: backing disk does not exist", EXIT_CONFIG)
    size = _size_of(host.disk)
    try:
        if host.meta_disk.internal:
            return host.disk, md.internal_layout(size)
        assert host.meta_disk.path is not None
        return host.meta_disk.path, md.external_layout(size, host.meta_disk.index)
    except md.MetaDataError as e:
        raise ReplfsError(f"{host.disk}: {e}", EXIT_CONFIG) from None


def _hints_path(disk: str) -> str:
    state = os.environ.get("REPLFS_STATEDIR") or "/var/lib/replfs"
    key = hashlib.sha256(os.path.realpath(disk).encode()).hexdigest()[:20]
    return os.path.join(state, f"lkbd-{key}")


def read_size_hints(disk: str) -> list[int]:
    """The backing-disk sizes at whose end a valid superblock may sit."""
    try:
        with open(_hints_path(disk)) as f:
            return sorted({int(w) for w in f.read().split() if w.isdigit()}, reverse=True)
    except (OSError, ValueError):
        return []


def write_size_hints(disk: str, sizes: list[int]) -> None:
    """Record ``sizes`` for ``disk`` durably (replaced atomically); a
    failure is logged: only finding meta-data after a grow depends on it."""
    path = _hints_path(disk)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(f"# last known sizes of {os.path.realpath(disk)}\n")
            f.write("".join(f"{n}\n" for n in sorted(set(sizes), reverse=True)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        log.warning("%s: cannot record its size in %s: %s", disk, path, e)


def find_superblock(host: Host) -> tuple[md.Superblock, int]:
    """The valid superblock of ``host``'s meta-data and the size of the
    disk it sits at the end of (internal; see the module docstring)."""
    path, lay = layout_for(host)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = os.pread(fd, md.SUPERBLOCK_SIZE, lay.sb_offset)
        try:
            sb = md.decode_superblock(raw, internal=lay.internal)
            if not lay.internal or sb.layout.sb_offset == lay.sb_offset:
                return sb, lay.total_size
            raise md.MetaDataError("the superblock at the end of the disk records "
                                   "another place")
        except md.MetaDataError as e:
            if not lay.internal:
                raise
            first = e
        for size in read_size_hints(host.disk):
            size -= size % md.BLOCK
            if size >= lay.total_size or size < 2 * md.SUPERBLOCK_SIZE:
                continue
            off = size - md.SUPERBLOCK_SIZE
            try:
                sb = md.decode_superblock(os.pread(fd, md.SUPERBLOCK_SIZE, off))
            except md.MetaDataError:
                continue
            if sb.layout.sb_offset == off and sb.layout.total_size == size:
                return sb, size
        raise first
    finally:
        os.close(fd)


def read_superblock(host: Host) -> md.Superblock:
    return find_superblock(host)[0]


def create_md(host: Host, *, force: bool = False, al_extents: int = 1237) -> list[str]:
    """Write fresh meta-data for ``host``; returns the lines to print.

    Refuses to overwrite valid meta-data or a disk holding a filesystem
    unless ``force``; the message says what was found and how to override.
    """
    path, lay = layout_for(host)
    lines = []
    try:
        old = read_superblock(host)
    except md.MetaDataError:
        old = None
        lines.append("replfs meta-data magic number not found")
    if old is not None and not force:
        raise ReplfsError(
            f"{host.disk}: valid replfs meta-data found (current UUID "
            f"{old.uuids.current:016X}); refusing to overwrite it.\n"
            f"Use 'replfsadm create-md --force' to destroy it.", EXIT_EXEC)
    if host.meta_disk.internal and old is None:
        fd = os.open(host.disk, os.O_RDONLY | os.O_CLOEXEC)
        try:
            head = os.pread(fd, 65536 + 128, 0)
            tail_area = os.pread(fd, lay.md_size, lay.bm_offset)
        finally:
            os.close(fd)
        fs = md.filesystem_signature(head)
        if fs and not force:
            raise ReplfsError(
                f"{host.disk}: the device holds a {fs} filesystem at its start.\n"
                f"Internal meta-data would overwrite its last "
                f"{lay.md_size // 1024} KiB and shrink it to {lay.data_size // 1024} KiB.\n"
                f"Use 'replfsadm create-md --force' if you are sure.", EXIT_EXEC)
        if fs and any(tail_area):
            lines.append(f"warning: overwriting the end of a {fs} filesystem")
    sb = md.Superblock(lay.data_size, Uuids(), 0, secrets.randbits(63) << 1,
                       al_extents, lay)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        lines.append("Writing meta data...")
        os.pwrite(fd, bytes(md.AL_AREA), lay.al_offset)
        lines.append("initializing activity log")
        zero = bytes(md.BLOCK * 16)
        for off in range(0, lay.bm_bytes, len(zero)):
            os.pwrite(fd, zero[:min(len(zero), lay.bm_bytes - off)], lay.bm_offset + off)
        lines.append("initializing bitmap (%d KB) to all zero" % (lay.bm_bytes // 1024))
        os.pwrite(fd, md.encode_superblock(sb), lay.sb_offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    lines.append("New replfs meta data block successfully created.")
    lines.append("success")
    return lines


class LocalDisk:
    """An attached backing disk: data, superblock, bitmap and activity log."""

    engine_disk = None

    def __init__(self, host: Host, al_extents: int):
        self.host = host
        self.md_path, now = layout_for(host)
        try:
            self.sb, _at = find_superblock(host)
        except md.MetaDataError as e:
            raise ReplfsError(
                f"{host.disk}: {e}\nRun 'replfsadm create-md' first.", EXIT_EXEC) from None
        # The superblock's own record of where things are (an online grow
        # may have left the usable size below what the disk allows).
        self.layout = self.sb.layout
        real = _size_of(host.disk)
        if self.layout.total_size > real:
            raise ReplfsError(
                f"{host.disk}: meta-data says the disk has {self.layout.total_size} bytes "
                f"but it now has {real}; shrinking is not supported", EXIT_EXEC)
        if now.total_size > self.layout.total_size:
            log.warning("%s: the backing disk grew from %d to %d bytes; 'replfsadm resize' "
                        "makes the new space usable", host.disk, self.layout.total_size,
                        now.total_size)
        if self.layout.internal and read_size_hints(host.disk) != [self.layout.total_size]:
            write_size_hints(host.disk, [self.layout.total_size])
        self.data = FileBlockDevice(host.disk, self.sb.data_size)
        self.meta = FileBlockDevice(self.md_path)
        self._bitmap: Bitmap | None = None
        # Once attached, the mirror engine owns the meta-data in memory
        # (engine.Disk); sb and bitmap are then its.
        self.engine_disk = None
        self.al_extents_on_disk: list[int] = []
        self.al = ActivityLog(min(al_extents, 3000))
        self._al_seq = 0
        self.crashed_primary = False
        # Counters for the al and bm fields of /proc/drbd.
        self.al_writes = 0
        self.bm_writes = 0

    @property
    def sb(self) -> md.Superblock:
        return self.engine_disk.sb if self.engine_disk is not None else self._sb

    @sb.setter
    def sb(self, value: md.Superblock) -> None:
        self._sb = value

    @property
    def bitmap(self) -> Bitmap | None:
        return self.engine_disk.bitmap if self.engine_disk is not None else self._bitmap

    @bitmap.setter
    def bitmap(self, value: Bitmap | None) -> None:
        self._bitmap = value

    async def load(self, *, mark_al: bool = True) -> None:
        """Read the bitmap and the activity log.  ``mark_al`` (a crash
        view): if the node went down as Primary, mark every hot extent out
        of sync, as the engine does at attach."""
        lay = self.layout
        raw = await self.meta.read(lay.bm_offset, lay.bm_bytes)
        self.bitmap = Bitmap(lay.nblocks, raw)
        seq, extents = md.decode_al_area(await self.meta.read(lay.al_offset, md.AL_AREA))
        self._al_seq = seq
        self.al_extents_on_disk = list(extents)
        if mark_al and self.sb.has(md.F_PRIMARY):
            # We went down while Primary: blocks of every hot extent may
            # differ from the peer's copy.
            self.crashed_primary = True
            for e in extents:
                first = e * BLOCKS_PER_EXTENT
                if first < lay.nblocks:
                    self.bitmap.set_range(first, min(BLOCKS_PER_EXTENT, lay.nblocks - first))
            if extents:
                log.warning("%s: was Primary when it went down; marking %d activity-log "
                            "extents out of sync", self.host.disk, len(extents))
            await self.write_bitmap()

    async def write_superblock(self, sb: md.Superblock | None = None) -> None:
        if sb is not None:
            self.sb = sb
        await self.meta.write(self.layout.sb_offset, md.encode_superblock(self.sb))
        await self.meta.flush()

    async def write_bitmap(self, *, flush: bool = True) -> None:
        assert self.bitmap is not None
        pages = self.bitmap.take_dirty_pages()
        for index, data in pages:
            await self.meta.write(self.layout.bm_offset + index * md.BLOCK, data)
            self.bm_writes += 1
        if pages and flush:
            await self.meta.flush()

    async def write_al(self) -> None:
        """Persist the hot extent set (one AL transaction).

        The bitmap goes first: an extent that just left the hot set is no
        longer covered by the activity log after a crash, so its bits must
        already be on disk.
        """
        await self.write_bitmap(flush=True)
        self._al_seq += 1
        offset, rec = md.encode_al_record(self._al_seq, self.al.extents)
        await self.meta.write(self.layout.al_offset + offset, rec)
        await self.meta.flush()
        self.al_writes += 1

    async def persist(self, pages, al_extents, sb) -> None:
        """The engine's PersistMeta: preflush the data, then the bitmap
        pages, the activity-log record and the superblock, then flush."""
        await self.data.flush()
        lay = self.layout
        # Each part durable before the next: a crash (or a power failure,
        # which keeps no order between unflushed writes) may stop between
        # them, but never leaves an activity log or superblock that
        # vouches for bits that were not written.
        if pages:
            for index, page in pages:
                await self.meta.write(lay.bm_offset + index * md.BLOCK, page)
                self.bm_writes += 1
            await self.meta.flush()
        if al_extents is not None:
            self._al_seq += 1
            offset, rec = md.encode_al_record(self._al_seq, list(al_extents))
            await self.meta.write(lay.al_offset + offset, rec)
            self.al_writes += 1
            await self.meta.flush()
        if sb is not None:
            await self.meta.write(lay.sb_offset, md.encode_superblock(sb))
            await self.meta.flush()

    async def grow(self, layout: md.Layout, bitmap: bytes, al_extents, sb) -> None:
        """The engine's GrowMeta: move the meta-data to ``layout`` and let
        data I/O reach the new size.  Crash-safe (see the module
        docstring): the size hints first, then bitmap and activity log at
        the new place (all past the old meta-data), flushed, then the new
        superblock, flushed; the old one stays valid until then."""
        old = self.layout
        if layout.internal:
            write_size_hints(self.host.disk, [layout.total_size, old.total_size])
        self.meta.set_size()
        self.data.set_size(old.data_size)
        await self.data.flush()
        bits = bytes(bitmap).ljust(layout.bm_bytes, b"\0")
        step = 1024 * 1024
        for off in range(0, len(bits), step):
            await self.meta.write(layout.bm_offset + off, bits[off:off + step])
        self.bm_writes += len(bits) // md.BLOCK
        self._al_seq += 1
        offset, rec = md.encode_al_record(self._al_seq, list(al_extents))
        area = bytearray(md.AL_AREA)
        area[offset:offset + len(rec)] = rec
        await self.meta.write(layout.al_offset, bytes(area))
        self.al_writes += 1
        await self.meta.flush()
        await self.meta.write(layout.sb_offset, md.encode_superblock(sb))
        await self.meta.flush()
        self.layout = layout
        self.data.set_size(layout.data_size)
        if layout.internal:
            write_size_hints(self.host.disk, [layout.total_size])

    async def close(self) -> None:
        await self.data.close()
        await self.meta.close()
