"""Which option names each section accepts, and which ones replfs acts on.

DRBD (8.3 and 8.4, and a few 9.x names) knows more options than the
replfs engine implements.  A name DRBD knows is accepted so that an
existing drbd.conf loads unchanged; if the engine ignores it the reader
says so in a warning.  A name DRBD does not know is a syntax error, as
it is for drbdadm, because it is almost always a typo.

When the engine starts to honour an option, move it into IMPLEMENTED
(and describe it in man/replfs.conf.5).
"""
from __future__ import annotations

import hashlib

# Section name -> every option name accepted there.  ``handlers`` is
# absent on purpose: any handler name is accepted.
KNOWN: dict[str, frozenset[str]] = {
    "global": frozenset({
        "usage-count", "minor-count", "dialog-refresh",
        "disable-ip-verification", "udev-always-use-vnr", "cmd-timeout-short",
        "cmd-timeout-medium", "cmd-timeout-long",
    }),
    "net": frozenset({
        "protocol", "timeout", "max-epoch-size", "max-buffers",
        "unplug-watermark", "connect-int", "ping-int", "sndbuf-size",
        "rcvbuf-size", "ko-count", "allow-two-primaries", "cram-hmac-alg",
        "shared-secret", "after-sb-0pri", "after-sb-1pri", "after-sb-2pri",
        "always-asbp", "rr-conflict", "ping-timeout", "data-integrity-alg",
        "tcp-cork", "no-tcp-cork", "on-congestion", "congestion-fill",
        "congestion-extents", "csums-alg", "verify-alg", "use-rle",
        "discard-my-data", "fencing", "csums-after-crash-only",
        "sock-check-timeo", "transport", "tls", "tls-certificate", "tls-privkey",
        "tls-keyring",
    }),
    "disk": frozenset({
        "on-io-error", "fencing", "disk-barrier", "disk-flushes", "disk-drain",
        "md-flushes", "no-disk-barrier", "no-disk-flushes", "no-disk-drain",
        "no-md-flushes", "resync-rate", "resync-after", "al-extents",
        "al-updates", "c-plan-ahead", "c-delay-target", "c-fill-target",
        "c-max-rate", "c-min-rate", "disk-timeout", "read-balancing", "size",
        "max-bio-bvecs", "use-bmbv", "discard-zeroes-if-aligned",
        "rs-discard-granularity", "disable-write-same",
    }),
    "syncer": frozenset({
        "rate", "after", "al-extents", "use-rle", "cpu-mask", "verify-alg",
        "csums-alg", "delay-probe-volume", "delay-probe-interval",
        "throttle-threshold", "hold-off-threshold", "c-plan-ahead",
        "c-fill-target", "c-delay-target", "c-max-rate", "c-min-rate",
        "on-no-data-accessible",
    }),
    "startup": frozenset({
        "wfc-timeout", "degr-wfc-timeout", "outdated-wfc-timeout",
        "wait-after-sb", "become-primary-on", "stacked-timeouts",
    }),
    "options": frozenset({
        "cpu-mask", "on-no-data-accessible", "auto-promote",
        "auto-promote-timeout", "quorum", "on-no-quorum", "max-io-depth",
        "peer-ack-window", "peer-ack-delay",
    }),
}

# Section name -> option names the replfs engine acts on.
IMPLEMENTED: dict[str, frozenset[str]] = {
    "global": frozenset(),
    "net": frozenset({
        "protocol", "allow-two-primaries", "shared-secret", "ping-int",
        "ping-timeout", "timeout", "connect-int", "after-sb-0pri",
        "after-sb-1pri", "after-sb-2pri", "verify-alg", "fencing",
        "csums-alg", "data-integrity-alg", "on-congestion", "congestion-fill",
        "congestion-extents", "tls", "tls-certificate", "tls-privkey", "tls-keyring",
        "max-buffers", "sndbuf-size", "rcvbuf-size", "ko-count",
    }),
    "disk": frozenset({"resync-rate", "al-extents", "on-io-error", "fencing",
                       "c-plan-ahead", "c-fill-target", "c-delay-target", "c-max-rate",
                       "c-min-rate"}),
    "syncer": frozenset({"rate", "verify-alg", "al-extents", "csums-alg",
                         "c-plan-ahead", "c-fill-target", "c-delay-target", "c-max-rate",
                         "c-min-rate"}),
    "startup": frozenset({"wfc-timeout", "degr-wfc-timeout", "outdated-wfc-timeout"}),
    "options": frozenset(),
    "handlers": frozenset({"split-brain", "local-io-error", "fence-peer",
                           "before-resync-target", "after-resync-target",
                           "pri-lost-after-sb"}),
}

