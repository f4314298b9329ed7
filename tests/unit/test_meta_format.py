import pytest

from replfs.blockrepl.core.uuids import Uuids
from replfs.blockrepl.meta import format as md


def test_internal_layout_fits_and_is_aligned():
    for size in (2 * 2**20, 64 * 2**20 + 12345, 10 * 2**30):
        lay = md.internal_layout(size)
        assert lay.data_size % 4096 == 0
        assert lay.data_size + lay.md_size <= size
        assert lay.bm_bytes * 8 >= lay.nblocks
        assert lay.bm_offset >= lay.data_size
        assert lay.sb_offset + md.SUPERBLOCK_SIZE <= size


def test_too_small_disk_is_refused():
    with pytest.raises(md.MetaDataError, match="too small"):
        md.internal_layout(256 * 1024)


def test_superblock_round_trip_and_checksum():
    lay = md.internal_layout(64 * 2**20)
    sb = md.Superblock(lay.data_size, Uuids(10, 20, (30, 40)), md.F_CONSISTENT, 99, 1237, lay)
    raw = md.encode_superblock(sb)
    assert md.decode_superblock(raw) == sb
    bad = bytearray(raw)
    bad[100] ^= 1
    with pytest.raises(md.MetaDataError, match="checksum"):
        md.decode_superblock(bytes(bad))
    with pytest.raises(md.MetaDataError, match="magic"):
        md.decode_superblock(bytes(4096))


def test_activity_log_records_alternate_and_newest_valid_wins():
    area = bytearray(md.AL_AREA)
    for seq, ext in ((1, [1, 2]), (2, [2, 3, 4])):
        off, rec = md.encode_al_record(seq, ext)
        area[off:off + len(rec)] = rec
    assert md.decode_al_area(bytes(area)) == (2, [2, 3, 4])
    # Tear the newest record: the older one is still there.
    off, _ = md.encode_al_record(2, [])
    area[off + 20] ^= 0xFF
    assert md.decode_al_area(bytes(area)) == (1, [1, 2])


def test_filesystem_signatures():
    ext = bytearray(70000)
    ext[1080:1082] = b"\x53\xef"
    assert md.filesystem_signature(bytes(ext)) == "ext2/ext3/ext4"
    assert md.filesystem_signature(b"XFSB" + bytes(70000)) == "xfs"
    assert md.filesystem_signature(bytes(70000)) is None
