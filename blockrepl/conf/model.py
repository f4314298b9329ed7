"""The parsed, post-processed configuration of the block mirror.

This is what every other part of replfs sees of replfs.conf: plain frozen
dataclasses, no parsing concerns.  Option sections (net, disk, syncer,
startup, handlers, options) keep every option as written in
``options`` (name -> value string, or "" for flags like
``allow-two-primaries;``) so that dump can print them back; the typed
properties below give the values the engine uses, with DRBD's defaults.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Location:
    """Where an item came from, for file:line messages."""
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Section:
    """An option section such as ``net { ... }``: options in file order."""
    options: tuple[tuple[str, str], ...] = ()

    def get(self, name: str, default: str | None = None) -> str | None:
        for key, value in reversed(self.options):
            if key == name:
                return value
        return default

    def has(self, name: str) -> bool:
        return any(key == name for key, _ in self.options)

    def merged_over(self, base: "Section") -> "Section":
        """Options of self override those of base (resource over common)."""
        mine = {k for k, _ in self.options}
        return Section(tuple((k, v) for k, v in base.options if k not in mine) + self.options)


@dataclass(frozen=True)
class MetaDisk:
    """``meta-disk internal;`` or ``meta-disk PATH [INDEX];``"""
    internal: bool = True
    path: str | None = None
    index: int | None = None


@dataclass(frozen=True)
class Host:
    """One ``on NAME { ... }`` section."""
    name: str
    device: str
    minor: int
    disk: str
    address: str          # IPv4 or IPv6 literal, without brackets
    port: int
    meta_disk: MetaDisk = MetaDisk()
    node_id: int | None = None
    where: Location | None = field(default=None, compare=False)


def _int(text: str) -> int:
    """A whole number post-parse checked: at most 18 digits, but any
    number of leading zeros (which int() would count against its limit
    of 4300 digits)."""
    return int(text.lstrip("0") or "0")


def _size(text: str | None, default: int) -> int:
    """Parse DRBD sizes: plain numbers are KiB for rates; suffix k/M/G.
    (Post-parse let only digits with an optional suffix through: whole
    numbers, exactly -- a float of a long number is infinite.)"""
    if text is None:
        return default
    units = {"k": 1, "K": 1, "m": 1024, "M": 1024, "g": 1024 ** 2, "G": 1024 ** 2}
    if text and text[-1] in units:
        return _int(text[:-1]) * units[text[-1]]
    return _int(text)


@dataclass(frozen=True)
class Resource:
    name: str
    protocol: str                     # "A", "B" or "C"
    hosts: tuple[Host, ...]
    net: Section = Section()
    disk: Section = Section()
    syncer: Section = Section()
    startup: Section = Section()
    handlers: Section = Section()
    options: Section = Section()
    where: Location | None = field(default=None, compare=False)

    def host(self, name: str) -> Host | None:
        for h in self.hosts:
            if h.name == name:
                return h
        return None

    def peer_of(self, name: str) -> Host | None:
        others = [h for h in self.hosts if h.name != name]
        return others[0] if others else None

    # --- typed option values (DRBD 8.4 defaults) ---
    @property
    def allow_two_primaries(self) -> bool:
        value = self.net.get("allow-two-primaries")
        return value is not None and value in ("", "yes")

    @property
    def tls(self) -> bool:
        value = self.net.get("tls")
        return value is not None and value in ("", "yes")

    @property
    def shared_secret(self) -> str | None:
        return self.net.get("shared-secret")

    @property
    def ping_int_s(self) -> float:
        return float(self.net.get("ping-int", "10"))

    @property
    def ping_timeout_s(self) -> float:
        # DRBD expresses ping-timeout and timeout in tenths of a second.
        return float(self.net.get("ping-timeout", "5")) / 10

    @property
    def timeout_s(self) -> float:
        return float(self.net.get("timeout", "60")) / 10

    @property
    def connect_int_s(self) -> float:
        return float(self.net.get("connect-int", "10"))

    @property
    def resync_rate_kib(self) -> int:
        return _size(self.disk.get("resync-rate", self.syncer.get("rate")), 250 * 1024)

    def _disk_opt(self, name: str) -> str | None:
        """A resync option: the disk section (8.4) over the syncer's (8.3)."""
        return self.disk.get(name, self.syncer.get(name))

    @property
    def c_plan_ahead_s(self) -> float:
        # tenths of a second; DRBD 8.4's default 20 (0: fixed resync-rate)
        return _int(self._disk_opt("c-plan-ahead") or "20") / 10

    @property
    def c_fill_target_bytes(self) -> int:
        # sectors by default (DRBD's unit), or with a k/M/G suffix
        value = self._disk_opt("c-fill-target")
        if value is None:
            return 100 * 512
        if value and value[-1] in "sS":
            return _int(value[:-1]) * 512
        if value and value[-1] in "kKmMgG":
            return _size(value, 0) * 1024
        return _int(value) * 512

    @property
    def c_delay_target_s(self) -> float:
        return _int(self._disk_opt("c-delay-target") or "10") / 10

    @property
    def c_max_rate_kib(self) -> int:
        return _size(self._disk_opt("c-max-rate"), 100 * 1024)

    @property
    def c_min_rate_kib(self) -> int:
        return _size(self._disk_opt("c-min-rate"), 250)

    @property
    def ko_count(self) -> int | None:
        """None when not given (replfs: unacknowledged writes drop the link
        after ``timeout``)."""
        value = self.net.get("ko-count")
        return None if value is None else _int(value)

    @property
    def max_buffers(self) -> int:
        return _int(self.net.get("max-buffers") or "2048")

    def _bytes(self, name: str) -> int:
        value = self.net.get(name)
        if not value:
            return 0
        if value[-1] in "kKmMgG":
            return _size(value, 0) * 1024
        return _int(value)

    @property
    def sndbuf_size_bytes(self) -> int:
        """0: the kernel sizes the socket buffer itself."""
        return self._bytes("sndbuf-size")

    @property
    def rcvbuf_size_bytes(self) -> int:
        return self._bytes("rcvbuf-size")

    @property
    def csums_alg(self) -> str | None:
        return self.net.get("csums-alg", self.syncer.get("csums-alg")) or None

    @property
    def on_congestion(self) -> str:
        return self.net.get("on-congestion", "block") or "block"

    @property
    def congestion_fill_bytes(self) -> int:
        """0: not limited by the data in flight (DRBD's default)."""
        value = self.net.get("congestion-fill")
        if not value:
            return 0
        if value[-1] in "sS":
            return _int(value[:-1]) * 512
        if value[-1] in "kKmMgG":
            return _size(value, 0) * 1024
        return _int(value) * 512

    @property
    def congestion_extents(self) -> int:
        value = self.net.get("congestion-extents")
        return _int(value) if value else self.al_extents

    @property
    def data_integrity_alg(self) -> str | None:
        return self.net.get("data-integrity-alg") or None

    @property
    def al_extents(self) -> int:
        value = self.disk.get("al-extents", self.syncer.get("al-extents", "1237"))
        return _int(value) if value else 1237

    @property
    def after_sb_0pri(self) -> str:
        return self.net.get("after-sb-0pri", "disconnect") or "disconnect"

    @property
    def after_sb_1pri(self) -> str:
        return self.net.get("after-sb-1pri", "disconnect") or "disconnect"

    @property
    def after_sb_2pri(self) -> str:
        return self.net.get("after-sb-2pri", "disconnect") or "disconnect"

    @property
    def verify_alg(self) -> str | None:
        return self.net.get("verify-alg", self.syncer.get("verify-alg"))

    @property
    def on_io_error(self) -> str:
        return self.disk.get("on-io-error", "detach") or "detach"


@dataclass(frozen=True)
class Config:
    path: str
    resources: dict[str, Resource]
    global_: Section = Section()
    common: dict[str, Section] = field(default_factory=dict)  # section name -> Section
    # Diagnostics carry file:line, so like Location they take no part in ==.
    warnings: tuple[str, ...] = field(default=(), compare=False)
    # ``protocol X;`` (or ``net { protocol X; }``) in the common section, as
    # written; every Resource.protocol already has it applied.
    common_protocol: str | None = None
    # The files that set a shared-secret (replfsadm checks who may read them).
    secret_files: tuple[str, ...] = field(default=(), compare=False)

    def resource(self, name: str) -> Resource:
        return self.resources[name]
