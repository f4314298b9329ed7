"""Resync progress in the /proc/drbd manner.  Pure arithmetic."""
from __future__ import annotations


def progress_line(total_kib: int, left_kib: int, elapsed_s: float, recent_kib_s: float) -> str:
    """The two lines /proc/drbd shows under a syncing resource.

    ``[=====>..............] sync'ed: 27.4% (7444/10240)M`` and
    ``finish: 0:00:12 speed: 1,024 (1,000) K/sec``.
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
    return (f"[{bar}] sync'ed: {frac * 100:.1f}% ({left_kib // 1024}/{total_kib // 1024})M\n"
            f"\tfinish: {finish} speed: {int(speed):,} ({int(avg):,}) K/sec")
