"""replfs.fuse.proto: struct layouts against linux/fuse.h, round trips, malformed input."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

from replfs.fuse import proto
from replfs.fuse.api import EntryAttributes
from replfs.fuse.proto import FuseUsageError, KernelProtocolError, Opcode, UnsupportedKernel

HEADER = "/usr/include/linux/fuse.h"

# Field offsets worth pinning (a size can match while a field moved):
# (struct, field) -> (our Struct, index of the field in its format, base)
OFFSETS = {
    ("fuse_in_header", "total_extlen"): (proto.IN_HEADER, 7, 0),
    ("fuse_entry_out", "attr"): (proto.ENTRY_OUT_HEAD, 6, 0),
    ("fuse_attr_out", "attr"): (proto.ATTR_OUT_HEAD, 3, 0),
    ("fuse_attr", "mode"): (proto.ATTR, 9, 0), ("fuse_attr", "blksize"): (proto.ATTR, 14, 0),
    ("fuse_setattr_in", "mode"): (proto.SETATTR_IN, 11, 0),
    ("fuse_setattr_in", "gid"): (proto.SETATTR_IN, 14, 0),
    ("fuse_setattr_in", "lock_owner"): (proto.SETATTR_IN, 4, 0),
    ("fuse_init_out", "max_pages"): (proto.INIT_OUT, 8, 0),
    ("fuse_init_out", "flags2"): (proto.INIT_OUT, 10, 0),
    ("fuse_init_in", "flags2"): (proto.INIT_IN, 4, 0),
    ("fuse_lk_in", "lk_flags"): (proto.LK_IN, 6, 0),
    ("fuse_read_in", "lock_owner"): (proto.READ_IN, 4, 0),
    ("fuse_write_in", "flags"): (proto.WRITE_IN, 5, 0),
    ("fuse_copy_file_range_in", "flags"): (proto.COPY_FILE_RANGE_IN, 6, 0),
    ("fuse_release_in", "lock_owner"): (proto.RELEASE_IN, 3, 0),
    ("fuse_flush_in", "lock_owner"): (proto.FLUSH_IN, 3, 0),
    ("fuse_kstatfs", "frsize"): (proto.KSTATFS, 7, 0),
    ("fuse_fallocate_in", "mode"): (proto.FALLOCATE_IN, 3, 0),
    ("fuse_notify_delete_out", "namelen"): (proto.NOTIFY_DELETE, 2, 0),
}


def _offset(st_, index, base):
    """Byte offset of field ``index`` of a '='-format Struct (pads excluded
    from the count, included in the offset)."""
    import re
    import struct
    fmt = st_.format.lstrip("=")
    parts = re.findall(r"(\d*)([a-zA-Z])", fmt)
    pos, seen = 0, 0
    for count, code in parts:
        n = int(count) if count else 1
        if code == "x":
            pos += n
            continue
        for _ in range(n):
            if seen == index:
                return base + pos
            pos += struct.calcsize("=" + code)
            seen += 1
    return base + pos      # one past the last field: where a nested struct starts


FLAGS = ["ASYNC_READ", "POSIX_LOCKS", "ATOMIC_O_TRUNC", "EXPORT_SUPPORT", "BIG_WRITES",
         "DONT_MASK", "FLOCK_LOCKS", "AUTO_INVAL_DATA", "DO_READDIRPLUS", "READDIRPLUS_AUTO",
         "WRITEBACK_CACHE", "PARALLEL_DIROPS", "HANDLE_KILLPRIV", "POSIX_ACL", "MAX_PAGES",
         "SETXATTR_EXT", "INIT_EXT", "RELEASE_FLOCK_UNLOCK", "GETATTR_FH", "LK_FLOCK",
         "FSYNC_FDATASYNC", "WRITE_KILL_SUIDGID"]
FATTRS = ["MODE", "UID", "GID", "SIZE", "ATIME", "MTIME", "FH", "ATIME_NOW", "MTIME_NOW",
          "LOCKOWNER", "CTIME", "KILL_SUIDGID"]
FOPENS = ["DIRECT_IO", "KEEP_CACHE", "NONSEEKABLE", "CACHE_DIR", "STREAM", "NOFLUSH"]


@pytest.fixture(scope="module")
def kernel_facts(tmp_path_factory):
    """Compile a C program that prints what linux/fuse.h says."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler (gcc) to read linux/fuse.h with")
    if not os.path.exists(HEADER):
        pytest.skip(f"{HEADER} missing (install linux-libc-dev)")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include <linux/fuse.h>',
             'int main(void) {']
    for name in proto.STRUCT_SIZES:
        lines.append(f'printf("size {name} %zu\\n", sizeof(struct {name}));')
    for (s, f) in OFFSETS:
        lines.append(f'printf("off {s}.{f} %zu\\n", offsetof(struct {s}, {f}));')
    for name in proto.COMPAT_SIZES:
        lines.append(f'printf("macro {name} %llu\\n", (unsigned long long)({name}));')
    for op in Opcode:
        lines.append(f'printf("opcode {op.name} %llu\\n", (unsigned long long)FUSE_{op.name});')
    for code in proto.NotifyCode:
        lines.append(f'printf("notify {code.name} %llu\\n", (unsigned long long)FUSE_NOTIFY_{code.name});')
    for f in FLAGS:
        lines.append(f'printf("flag {f} %llu\\n", (unsigned long long)FUSE_{f});')
    for f in FATTRS:
        lines.append(f'printf("fattr {f} %llu\\n", (unsigned long long)FATTR_{f});')
    for f in FOPENS:
        lines.append(f'printf("fopen {f} %llu\\n", (unsigned long long)FOPEN_{f});')
    lines.append('printf("version %d %d\\n", FUSE_KERNEL_VERSION, FUSE_KERNEL_MINOR_VERSION);')
    lines += ["return 0;", "}"]
    d = tmp_path_factory.mktemp("fuseh")
    src, exe = d / "facts.c", d / "facts"
    src.write_text("\n".join(lines))
    subprocess.run([gcc, "-o", str(exe), str(src)], check=True, capture_output=True, timeout=60)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    facts = {}
    for line in out.splitlines():
        parts = line.split()
        facts[(parts[0], parts[1])] = [int(x) for x in parts[2:]]
    return facts


