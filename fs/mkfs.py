"""mkfs.replfs: lay out a new replfs volume.

The layout is the one ``Filesystem.mount`` reads (see docs/fs-format.md):

* the primary superblock at byte 8192, backups at 1, 4, 16, 64, 256 GiB
  and 1 TiB when the volume reaches that far;
* one group descriptor (header + bitmap of its clusters) per allocation
  group: group 0's right after the primary superblock, every other
  group's in the first block of the group's first cluster;
* the clusters before group 0's descriptor ends (reserved), every group
  descriptor cluster and every backup superblock cluster are marked used;
* per slot: a contiguous journal (journal superblock first), a local
  allocation block (empty window) and an orphan directory;
* the slot map (every slot free), the root directory and lost+found.

The superblock records the o2cb cluster the volume is made for
(``--cluster-name``, as mkfs.ocfs2); a shared mount on a node whose
online cluster has another name is refused.  For a resource target the
default is the cluster online on this node, asked of replfsd
("cluster-status"); with no answer or no cluster online the volume gets
no name.

System directories are built with the same cache, allocator and
directory code the filesystem uses, so mkfs cannot drift from the core.

Exit codes of the command (as mkfs.ocfs2 / e2fsprogs): 0 success, 1 any
failure -- bad command line, unusable target, target holds a filesystem
without -F, I/O error, the daemon refusing the resource.  argparse's own
usage errors are mapped to 1 as well, so every failure is 1.
"""
from __future__ import annotations

import argparse
import errno
import os
import random
import stat
import sys
import time
import uuid as uuidlib

import trio

from . import format as F
from .alloc import Allocator
from .cache import MetaCache
from .dirs import Directories
from .extents import ExtentMaps

PROG = "mkfs.replfs"
MIN_JOURNAL_BLOCKS = 1024
MIN_VOLUME = 16 << 20
STATUS_TIMEOUT = 10.0            # seconds to wait for replfsd's cluster-status


class MkfsError(Exception):
    """A refusal with a message for the user."""


def parse_size(text: str) -> int:
    """'4096', '64K', '16M', '2G', '1T' -> bytes."""
    t = text.strip().upper()
    if t.endswith("B") and len(t) > 1 and t[-2] in "KMGT":
        t = t[:-1]
    mult = 1
    if t and t[-1] in "KMGT":
        mult = 1 << (10 * ("KMGT".index(t[-1]) + 1))
        t = t[:-1]
    try:
        val = int(t)
    except ValueError:
        raise MkfsError(f"invalid size '{text}'") from None
    if val <= 0:
        raise MkfsError(f"invalid size '{text}'")
    return val * mult


def _log2(n: int) -> int:
    return n.bit_length() - 1


