"""Resync progress in the /proc/drbd manner.  Pure arithmetic."""
from __future__ import annotations


def progress_line(total_kib: int, left_kib: int, elapsed_s: float, recent_kib_s: float,
                  *, verify: bool = False, want_kib_s: int | None = None) -> str:
    """The two lines /proc/drbd shows under a syncing (or verifying)
    resource, as DRBD 8.4 prints them:

    ``[=====>..............] sync'ed: 27.4% (7444/10240)K`` -- in K up to
    4 GiB, in M above (``verified:`` during online verify) -- and
    ``finish: 0:00:12 speed: 1,024 (1,000) want: 2,048 K/sec`` (``want:``,
    the rate the SyncTarget asks for, only when given).
    """
    total_kib = max(total_kib, 1)
    done = total_kib - left_kib
    frac = min(max(done / total_kib, 0.0), 1.0)
    width = 20
    filled = int(frac * width)
    bar = "=" * max(filled - 1, 0) + (">" if filled < width else "=") + "." * (width - filled)
    avg = done / elapsed_s if elapsed_s > 0 else 0.0
    speed = recent_kib_s or avg
    eta = int(left_kib / speed) if speed > 0 else 0
    finish = f"{eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}"
    if total_kib > 4 << 20:             # more than 4 GiB: in M
        amounts = f"({left_kib // 1024}/{total_kib // 1024})M"
    else:
        amounts = f"({left_kib}/{total_kib})K"
    want = f" want: {want_kib_s:,}" if want_kib_s is not None else ""
    return (f"[{bar}] {'verified' if verify else 'sync' + chr(39) + 'ed'}: "
            f"{frac * 100:.1f}% {amounts}\n"
            f"\tfinish: {finish} speed: {int(speed):,} ({int(avg):,}){want} K/sec")