def test_struct_sizes_match_the_header(kernel_facts):
    wrong = {name: (ours, kernel_facts[("size", name)][0])
             for name, ours in proto.STRUCT_SIZES.items()
             if kernel_facts[("size", name)][0] != ours}
    assert not wrong, f"(ours, header) differ: {wrong}"


def test_field_offsets_match_the_header(kernel_facts):
    ours = {k: _offset(*v) for k, v in OFFSETS.items()}
    wrong = {k: (v, kernel_facts[("off", f"{k[0]}.{k[1]}")][0]) for k, v in ours.items()
             if kernel_facts[("off", f"{k[0]}.{k[1]}")][0] != v}
    assert not wrong


def test_constants_match_the_header(kernel_facts):
    for name, size in proto.COMPAT_SIZES.items():
        assert kernel_facts[("macro", name)] == [size], name
    for op in Opcode:
        assert kernel_facts[("opcode", op.name)] == [op.value], op
    for code in proto.NotifyCode:
        assert kernel_facts[("notify", code.name)] == [code.value], code
    for f in FLAGS:
        assert kernel_facts[("flag", f)] == [getattr(proto, f)], f
    for f in FATTRS:
        assert kernel_facts[("fattr", f)] == [getattr(proto, "FATTR_" + f)], f
    for f in FOPENS:
        assert kernel_facts[("fopen", f)] == [getattr(proto, "FOPEN_" + f)], f


def test_header_is_new_enough_for_our_pinned_minor(kernel_facts):
    minor = [v for k, v in kernel_facts.items() if k[0] == "version"][0][0]
    assert minor >= proto.OUR_MINOR


