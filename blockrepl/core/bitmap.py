"""The out-of-sync bitmap: one bit per 4 KiB block of the device.

A set bit means "this block may differ from the peer's copy".  Bits are
set by writes that could not be replicated and cleared by resync.  The
bitmap remembers which of its 4 KiB pages changed since they were last
written to the meta-data area, so only those are written back (each such
write counts as one "bm" update in /proc/drbd terms).
"""
from __future__ import annotations

from typing import Iterator

BLOCK = 4096
BITS_PER_PAGE = 4096 * 8


class Bitmap:
    def __init__(self, nblocks: int, data: bytes | None = None):
        self.nblocks = nblocks
        nbytes = (nblocks + 7) // 8
        if data is None:
            self._bits = bytearray(nbytes)
        else:
            if len(data) < nbytes:
                raise ValueError("bitmap data too short")
            self._bits = bytearray(data[:nbytes])
            # Bits past the end of the device are meaningless: clear them.
            tail = nblocks % 8
            if tail and nbytes:
                self._bits[-1] &= (1 << tail) - 1
        self._count = sum(b.bit_count() for b in self._bits)
        self._dirty_pages: set[int] = set()

    # --- queries ---
    def __len__(self) -> int:
        return self.nblocks

    @property
    def count(self) -> int:
        """Number of set bits (blocks out of sync)."""
        return self._count

    def test(self, block: int) -> bool:
        return bool(self._bits[block >> 3] & (1 << (block & 7)))

    def runs(self, start: int = 0) -> Iterator[tuple[int, int]]:
        """Yield (first_block, count) for each run of set bits from ``start``."""
        bits = self._bits
        n = self.nblocks
        i = start
        while i < n:
            byte = i >> 3
            if bits[byte] == 0 and (i & 7) == 0:
                # Skip clear bytes quickly.
                j = byte
                while j < len(bits) and bits[j] == 0:
                    j += 1
                i = j * 8
                continue
            if not self.test(i):
                i += 1
                continue
            first = i
            while i < n and self.test(i):
                i += 1
            yield first, i - first

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    # --- changes ---
    def set_range(self, first: int, count: int) -> int:
        """Set bits [first, first+count); returns how many were newly set."""
        return self._change(first, count, True)

    def clear_range(self, first: int, count: int) -> int:
        return self._change(first, count, False)

    def set_all(self) -> None:
        self._change(0, self.nblocks, True)

    def clear_all(self) -> None:
        self._change(0, self.nblocks, False)

    def merge(self, other_bits: bytes, offset: int = 0) -> int:
        """OR another bitmap's bytes, starting at byte ``offset``, into this one."""
        added = 0
        end = min(len(self._bits), offset + len(other_bits))
        for i in range(offset, end):
            b = other_bits[i - offset]
            if not b:
                continue
            new = self._bits[i] | b
            if new != self._bits[i]:
                added += (new ^ self._bits[i]).bit_count()
                self._bits[i] = new
                self._dirty_pages.add(i // BLOCK)
        if self.nblocks % 8 and self._bits:
            self._bits[-1] &= (1 << (self.nblocks % 8)) - 1
        self._count += added
        return added

    def _change(self, first: int, count: int, value: bool) -> int:
        if first < 0 or count < 0 or first + count > self.nblocks:
            raise ValueError(f"bitmap range {first}+{count} outside 0..{self.nblocks}")
        changed = 0
        end = first + count
        i = first
        bits = self._bits
        while i < end:
            byte = i >> 3
            if (i & 7) == 0 and end - i >= 8:
                old = bits[byte]
                new = 0xFF if value else 0
                if old != new:
                    changed += (old ^ new).bit_count()
                    bits[byte] = new
                    self._dirty_pages.add(byte // BLOCK)
                i += 8
                continue
            mask = 1 << (i & 7)
            old = bits[byte]
            new = (old | mask) if value else (old & ~mask)
            if new != old:
                bits[byte] = new
                changed += 1
                self._dirty_pages.add(byte // BLOCK)
            i += 1
        self._count += changed if value else -changed
        return changed

    def grow(self, nblocks: int, *, set_new: bool) -> None:
        """Cover ``nblocks`` blocks (online grow); the new ones are set
        (out of sync: resynced) or clear.  Marks no page dirty: the
        caller has written the whole grown bitmap to its new place."""
        if nblocks < self.nblocks:
            raise ValueError("a bitmap never shrinks")
        old = self.nblocks
        self._bits.extend(bytes((nblocks + 7) // 8 - len(self._bits)))
        self.nblocks = nblocks
        if set_new:
            dirty = set(self._dirty_pages)
            self._change(old, nblocks - old, True)
            self._dirty_pages = dirty

    def grown_bytes(self, nblocks: int, *, set_new: bool) -> bytes:
        """What this bitmap's bytes become after ``grow`` (for writing)."""
        copy = Bitmap(self.nblocks, bytes(self._bits))
        copy.grow(nblocks, set_new=set_new)
        return copy.to_bytes()

    # --- persistence bookkeeping ---
    def take_dirty_pages(self) -> list[tuple[int, bytes]]:
        """Return (page_index, page_bytes) for pages changed since last call."""
        pages = []
        for p in sorted(self._dirty_pages):
            pages.append((p, bytes(self._bits[p * BLOCK:(p + 1) * BLOCK])))
        self._dirty_pages.clear()
        return pages

    def mark_all_pages_dirty(self) -> None:
        self._dirty_pages.update(range((len(self._bits) + BLOCK - 1) // BLOCK))


def blocks_of(offset: int, length: int) -> tuple[int, int]:
    """The (first_block, count) range of 4 KiB blocks a byte range touches."""
    if length <= 0:
        return offset // BLOCK, 0
    first = offset // BLOCK
    last = (offset + length - 1) // BLOCK
    return first, last - first + 1