SECTIONS = ("net", "disk", "syncer", "startup", "handlers", "options")


def is_known(section: str, name: str) -> bool:
    if section == "handlers":
        return True
    return name in KNOWN[section]


def is_implemented(section: str, name: str) -> bool:
    return name in IMPLEMENTED[section]


# --- values of implemented options, checked in post-parse -------------

AFTER_SB = {
    "after-sb-0pri": ("disconnect", "discard-younger-primary",
                      "discard-older-primary", "discard-zero-changes",
                      "discard-least-changes", "discard-local",
                      "discard-remote"),
    "after-sb-1pri": ("disconnect", "consensus", "violently-as0p",
                      "discard-secondary", "call-pri-lost-after-sb"),
    "after-sb-2pri": ("disconnect", "violently-as0p", "call-pri-lost-after-sb"),
}
# With allow-two-primaries (a filesystem mounted on both nodes), the
# after-sb policies that throw away data a Primary wrote (post-parse warns).
AFTER_SB_UNSAFE_DUAL = {
    "after-sb-0pri": ("discard-younger-primary", "discard-older-primary",
                      "discard-zero-changes", "discard-least-changes", "discard-local",
                      "discard-remote"),
    "after-sb-1pri": ("violently-as0p", "discard-secondary"),
    "after-sb-2pri": ("violently-as0p",),
}
ON_IO_ERROR = ("pass_on", "call-local-io-error", "detach")
FENCING = ("dont-care", "resource-only", "resource-and-stonith")
ON_CONGESTION = ("block", "pull-ahead", "disconnect")
YES_NO = ("", "yes", "no")
# Options whose value is a whole number (seconds, tenths of seconds, counts).
INTEGER = {
    "net": ("ping-int", "ping-timeout", "timeout", "connect-int", "congestion-extents",
            "max-buffers", "ko-count"),
    "disk": ("al-extents", "c-plan-ahead", "c-delay-target"),
    "syncer": ("al-extents", "c-plan-ahead", "c-delay-target"),
    "startup": ("wfc-timeout", "degr-wfc-timeout", "outdated-wfc-timeout"),
}
# Options whose value is a size or rate: a number with optional k/M/G.
SIZE = {"disk": ("resync-rate", "c-max-rate", "c-min-rate"),
        "syncer": ("rate", "c-max-rate", "c-min-rate")}
# Socket buffer sizes: bytes, or a size with k/M/G.
BYTES = ("sndbuf-size", "rcvbuf-size")
# c-fill-target: sectors, or a size with s/k/M/G.
SECTORS = ("c-fill-target", "congestion-fill")
# DRBD 8.4's ranges (drbd_limits.h), in the options' own units.
RANGES = {
    "c-plan-ahead": (0, 300),           # tenths of a second
    "c-delay-target": (1, 100),         # tenths of a second
    "c-fill-target": (0, 1 << 20),      # sectors
    "max-buffers": (32, 131072),        # 4 KiB pages
    "ko-count": (0, 200),
    "sndbuf-size": (0, 10 << 20),       # bytes
    "rcvbuf-size": (0, 10 << 20),       # bytes
    "c-max-rate": (250, 4 << 20),       # KiB/s
    "c-min-rate": (0, 4 << 20),         # KiB/s
    "congestion-fill": (0, 20 << 20),   # sectors (10 GiB)
    "congestion-extents": (67, 6433),
}


def digest_algorithms() -> list[str]:
    """The names csums-alg and data-integrity-alg accept: hashlib's fixed-
    size digests that every Python has (both nodes must know the name)."""
    return sorted(a for a in hashlib.algorithms_guaranteed if not a.startswith("shake_"))