# ----------------------------------------------------------------- negotiation

def _init(minor, flags=0xFFFFFFFF, ra=1 << 17):
    return proto.Init(7, minor, ra, flags, 0)


def test_negotiate_pins_minor_and_intersects_flags():
    n = proto.negotiate(_init(45), want=proto.POSIX_LOCKS | proto.MAX_PAGES | proto.ASYNC_READ)
    assert n.minor == 36 and n.kernel_minor == 45
    assert n.flags == proto.POSIX_LOCKS | proto.MAX_PAGES | proto.ASYNC_READ
    assert n.max_write == 1 << 20 and n.max_pages == 256
    assert n.max_readahead == 1 << 17
    n = proto.negotiate(_init(33, flags=proto.ASYNC_READ), want=proto.POSIX_LOCKS | proto.ASYNC_READ)
    assert n.minor == 33 and n.flags == proto.ASYNC_READ
    # without MAX_PAGES the kernel caps requests at 32 pages
    assert n.max_write == 32 * 4096


def test_negotiate_refuses_old_kernels_clearly():
    with pytest.raises(UnsupportedKernel, match=r"7\.30 is too old.*7\.31.*Linux 5\.4"):
        proto.negotiate(_init(30), want=0)
    with pytest.raises(UnsupportedKernel):
        proto.negotiate(proto.Init(8, 0, 0, 0, 0), want=0)
    with pytest.raises(FuseUsageError):
        proto.negotiate(_init(36), want=0, max_write=1000)


def test_init_out_layout():
    n = proto.negotiate(_init(40), want=proto.MAX_PAGES | proto.BIG_WRITES, max_background=48)
    out = proto.init_out(n)
    assert len(out) == 64
    major, minor, ra, flags, bg, cong, mw, tg, mp, _ma, f2 = proto.INIT_OUT.unpack(out)
    assert (major, minor, flags, bg, cong, mw, mp, f2) == (
        7, 36, proto.MAX_PAGES | proto.BIG_WRITES, 48, 36, 1 << 20, 256, 0)


def test_init_in_compat_and_full():
    full = proto.encode_request(Opcode.INIT, proto.Init(7, 45, 4096, 0x1234, 5))
    h = proto.decode_header(full)
    assert proto.decode_args(h.opcode, proto.body_of(full, h)) == proto.Init(7, 45, 4096, 0x1234, 5)
    old = proto.INIT_IN_COMPAT.pack(7, 31, 4096, 3)
    assert proto.decode_args(Opcode.INIT, old) == proto.Init(7, 31, 4096, 3, 0)


# ----------------------------------------------------------------- round trips

u64 = st.integers(0, 2**64 - 1)
s64 = st.integers(-2**63, 2**63 - 1)
u32 = st.integers(0, 2**32 - 1)
name = st.binary(min_size=1, max_size=255).filter(lambda b: b"\0" not in b and b"/" not in b)
value = st.binary(max_size=300)