def default_journal_size(volume: int, slots: int) -> int:
    """Per-slot journal size: 1/64 of the volume, 4 MiB .. 64 MiB, but the
    journals together never more than a quarter of the volume."""
    size = min(64 << 20, max(4 << 20, volume // 64))
    return min(size, volume // (4 * slots))


def _mark(groups: list[F.GroupDesc], cpg: int, cl: int) -> None:
    g = groups[cl // cpg]
    bit = cl % cpg
    if not g.test(bit):
        g.set(bit)
        g.free -= 1


def _find_run(groups: list[F.GroupDesc], cpg: int, want: int) -> int:
    """First-fit run of ``want`` free clusters inside one group."""
    for g in groups:
        if g.free < want:
            continue
        run = 0
        for bit in range(g.nbits):
            if g.test(bit):
                run = 0
                continue
            run += 1
            if run == want:
                return g.group * cpg + bit - want + 1
    raise MkfsError("volume too small for the requested journals")


async def _write_home(dev, cache: MetaCache) -> None:
    images, _ = cache.take_transaction()
    for blk in sorted(images):
        await dev.write(blk * cache.bs, images[blk])


def _new_dir(cache: MetaCache, alloc: Allocator, shift: int, *, mode: int, parent: int | None,
             now: int, flags: int = F.INODE_FLAG_VALID) -> F.Inode:
    cl, _ = alloc.alloc(1)
    if alloc.sb.feat_incompat & F.FEATURE_INCOMPAT_WIDE_TIME:
        flags |= F.INODE_FLAG_WIDE_TIME
    ino = F.Inode(cl << shift, mode=stat.S_IFDIR | mode, nlink=2, flags=flags,
                  generation=random.getrandbits(32), atime_ns=now, mtime_ns=now,
                  ctime_ns=now)
    ino.parent = ino.ino if parent is None else parent
    cache.new(ino.ino, ino, ino.ino)
    return ino


def check_params(slots: int, block_size: int, cluster_size: int | None, label: str) -> int:
    """Validate the geometry parameters; returns the cluster size to use."""
    if block_size not in F.BLOCK_SIZES:
        raise MkfsError(f"invalid block size {block_size} (one of "
                        f"{', '.join(map(str, F.BLOCK_SIZES))})")
    if cluster_size is None:
        cluster_size = max(block_size, 4096)
    if cluster_size & (cluster_size - 1) or not block_size <= cluster_size <= (1 << 20):
        raise MkfsError(f"invalid cluster size {cluster_size} (a power of two from "
                        f"the block size up to 1M)")
    if not 1 <= slots <= F.max_slots_for(block_size):
        raise MkfsError(f"invalid number of node slots {slots} "
                        f"(1 to {F.max_slots_for(block_size)})")
    label_b = label.encode()
    if len(label_b) > 64:
        raise MkfsError("label longer than 64 bytes")
    return cluster_size


def check_cluster_name(name: str) -> str:
    """``name`` if a superblock can hold it as the cluster name, else MkfsError."""
    try:
        return F.check_cluster_name(name)
    except ValueError as e:
        raise MkfsError(str(e)) from None


def cluster_stack_line(cluster_name: str) -> str:
    if cluster_name:
        return f"Cluster stack: o2cb (cluster {cluster_name})"
    return "Cluster stack: o2cb (no cluster name: any cluster may mount it on both nodes)"


async def make_filesystem(dev, *, slots: int = 4, block_size: int = 4096,
                          cluster_size: int | None = None, label: str = "",
                          journal_size: int | None = None, force: bool = False,
                          out=print, wide_time: bool = True,
                          cluster_name: str = "") -> F.Superblock:
    """Format ``dev`` (a BlockDevice) and return the new superblock.

    ``cluster_name`` is the o2cb cluster the volume is made for ("" for
    none); this function asks nobody for a default.

    ``wide_time=False`` makes a volume of the format before the wide-time
    feature (tests of old volumes use it; the command line has no switch).

    ``force`` only matters to the command-line checks (existing
    filesystem, mounted target); this function formats whatever it gets.
    ``out`` receives each progress line (``None`` for silence).  Raises
    MkfsError on a bad parameter or a volume too small to hold the layout.
    """
    del force
    say = out or (lambda *_: None)
    cluster_size = check_params(slots, block_size, cluster_size, label)
    if cluster_name:
        check_cluster_name(cluster_name)
    bs, cs = block_size, cluster_size
    bbits, cbits = _log2(bs), _log2(cs)
    shift = cbits - bbits
    bpc = 1 << shift
    volume = dev.size
    if volume < MIN_VOLUME:
        raise MkfsError(f"volume of {volume} bytes is too small (at least {MIN_VOLUME >> 20} MiB)")
    total_clusters = volume // cs
    total_blocks = total_clusters * bpc
    cpg = F.clusters_per_group(bs)
    ngroups = -(-total_clusters // cpg)

    jsize = default_journal_size(volume, slots) if journal_size is None else journal_size
    jclusters = -(-jsize // cs)
    jblocks = jclusters * bpc
    if jblocks < MIN_JOURNAL_BLOCKS:
        if journal_size is not None:
            raise MkfsError(f"journal of {jsize} bytes is too small "
                            f"(at least {MIN_JOURNAL_BLOCKS} blocks of {bs} bytes)")
        jclusters = -(-MIN_JOURNAL_BLOCKS // bpc)
        jblocks = jclusters * bpc
    if jclusters > cpg - 1:
        if journal_size is not None:
            raise MkfsError(f"journal of {jsize} bytes is larger than an allocation group "
                            f"({(cpg - 1) * cs} bytes with this block and cluster size)")
        jclusters = cpg - 1
        jblocks = jclusters * bpc
    if jclusters * slots * 2 > total_clusters:
        raise MkfsError(f"volume too small for {slots} journals of {jclusters * cs} bytes")

    uuid = uuidlib.uuid4().bytes
    volid = int.from_bytes(uuid[:4], "little") or 1
    tail = total_clusters - (ngroups - 1) * cpg

    say(f"{PROG} {_version()}")
    say(cluster_stack_line(cluster_name))
    say(f"Label: {label}")
    say(f"Block size: {bs} ({bbits} bits)")
    say(f"Cluster size: {cs} ({cbits} bits)")
    say(f"Volume size: {total_clusters * cs} ({total_clusters} clusters) ({total_blocks} blocks)")
    if ngroups == 1:
        say(f"Cluster groups: 1 (tail covers {tail} clusters)")
    else:
        say(f"Cluster groups: {ngroups} (tail covers {tail} clusters, rest cover {cpg} clusters)")
    say(f"Journal size: {jblocks * bs}")
    say(f"Node slots: {slots}")

    # Whatever superblock the device held goes first, so a crash while we
    # format never leaves an old superblock over a half-written layout.
    await dev.write(F.SB_OFFSET, bytes(bs))

    # ---- bitmaps, in memory first
    groups = []
    for g in range(ngroups):
        nbits = min(cpg, total_clusters - g * cpg)
        groups.append(F.GroupDesc(g, nbits, nbits, bytearray((nbits + 7) // 8)))
    sb_blk = F.sb_blkno(bs)
    reserved = ((sb_blk + 1) // bpc) + 1          # clusters up to group 0's descriptor
    for cl in range(reserved):
        _mark(groups, cpg, cl)
    for g in range(1, ngroups):
        _mark(groups, cpg, g * cpg)
    backups = F.backup_sb_blknos(bs, total_blocks)
    for blk in backups:
        _mark(groups, cpg, blk // bpc)
    slot_infos = []
    for _ in range(slots):
        jstart = _find_run(groups, cpg, jclusters)
        for cl in range(jstart, jstart + jclusters):
            _mark(groups, cpg, cl)
        slot_infos.append([jstart * bpc, jblocks, 0, 0])
    for info in slot_infos:
        cl = _find_run(groups, cpg, 1)
        _mark(groups, cpg, cl)
        info[2] = cl * bpc
    slotmap_cl = _find_run(groups, cpg, 1)
    _mark(groups, cpg, slotmap_cl)

    sb = F.Superblock(
        uuid=uuid, label=label, block_bits=bbits, cluster_bits=cbits,
        total_blocks=total_blocks, total_clusters=total_clusters, slot_count=slots,
        cpg=cpg, group_count=ngroups, root_ino=0, slotmap_blk=slotmap_cl * bpc,
        reserved_clusters=reserved, created_ns=time.time_ns(),
        slots=[F.SlotInfo(*info) for info in slot_infos], volid=volid,
        cluster_name=cluster_name)
    if not wide_time:
        sb.feat_incompat &= ~F.FEATURE_INCOMPAT_WIDE_TIME
    for g in groups:
        blk = F.group_desc_blkno(sb, g.group)
        await dev.write(blk * bs, g.encode(bs, volid, blk))
    say("Creating bitmaps: done")
    say("Initializing superblock: done")

    # ---- system files
    for info in sb.slots:
        la = F.LocalAlloc(info.localalloc_blk)
        await dev.write(la.blkno * bs, la.encode(bs, volid))
    sm = F.SlotMap(sb.slotmap_blk, [(F.SLOT_FREE, 0, 0)] * slots)
    await dev.write(sm.blkno * bs, sm.encode(bs, volid))
    cache = MetaCache(dev, sb)
    alloc = Allocator(cache, sb, 0)
    await alloc.load()
    ext = ExtentMaps(cache, alloc, sb)
    dirs = Directories(cache, alloc, ext, sb)
    now = time.time_ns()
    root = _new_dir(cache, alloc, shift, mode=0o755, parent=None, now=now)
    await dirs.init(root)
    sb.root_ino = root.ino
    for info in sb.slots:
        od = _new_dir(cache, alloc, shift, mode=0o700, parent=None, now=now,
                      flags=F.INODE_FLAG_VALID | F.INODE_FLAG_SYSTEM)
        await dirs.init(od)
        info.orphan_ino = od.ino
    alloc.release_window()
    await _write_home(dev, cache)
    say("Writing system files: done")

    await _write_superblocks(dev, sb, [])
    say("Writing superblock: done")
    await _write_superblocks(dev, sb, backups, primary=False)
    say(f"Writing backup superblock: {len(backups)} block(s)")

    for info in sb.slots:
        js = F.JournalSuper(info.journal_start, 0, 1, info.journal_blocks)
        await dev.write(info.journal_start * bs, js.encode(bs, volid))
        # The first record block is zeroed so nothing stale there can look
        # like a transaction (the volume id check already rejects records
        # of an earlier filesystem; this is belt and braces).
        await dev.write((info.journal_start + 1) * bs, bytes(bs))
    say("Formatting Journals: done")

    await alloc.load()
    lf = _new_dir(cache, alloc, shift, mode=0o700, parent=root.ino, now=now)
    await dirs.init(lf)
    await dirs.insert(root, b"lost+found", lf.ino, F.FT_DIR)
    root.nlink += 1
    cache.mark(root.ino, root)
    alloc.release_window()
    await _write_home(dev, cache)
    sb.lostfound_ino = lf.ino
    await _write_superblocks(dev, sb, backups)
    await dev.flush()
    say("Writing lost+found: done")
    say(f"{PROG} successful")
    return sb


async def _write_superblocks(dev, sb: F.Superblock, backups: list[int], *,
                             primary: bool = True) -> None:
    bs = sb.block_size
    blks = ([F.sb_blkno(bs)] if primary else []) + list(backups)
    for blk in blks:
        await dev.write(blk * bs, sb.encode(blk))


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("replfs")
    except Exception:
        return "0.1.0"


# ------------------------------------------------------------------ command line

def detect_signature(head: bytes, probe) -> str | None:
    """Name of a filesystem whose signature ``head`` (the device's first
    bytes) carries, or None.  ``probe(offset, length)`` reads more."""
    if head[F.SB_OFFSET:F.SB_OFFSET + 8] == F.SIG_SUPER:
        return "a replfs filesystem"
    if head[1080:1082] == b"\x53\xef":
        return "an ext2/ext3/ext4 filesystem"
    if head[:4] == b"XFSB":
        return "an XFS filesystem"
    if probe(0x10040, 8) == b"_BHRfS_M":
        return "a btrfs filesystem"
    for bs in (512, 1024, 2048, 4096):
        if probe(2 * bs, 6) == b"OCFSV2":
            return "an OCFS2 filesystem"
    if head[:6] == b"LUKS\xba\xbe":
        return "a LUKS container"
    if head[4086:4096] in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return "swap space"
    if probe(32769, 5) == b"CD001":
        return "an ISO 9660 filesystem"
    if head[510:512] == b"\x55\xaa" and (head[82:87] == b"FAT32"
                                          or head[54:59] in (b"FAT12", b"FAT16")):
        return "a FAT filesystem"
    return None


def mounted_source(path: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Mount point where ``path`` is mounted as a source, or None."""
    try:
        real = os.path.realpath(path)
        with open(mountinfo) as f:
            lines = f.readlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        rest = right.split()
        if len(fields) < 5 or len(rest) < 2:
            continue
        src = rest[1].replace("\\040", " ")
        if src == path or (src.startswith("/") and os.path.realpath(src) == real):
            return fields[4].replace("\\040", " ")
    return None


def _probe_file(path: str):
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def probe(off: int, n: int) -> bytes:
        return os.pread(fd, n, off)
    return fd, probe


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        raise MkfsError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Create a replfs cluster filesystem on a file, "
                "a device, or a replicated resource of replfs.conf (node must be Primary).",
                epilog="Exit status: 0 success, 1 failure (including usage errors).")
    p.add_argument("-N", "--node-slots", dest="slots", type=int, default=4, metavar="SLOTS",
                   help="number of node slots (nodes that can mount at once; default 4)")
    p.add_argument("-b", "--block-size", dest="block_size", default="4096", metavar="SIZE",
                   help="block size: 512, 1K, 2K, 4K (default) or 8K")
    p.add_argument("-C", "--cluster-size", dest="cluster_size", metavar="SIZE",
                   help="cluster (allocation unit) size, block size .. 1M (default 4K)")
    p.add_argument("-L", "--label", default="", help="volume label (up to 64 bytes)")
    p.add_argument("--cluster-name", dest="cluster_name", metavar="NAME",
                   help="o2cb cluster the volume is for (1-16 ASCII letters, digits, _ "
                   "or -); a shared mount is refused on a node whose online cluster has "
                   "another name.  Default for a resource: the cluster online on this "
                   "node, else none (a node-local volume)")
    p.add_argument("-J", "--journal-options", dest="journal", metavar="size=SIZE",
                   help="journal size per slot, e.g. -J size=16M")
    p.add_argument("-F", "--force", action="store_true",
                   help="format even if the target holds a filesystem or is mounted")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.add_argument("-c", "--config", metavar="FILE",
                   help="resource configuration (default $REPLFS_CONF, else /etc/replfs/replfs.conf)")
    p.add_argument("--rundir", metavar="DIR",
                   help="replfsd's socket directory (default $REPLFS_RUNDIR, else /run/replfs)")
    p.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    p.add_argument("target", metavar="TARGET",
                   help="file, device, or resource name from replfs.conf")
    return p


def _journal_size(opt: str | None) -> int | None:
    if opt is None:
        return None
    size = None
    for part in opt.split(","):
        key, eq, val = part.partition("=")
        if key.strip() == "size" and eq:
            size = parse_size(val)
        else:
            raise MkfsError(f"invalid journal option '{part}' (only size=SIZE is known)")
    return size


def _check_target_file(path: str, force: bool) -> None:
    where = mounted_source(path)
    if where is not None and not force:
        raise MkfsError(f"{path} is mounted on {where}; refusing to format it "
                        f"(-F overrides)")
    fd, probe = _probe_file(path)
    try:
        head = probe(0, F.SB_OFFSET + 8192)
        found = detect_signature(head, probe)
    finally:
        os.close(fd)
    if found and not force:
        raise MkfsError(f"{path} appears to contain {found}; refusing to overwrite it "
                        f"(-F overrides)")


def _resource_exists(name: str, config: str | None) -> tuple[bool, str]:
    path = config or os.environ.get("REPLFS_CONF") or "/etc/replfs/replfs.conf"
    try:
        from replfs.blockrepl import conf
        cfg = conf.load(path)
    except Exception:
        return False, path
    return name in cfg.resources, path


async def _online_cluster(nursery: trio.Nursery, rundir: str | None) -> str:
    """The name of the cluster online on this node, as replfsd reports it;
    "" when no cluster is online or replfsd does not answer."""
    from replfs.errors import ReplfsError
    from replfs.ipc.client import AsyncClient, socket_path
    client = None
    try:
        with trio.move_on_after(STATUS_TIMEOUT):
            client = await AsyncClient.connect(socket_path(rundir), nursery)
            st, _ = await client.call("cluster-status")
            if st.get("online"):
                return str(st.get("cluster") or "")
    except (ReplfsError, OSError):
        pass
    finally:
        if client is not None:
            with trio.CancelScope(shield=True):
                await client.aclose()
    return ""


async def _default_cluster_name(nursery: trio.Nursery, rundir: str | None) -> str:
    name = await _online_cluster(nursery, rundir)
    if name:
        try:
            F.check_cluster_name(name)
        except ValueError as e:
            raise MkfsError(f"cannot record the cluster online on this node: {e} "
                            f"(rename it in cluster.conf, or give --cluster-name)") from None
    return name


async def _run(args, kw) -> None:
    target = args.target
    if os.path.exists(target):
        from replfs.blockdev import FileBlockDevice
        try:
            _check_target_file(target, args.force)
            dev = FileBlockDevice(target)
        except OSError as e:
            raise MkfsError(f"{target}: {e.strerror or e}") from None
        try:
            await make_filesystem(dev, **kw)
        finally:
            await dev.close()
        return
    exists, conf_path = _resource_exists(target, args.config)
    if not exists:
        raise MkfsError(f"{target}: no such file or device, and no resource of that name "
                        f"in {conf_path}")
    from replfs.errors import ReplfsError
    from replfs.ipc.client import DaemonBlockDevice, rundir_from_env
    # Errors are carried out of the nursery: raised inside it they would
    # reach the user as an ExceptionGroup traceback instead of a message.
    error: MkfsError | None = None
    async with trio.open_nursery() as nursery:
        try:
            dev = await DaemonBlockDevice.open(nursery, target,
                                               rundir=rundir_from_env(args.rundir))
        except (ReplfsError, OSError) as e:
            nursery.cancel_scope.cancel()
            error = MkfsError(f"cannot open resource {target}: {e} "
                              f"(is this node Primary? 'replfsadm primary {target}')")
            dev = None
        if dev is not None:
            try:
                if not args.force:
                    head = await dev.read(0, F.SB_OFFSET + 8192)
                    found = detect_signature(
                        head, lambda o, n: head[o:o + n] if o + n <= len(head) else b"")
                    if found:
                        raise MkfsError(f"resource {target} appears to contain {found}; "
                                        f"refusing to overwrite it (-F overrides)")
                if args.cluster_name is None:
                    kw = dict(kw, cluster_name=await _default_cluster_name(
                        nursery, rundir_from_env(args.rundir)))
                await make_filesystem(dev, **kw)
            except MkfsError as e:
                error = e
            except (ReplfsError, OSError) as e:
                error = MkfsError(f"resource {target}: {e}")
            finally:
                with trio.CancelScope(shield=True):
                    await dev.close()
                nursery.cancel_scope.cancel()
    if error is not None:
        raise error


def make_options(args, out) -> dict:
    """make_filesystem's keyword arguments from the command line, checked
    (MkfsError) before anything is opened."""
    kw = dict(slots=args.slots, block_size=parse_size(args.block_size),
              cluster_size=parse_size(args.cluster_size) if args.cluster_size else None,
              label=args.label, journal_size=_journal_size(args.journal),
              force=args.force, out=out)
    kw["cluster_size"] = check_params(kw["slots"], kw["block_size"],
                                      kw["cluster_size"], kw["label"])
    if args.cluster_name is not None:
        kw["cluster_name"] = check_cluster_name(args.cluster_name)
    return kw


def main(argv=None) -> int:
    """Entry point of mkfs.replfs; returns the exit status (0 or 1)."""
    out = print
    try:
        args = build_parser().parse_args(argv)
        trio.run(_run, args, make_options(args, None if args.quiet else out))
        return 0
    except MkfsError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: {e.strerror or e}", file=sys.stderr)
        return 1
    except SystemExit as e:        # --help / --version
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