ARGS = st.one_of(
    st.builds(lambda n: (Opcode.LOOKUP, proto.Name(n)), name),
    st.builds(lambda n: (Opcode.FORGET, proto.Forget(n)), u64),
    st.builds(lambda items: (Opcode.BATCH_FORGET, proto.BatchForget(tuple(items))),
              st.lists(st.tuples(u64, u64), max_size=20)),
    st.builds(lambda f, fh: (Opcode.GETATTR, proto.Getattr(f, fh)), u32, u64),
    st.builds(lambda *a: (Opcode.SETATTR, proto.Setattr(*a)), u32, u64, u64, u64, s64, s64, s64,
              u32, u32, u32, u32, u32, u32),
    st.builds(lambda a, b: (Opcode.SYMLINK, proto.Symlink(a, b)), name, name),
    st.builds(lambda m, r, u, n: (Opcode.MKNOD, proto.Mknod(m, r, u, n)), u32, u32, u32, name),
    st.builds(lambda m, u, n: (Opcode.MKDIR, proto.Mkdir(m, u, n)), u32, u32, name),
    st.builds(lambda d, a, b: (Opcode.RENAME, proto.Rename(d, 0, a, b)), u64, name, name),
    st.builds(lambda d, f, a, b: (Opcode.RENAME2, proto.Rename(d, f, a, b)), u64, u32, name, name),
    st.builds(lambda o, n: (Opcode.LINK, proto.Link(o, n)), u64, name),
    st.builds(lambda f, o: (Opcode.OPEN, proto.Open(f, o)), u32, u32),
    st.builds(lambda *a: (Opcode.CREATE, proto.Create(*a)), u32, u32, u32, u32, name),
    st.builds(lambda *a: (Opcode.READ, proto.Read(*a)), u64, u64, u32, u32, u64, u32),
    st.builds(lambda fh, off, wf, lo, f, d: (Opcode.WRITE, proto.Write(fh, off, len(d), wf, lo, f, d)),
              u64, u64, u32, u64, u32, value),
    st.builds(lambda *a: (Opcode.RELEASE, proto.Release(*a)), u64, u32, u32, u64),
    st.builds(lambda fh, lo: (Opcode.FLUSH, proto.Flush(fh, lo)), u64, u64),
    st.builds(lambda fh, f: (Opcode.FSYNC, proto.Fsync(fh, f)), u64, u32),
    st.builds(lambda f, n, v: (Opcode.SETXATTR, proto.Setxattr(f, n, v)), u32, name, value),
    st.builds(lambda s, n: (Opcode.GETXATTR, proto.Getxattr(s, n)), u32, name),
    st.builds(lambda s: (Opcode.LISTXATTR, proto.Listxattr(s)), u32),
    st.builds(lambda *a: (Opcode.SETLKW, proto.Lk(*a)), u64, u64, u64, u64, u32, u32, u32),
    st.builds(lambda m: (Opcode.ACCESS, proto.Access(m)), u32),
    st.builds(lambda u: (Opcode.INTERRUPT, proto.Interrupt(u)), u64),
    st.builds(lambda *a: (Opcode.FALLOCATE, proto.Fallocate(*a)), u64, u64, u64, u32),
    st.builds(lambda *a: (Opcode.LSEEK, proto.Lseek(*a)), u64, u64, u32),
    st.builds(lambda *a: (Opcode.COPY_FILE_RANGE, proto.CopyFileRange(*a)), u64, u64, u64, u64,
              u64, u64, u64),
)


@settings(max_examples=300, deadline=None)
@given(ARGS, u64, u64, u32, u32, u32)
def test_requests_round_trip(op_args, unique, nodeid, uid, gid, pid):
    op, args = op_args
    raw = proto.encode_request(op, args, unique=unique, nodeid=nodeid, uid=uid, gid=gid, pid=pid)
    h = proto.decode_header(raw)
    assert (h.opcode, h.unique, h.nodeid, h.uid, h.gid, h.pid, h.length) == (
        op, unique, nodeid, uid, gid, pid, len(raw))
    assert proto.decode_args(op, proto.body_of(memoryview(raw), h)) == args


@settings(max_examples=300, deadline=None)
@given(ARGS, st.data())
def test_truncated_requests_are_kernel_errors_never_crashes(op_args, data):
    op, args = op_args
    raw = proto.encode_request(op, args)
    body = raw[proto.IN_HEADER.size:]
    cut = data.draw(st.integers(0, max(0, len(body) - 1)))
    truncated = body[:cut]
    try:
        got = proto.decode_args(op, truncated)
    except KernelProtocolError:
        return
    # Some prefixes are still valid requests (a shorter name, fewer bytes
    # of an xattr value): only then may it decode, and never to garbage types.
    assert type(got) is type(args)


def test_malformed_inputs():
    raw = proto.encode_request(Opcode.LOOKUP, proto.Name(b"abc"))
    with pytest.raises(KernelProtocolError, match="says"):
        proto.decode_header(raw + b"x")
    with pytest.raises(KernelProtocolError, match="shorter than its header"):
        proto.decode_header(raw[:10])
    with pytest.raises(KernelProtocolError, match="NUL"):
        proto.decode_args(Opcode.LOOKUP, b"abc")
    with pytest.raises(KernelProtocolError, match="entries need"):
        proto.decode_args(Opcode.BATCH_FORGET, proto.BATCH_FORGET_IN.pack(3, 0) + bytes(16))
    with pytest.raises(KernelProtocolError, match="data"):
        proto.decode_args(Opcode.WRITE, proto.WRITE_IN.pack(1, 0, 10, 0, 0, 0, 0) + b"short")
    with pytest.raises(KernelProtocolError, match="need 48"):
        proto.decode_args(Opcode.SETLK, bytes(40))
    with pytest.raises(KernelProtocolError):
        proto.decode_args(Opcode.RENAME, proto.RENAME_IN.pack(1) + b"a\0b")
    # extensions longer than the request
    bad = bytearray(raw)
    proto.IN_HEADER.pack_into(bad, 0, len(raw), Opcode.LOOKUP, 1, 1, 0, 0, 0, 100, 0)
    with pytest.raises(KernelProtocolError, match="extensions"):
        proto.body_of(bad, proto.decode_header(bad))
    assert proto.decode_args(9999, b"") is None     # unknown opcode: the session answers ENOSYS


def test_symlink_order_is_name_then_target():
    a = proto.decode_args(Opcode.SYMLINK, b"link\0/target/path\0")
    assert a == proto.Symlink(b"link", b"/target/path")


# ----------------------------------------------------------------- replies

def _attrs(**kw):
    base = dict(st_ino=5, generation=2, entry_timeout=1.5, attr_timeout=0.25, st_mode=0o100644,
                st_nlink=1, st_uid=1000, st_gid=100, st_rdev=0, st_size=12345, st_blksize=4096,
                st_blocks=32, st_atime_ns=1_700_000_000_123_456_789,
                st_mtime_ns=1_700_000_001_000_000_001, st_ctime_ns=5)
    base.update(kw)
    return EntryAttributes(**base)


def test_entry_and_attr_out():
    e = proto.entry_out(_attrs())
    assert len(e) == proto.ENTRY_OUT_SIZE
    nodeid, gen, ev, av, evn, avn = proto.ENTRY_OUT_HEAD.unpack_from(e)
    assert (nodeid, gen, ev, evn, av, avn) == (5, 2, 1, 500_000_000, 0, 250_000_000)
    attr = proto.ATTR.unpack_from(e, proto.ENTRY_OUT_HEAD.size)
    ino, size, blocks, at, mt, ct, atn, mtn, ctn, mode, nlink, uid, gid, rdev, blksize, flags = attr
    assert (ino, size, blocks, at, atn, mt, mtn, ct, ctn) == (
        5, 12345, 32, 1_700_000_000, 123_456_789, 1_700_000_001, 1, 0, 5)
    assert (mode, nlink, uid, gid, blksize) == (0o100644, 1, 1000, 100, 4096)
    a = proto.attr_out(_attrs())
    assert len(a) == proto.ATTR_OUT_SIZE
    assert proto.ATTR_OUT_HEAD.unpack_from(a) == (0, 250_000_000, 0)
    with pytest.raises(FuseUsageError):
        proto.entry_out(_attrs(st_ino=-1))


def test_times_before_1970_are_signed():
    # utimensat(-0.5 s) arrives as atime -1, atimensec 500000000
    raw = proto.encode_request(Opcode.SETATTR, proto.Setattr(
        proto.FATTR_ATIME, 0, 0, 0, -1, 0, 0, 500_000_000, 0, 0, 0, 0, 0))
    a = proto.decode_args(Opcode.SETATTR, raw[proto.IN_HEADER.size:])
    assert (a.atime, a.atimensec) == (-1, 500_000_000)
    e = proto.entry_out(_attrs(st_atime_ns=-999_999_500))
    f = proto.ATTR.unpack_from(e, proto.ENTRY_OUT_HEAD.size)
    assert (f[3], f[6]) == (-1, 500)


def test_out_header_and_errors():
    assert proto.OUT_HEADER.unpack(proto.out_header(7, errno.ENOENT, 0)) == (16, -errno.ENOENT, 7)
    assert proto.OUT_HEADER.unpack(proto.out_header(7, 0, 100)) == (116, 0, 7)
    with pytest.raises(FuseUsageError):
        proto.out_header(1, 5000, 0)
    with pytest.raises(FuseUsageError):
        proto.out_header(1, errno.EIO, 8)


@given(st.lists(name, min_size=1, max_size=20))
def test_dirents_are_8_byte_aligned_and_parse_back(names):
    blob = b"".join(proto.dirent(i + 10, i + 1, 8, n) for i, n in enumerate(names))
    pos = 0
    for i, n in enumerate(names):
        assert pos % 8 == 0
        ino, off, namelen, typ = proto.DIRENT_HEAD.unpack_from(blob, pos)
        assert (ino, off, typ) == (i + 10, i + 1, 8)
        assert blob[pos + 24:pos + 24 + namelen] == n
        pos += proto.dirent_size(n)
    assert pos == len(blob)


def test_direntplus_layout():
    rec = proto.direntplus(_attrs(), 42, b"hello")
    assert len(rec) == proto.direntplus_size(b"hello") == proto.align8(128 + 24 + 5)
    ino, off, namelen, typ = proto.DIRENT_HEAD.unpack_from(rec, proto.ENTRY_OUT_SIZE)
    assert (ino, off, namelen, typ) == (5, 42, 5, 8)
    for bad in (b"", b"a/b", b"a\0", b"x" * 256):
        with pytest.raises(FuseUsageError):
            proto.dirent(1, 1, 8, bad)


def test_notify_messages():
    m = proto.notify_inval_inode(9, 0, -1)
    length, code, unique = proto.OUT_HEADER.unpack_from(m)
    assert (length, code, unique) == (len(m), proto.NotifyCode.INVAL_INODE, 0)
    assert proto.NOTIFY_INVAL_INODE.unpack_from(m, 16) == (9, 0, -1)
    m = proto.notify_inval_entry(1, b"name")
    assert m.endswith(b"name\0") and proto.NOTIFY_INVAL_ENTRY.unpack_from(m, 16) == (1, 4, 0)
    m = proto.notify_delete(1, 7, b"gone")
    assert proto.NOTIFY_DELETE.unpack_from(m, 16) == (1, 7, 4, 0) and m.endswith(b"gone\0")


def test_small_builders():
    assert proto.open_out(3, proto.FOPEN_KEEP_CACHE) == proto.OPEN_OUT.pack(3, 2, 0)
    assert proto.lk_out(0, 99, 1, 1234) == proto.FILE_LOCK.pack(0, 99, 1, 1234)
    assert proto.lseek_out(4096) == proto.LSEEK_OUT.pack(4096)
    assert proto.write_out(10) == proto.WRITE_OUT.pack(10, 0)
    assert len(proto.statfs_out(1, 2, 3, 4, 5, 4096, 255, 4096)) == 80
    assert proto.split_time(-1) == (0, 0) and proto.split_time(2.5) == (2, 500_000_000)
    assert proto.dirent_type(0o40755) == 4 and proto.dirent_type(0o120777) == 10
    for bad in (lambda: proto.open_out(-1, 0), lambda: proto.write_out(2**32),
                lambda: proto.lseek_out(-1)):
        with pytest.raises(FuseUsageError):
            bad()


def test_proto_is_pure():
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(proto))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"trio", "os", "socket", "time", "random", "threading"}
