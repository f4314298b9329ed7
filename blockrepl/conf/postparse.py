"""Stage 3 of reading replfs.conf: the raw tree to a checked model.

Here the file's meaning is settled: common sections are merged under each
resource (the resource's own options win), protocol defaults to C,
resource-level device/disk/meta-disk/address are inherited by the ``on``
sections that do not give their own, minors are derived from device
names, and everything a two-node replfs cannot run is refused with the
file:line of the statement at fault and exit code 10 (EXIT_CONFIG).
Options DRBD knows but the engine ignores become warnings.
"""
from __future__ import annotations

import ipaddress
import re

from replfs.errors import EXIT_CONFIG, ReplfsError

from . import options as opts
from .model import Config, Host, Location, MetaDisk, Resource, Section
from .parser import RawConfig, RawHost, RawResource, RawSection, RawStatement

_DRBD_DEVICE = re.compile(r"/dev/drbd(\d+)")
_META_INDEX = re.compile(r"\[(\d+)\]")
_META_JOINED = re.compile(r"(.+)\[(\d+)\]")
_SIZE = re.compile(r"\d+[kKmMgG]?")
_SECTORS = re.compile(r"\d+[sSkKmMgG]?")
_INT = re.compile(r"\d+")
MAX_NODE_ID = 31
MAX_DIGITS = 18


def _whole(text: str) -> int | None:
    """``text`` as a whole number, or None if it is not one or has more
    than MAX_DIGITS digits (leading zeros aside): int() refuses numbers
    of more than 4300 digits, and no value here needs more than 18."""
    if not _INT.fullmatch(text):
        return None
    digits = text.lstrip("0") or "0"
    return int(digits) if len(digits) <= MAX_DIGITS else None


def config_error(where: Location | None, what: str) -> ReplfsError:
    prefix = f"{where}: " if where is not None else ""
    return ReplfsError(f"{prefix}{what}", EXIT_CONFIG)


def postparse(raw: RawConfig) -> Config:
    warnings: dict[str, None] = {}      # in order, each once

    def warn(text: str) -> None:
        warnings.setdefault(text)

    global_ = Section()
    if raw.global_ is not None:
        _check_options(raw.global_, warn)
        global_ = _section(raw.global_)

    for section in raw.common.values():
        _check_options(section, warn)
    common_protocol = _protocol_of(raw.common_protocol, raw.common.get("net"), "common")
    common = {name: _section(section) for name, section in raw.common.items()}

    resources: dict[str, Resource] = {}
    first_seen: dict[str, Location] = {}
    for raw_res in raw.resources:
        if raw_res.name in resources:
            raise config_error(raw_res.where, f"resource {raw_res.name} is defined twice "
                                              f"(first at {first_seen[raw_res.name]})")
        first_seen[raw_res.name] = raw_res.where
        resources[raw_res.name] = _resource(raw_res, raw, common, common_protocol, warn)

    _check_unique_per_host(resources)
    return Config(path=raw.path, resources=resources, global_=global_, common=common,
                  common_protocol=common_protocol, warnings=tuple(warnings))


# --- option sections -------------------------------------------------

def _section(raw: RawSection) -> Section:
    """The model section; ``protocol`` in net is lifted to Resource.protocol."""
    return Section(tuple((o.name, o.value) for o in raw.options
                         if not (raw.name == "net" and o.name == "protocol")))


def _check_options(section: RawSection, warn) -> None:
    for option in section.options:
        if not opts.is_implemented(section.name, option.name):
            kind = "handler" if section.name == "handlers" else "option"
            warn(f"{option.where}: warning: {kind} '{option.name}' is accepted but has no "
                 f"effect in replfs")
            continue
        _check_value(section.name, option.name, option.value, option.where)


def _check_value(section: str, name: str, value: str, where: Location) -> None:
    def bad(expected: str) -> ReplfsError:
        return config_error(where, f"invalid value '{value}' for option '{name}' in section "
                                   f"'{section}' (expected {expected})")

    if name == "protocol":
        if value not in ("A", "B", "C"):
            raise config_error(where, f"invalid protocol '{value}' (must be A, B or C)")
    elif name in ("allow-two-primaries", "tls"):
        if value not in opts.YES_NO:
            raise bad("no value, 'yes' or 'no'")
    elif name in opts.AFTER_SB:
        if value not in opts.AFTER_SB[name]:
            raise bad(", ".join(opts.AFTER_SB[name]))
    elif name == "on-io-error":
        if value not in opts.ON_IO_ERROR:
            raise bad(", ".join(opts.ON_IO_ERROR))
    elif name == "fencing":
        if value not in opts.FENCING:
            raise bad(", ".join(opts.FENCING))
    elif name == "on-congestion":
        if value not in opts.ON_CONGESTION:
            raise bad(", ".join(opts.ON_CONGESTION))
    elif name in opts.INTEGER.get(section, ()):
        if not _INT.fullmatch(value):
            raise bad("a whole number")
        if _whole(value) is None:
            raise bad(f"a whole number of at most {MAX_DIGITS} digits")
        _check_range(name, _whole(value), bad)
    elif name in opts.SIZE.get(section, ()):
        if not _SIZE.fullmatch(value):
            raise bad("a number of KiB, optionally with suffix k, M or G")
        if _whole(value.rstrip("kKmMgG")) is None:
            raise bad(f"a number of at most {MAX_DIGITS} digits")
        _check_range(name, _kib(value), bad)
    elif name in opts.BYTES:
        if not _SIZE.fullmatch(value):
            raise bad("a number of bytes, optionally with suffix k, M or G")
        if _whole(value.rstrip("kKmMgG")) is None:
            raise bad(f"a number of at most {MAX_DIGITS} digits")
        _check_range(name, _bytes(value), bad)
    elif name in opts.SECTORS:
        if not _SECTORS.fullmatch(value):
            raise bad("a number of 512-byte sectors, or a size with suffix s, k, M or G")
        number = _whole(value.rstrip("sSkKmMgG"))
        if number is None:
            raise bad(f"a number of at most {MAX_DIGITS} digits")
        sectors = number if value[-1] not in "kKmMgG" else _kib(value) * 2
        _check_range(name, sectors, bad)
    elif name in ("csums-alg", "data-integrity-alg", "verify-alg"):
        if value not in opts.digest_algorithms():
            raise config_error(where, f"unknown {name} '{value}' in section '{section}': "
                                      f"replfs accepts {', '.join(opts.digest_algorithms())}"
                                      f" (Python's hashlib; DRBD's kernel-only names such "
                                      f"as crc32c are not available)")
    elif name in ("shared-secret", "tls-certificate", "tls-privkey", "tls-keyring"):
        if not value:
            raise bad("a value")


def _bytes(value: str) -> int:
    """A byte-size option's value (plain numbers are bytes)."""
    if value[-1] in "kKmMgG":
        return _kib(value) * 1024
    return int(value.lstrip("0") or "0")


def _kib(value: str) -> int:
    """A size option's value in KiB (plain numbers are KiB, as DRBD's rates)."""
    mult = {"k": 1, "K": 1, "m": 1024, "M": 1024, "g": 1 << 20, "G": 1 << 20}
    if value[-1] in mult:
        return int(value[:-1].lstrip("0") or "0") * mult[value[-1]]
    return int(value.lstrip("0") or "0")


def _check_range(name: str, number: int, bad) -> None:
    limits = opts.RANGES.get(name)
    if limits is not None and not limits[0] <= number <= limits[1]:
        raise bad(f"{limits[0]} to {limits[1]}{_RANGE_UNITS.get(name, '')}")


_RANGE_UNITS = {"c-plan-ahead": " tenths of a second", "c-delay-target": " tenths of a second",
                "c-fill-target": " sectors", "c-max-rate": " KiB/s", "c-min-rate": " KiB/s",
                "congestion-fill": " sectors", "max-buffers": " pages of 4 KiB",
                "sndbuf-size": " bytes", "rcvbuf-size": " bytes"}


def _protocol_of(statement: RawStatement | None, net: RawSection | None,
                 context: str) -> str | None:
    """The protocol a resource or common gives, by keyword or in net (8.4)."""
    found: tuple[str, Location] | None = None
    if statement is not None:
        found = (statement.words[0], statement.where)
    if net is not None:
        for option in net.options:
            if option.name != "protocol":
                continue
            if found is not None and found[0] != option.value:
                raise config_error(option.where, f"protocol {option.value} in net section "
                                                 f"contradicts protocol {found[0]} of {context} "
                                                 f"(at {found[1]})")
            found = (option.value, option.where)
    if found is None:
        return None
    if found[0] not in ("A", "B", "C"):
        raise config_error(found[1], f"invalid protocol '{found[0]}' (must be A, B or C)")
    return found[0]


# --- resources -------------------------------------------------------

def _resource(raw_res: RawResource, raw: RawConfig, common: dict[str, Section],
              common_protocol: str | None, warn) -> Resource:
    for section in raw_res.sections.values():
        _check_options(section, warn)
    protocol = (_protocol_of(raw_res.protocol, raw_res.sections.get("net"),
                             f"resource {raw_res.name}")
                or common_protocol or "C")
    sections = {}
    for name in opts.SECTIONS:
        own = _section(raw_res.sections[name]) if name in raw_res.sections else Section()
        sections[name] = own.merged_over(common.get(name, Section()))

    net = sections["net"]
    if net.get("allow-two-primaries") in ("", "yes") and protocol != "C":
        where = _option_where(raw_res.sections.get("net"), "allow-two-primaries") \
            or _option_where(raw.common.get("net"), "allow-two-primaries") or raw_res.where
        raise config_error(where, "allow-two-primaries requires protocol C")
    _check_congestion(raw_res, raw, net, protocol)
    _check_after_sb(raw_res, raw, net, warn)
    if net.get("tls") not in ("", "yes"):
        for name in ("tls-certificate", "tls-privkey", "tls-keyring"):
            if net.has(name):
                warn(f"{_where(raw_res, raw, name)}: warning: '{name}' has no effect in "
                     f"resource {raw_res.name}: it does not have 'tls yes;'")

    if len(raw_res.hosts) != 2:
        count = len(raw_res.hosts)
        raise config_error(raw_res.where, f"resource {raw_res.name} has {count} 'on' "
                                          f"section{'' if count == 1 else 's'}; replfs mirrors "
                                          f"between exactly two nodes, so it needs two")
    hosts = tuple(_host(raw_res, h) for h in raw_res.hosts)
    a, b = hosts
    if a.name == b.name:
        raise config_error(raw_res.hosts[1].where, f"host {a.name} appears twice in resource "
                                                   f"{raw_res.name}")
    if (a.address, a.port) == (b.address, b.port):
        raise config_error(b.where, f"both hosts of resource {raw_res.name} use address "
                                    f"{_endpoint(b)}")
    if (a.node_id is None) != (b.node_id is None):
        missing = a if a.node_id is None else b
        raise config_error(missing.where, f"host {missing.name} of resource {raw_res.name} has "
                                          f"no node-id, but its peer has one (give both or neither)")
    if a.node_id is not None and a.node_id == b.node_id:
        raise config_error(b.where, f"both hosts of resource {raw_res.name} have node-id "
                                    f"{a.node_id}")
    res = Resource(name=raw_res.name, protocol=protocol, hosts=hosts, where=raw_res.where,
                   **sections)
    limit = max(res.max_buffers * 4096, res.sndbuf_size_bytes)
    if res.on_congestion != "block" and res.congestion_fill_bytes > limit:
        warn(f"{_where(raw_res, raw, 'congestion-fill')}: warning: congestion-fill "
             f"({res.congestion_fill_bytes // 1024} KiB) is more than the {limit // 1024} KiB "
             f"that may wait to be sent (max-buffers x 4 KiB, or sndbuf-size): writers wait "
             f"for the peer before on-congestion {res.on_congestion} can act")
    return res


def _where(raw_res: RawResource, raw: RawConfig, name: str) -> Location | None:
    """Where the net option ``name`` in effect for raw_res was written."""
    return (_option_where(raw_res.sections.get("net"), name)
            or _option_where(raw.common.get("net"), name) or raw_res.where)


def _check_congestion(raw_res: RawResource, raw: RawConfig, net: Section,
                      protocol: str) -> None:
    """DRBD allows an on-congestion policy other than block (pull-ahead,
    disconnect) with protocol A only: with B or C (which allow-two-primaries
    needs) a write completes only once the peer has it, so there is no
    send buffer to be congested."""
    policy = net.get("on-congestion")
    if policy in ("pull-ahead", "disconnect") and protocol != "A":
        two = " and allow-two-primaries" if net.get("allow-two-primaries") in ("", "yes") \
            else ""
        raise config_error(_where(raw_res, raw, "on-congestion"),
                           f"on-congestion {policy} requires protocol A (resource "
                           f"{raw_res.name} uses protocol {protocol}{two}); DRBD allows only "
                           f"on-congestion block with protocols B and C")


def _check_after_sb(raw_res: RawResource, raw: RawConfig, net: Section, warn) -> None:
    """Warn of after-sb policies that would throw away a Primary's data
    while both nodes may be Primary (a filesystem mounted on both), and of
    discard-local/discard-remote, which need the other node's replfs.conf
    to say the opposite."""
    dual = net.get("allow-two-primaries") in ("", "yes")
    for name, unsafe in opts.AFTER_SB_UNSAFE_DUAL.items():
        policy = net.get(name)
        if dual and policy in unsafe:
            warn(f"{_where(raw_res, raw, name)}: warning: {name} {policy} with "
                 f"allow-two-primaries: with a filesystem mounted on both nodes it discards "
                 f"acknowledged writes beneath live caches; 'disconnect' is the only safe "
                 f"setting with two Primaries")
    policy = net.get("after-sb-0pri")
    if policy in ("discard-local", "discard-remote"):
        other, both = (("discard-remote", "discard") if policy == "discard-local"
                       else ("discard-local", "keep"))
        warn(f"{_where(raw_res, raw, 'after-sb-0pri')}: warning: after-sb-0pri {policy} "
             f"applies to the node whose replfs.conf says it: the other node's must say "
             f"{other} (replfs does not compare the two when they connect; with the same "
             f"setting on both nodes, both would {both} their own data)")


def _option_where(section: RawSection | None, name: str) -> Location | None:
    if section is None:
        return None
    found = [o.where for o in section.options if o.name == name]
    return found[-1] if found else None


def _host(raw_res: RawResource, raw_host: RawHost) -> Host:
    items = dict(raw_res.items)
    items.update(raw_host.items)
    context = f"host {raw_host.name} of resource {raw_res.name}"
    for needed in ("device", "disk", "address"):
        if needed not in items:
            raise config_error(raw_host.where, f"{context} has no '{needed}' (give it in "
                                               f"'on {raw_host.name}' or in the resource)")
    device, minor = _device(items["device"])
    disk = items["disk"]
    if len(disk.words) != 1:
        raise config_error(disk.where, f"'disk' takes one path, got '{' '.join(disk.words)}'")
    address, port = _address(items["address"])
    meta = _meta_disk(items["meta-disk"]) if "meta-disk" in items else MetaDisk()
    node_id = _node_id(items["node-id"]) if "node-id" in items else None
    return Host(name=raw_host.name, device=device, minor=minor, disk=disk.words[0],
                address=address, port=port, meta_disk=meta, node_id=node_id,
                where=raw_host.where)


def _device(st: RawStatement) -> tuple[str, int]:
    """``device PATH``, ``device PATH minor N`` or ``device minor N``."""
    words = st.words
    path: str | None = None
    minor_text: str | None = None
    if len(words) == 1 and words[0] != "minor":
        path = words[0]
    elif len(words) == 2 and words[0] == "minor":
        minor_text = words[1]
    elif len(words) == 3 and words[1] == "minor":
        path, minor_text = words[0], words[2]
    else:
        raise config_error(st.where, f"cannot understand 'device {' '.join(words)}' (expected "
                                     f"'device /dev/drbdN', 'device PATH minor N' or "
                                     f"'device minor N')")
    if minor_text is not None:
        minor = _whole(minor_text)
        if minor is None:
            raise config_error(st.where, f"minor '{minor_text}' is not a whole number of at "
                                         f"most {MAX_DIGITS} digits")
        return (path if path is not None else f"/dev/drbd{minor}"), minor
    assert path is not None
    match = _DRBD_DEVICE.fullmatch(path)
    minor = _whole(match.group(1)) if match else None
    if minor is None:
        raise config_error(st.where, f"cannot derive the minor number from device '{path}'; "
                                     f"write 'device {path} minor N;'")
    return path, minor


def _address(st: RawStatement) -> tuple[str, int]:
    """``address [ipv4|ipv6] ADDR:PORT``; returns (address, port)."""
    words = st.words
    family = None
    if len(words) == 2:
        family, text = words
        if family not in ("ipv4", "ipv6"):
            raise config_error(st.where, f"address family '{family}' is not supported by "
                                         f"replfs (use ipv4 or ipv6)")
    elif len(words) == 1:
        text = words[0]
    else:
        raise config_error(st.where, f"cannot understand 'address {' '.join(words)}' "
                                     f"(expected 'address [ipv4|ipv6] ADDRESS:PORT')")
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise config_error(st.where, f"address '{text}' has no port (write [ADDRESS]:PORT)")
        kind = "ipv6"
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise config_error(st.where, f"address '{text}' has no port (write ADDRESS:PORT)")
        kind = "ipv4"
        if ":" in host:
            raise config_error(st.where, f"IPv6 address '{text}' must be written as "
                                         f"'ipv6 [ADDRESS]:PORT'")
    if family is not None and family != kind:
        raise config_error(st.where, f"address '{text}' is not an {family} address")
    try:
        ip = ipaddress.IPv6Address(host) if kind == "ipv6" else ipaddress.IPv4Address(host)
    except ValueError:
        raise config_error(st.where, f"invalid {'IPv6' if kind == 'ipv6' else 'IPv4'} address "
                                     f"'{host}' (replfs needs a literal IP address, not a "
                                     f"host name)") from None
    port = _whole(port_text)
    if port is None or not 1 <= port <= 65535:
        raise config_error(st.where, f"bad port '{port_text}' in address '{text}' "
                                     f"(must be 1-65535)")
    return str(ip), port


def _meta_disk(st: RawStatement) -> MetaDisk:
    words = st.words
    if words == ["internal"]:
        return MetaDisk()
    index_text = None
    if len(words) == 1:
        joined = _META_JOINED.fullmatch(words[0])
        path, index_text = (joined.group(1), joined.group(2)) if joined else (words[0], None)
    elif len(words) == 2 and _META_INDEX.fullmatch(words[1]):
        path, index_text = words[0], words[1][1:-1]
    else:
        raise config_error(st.where, f"cannot understand 'meta-disk {' '.join(words)}' "
                                     f"(expected 'internal', 'PATH' or 'PATH [INDEX]')")
    if path == "internal":
        raise config_error(st.where, "'meta-disk internal' takes no index")
    index = _whole(index_text) if index_text is not None else None
    if index_text is not None and index is None:
        raise config_error(st.where, f"meta-disk index '{index_text}' is not a whole number "
                                     f"of at most {MAX_DIGITS} digits")
    return MetaDisk(internal=False, path=path, index=index)


def _node_id(st: RawStatement) -> int:
    node_id = _whole(st.words[0]) if len(st.words) == 1 else None
    if node_id is None or node_id > MAX_NODE_ID:
        raise config_error(st.where, f"node-id must be a number from 0 to {MAX_NODE_ID}, "
                                     f"got '{' '.join(st.words)}'")
    return node_id


def _endpoint(host: Host) -> str:
    if ":" in host.address:
        return f"[{host.address}]:{host.port}"
    return f"{host.address}:{host.port}"


def _check_unique_per_host(resources: dict[str, Resource]) -> None:
    """Two resources on one node may not share an address:port, minor, device or disk."""
    seen: dict[tuple[str, str, object], tuple[str, Location | None]] = {}
    for res in resources.values():
        for host in res.hosts:
            for what, value in (("address", _endpoint(host)), ("minor", host.minor),
                                ("device", host.device), ("disk", host.disk)):
                key = (host.name, what, value)
                if key in seen:
                    other, where = seen[key]
                    raise config_error(host.where, f"{what} {value} of host {host.name} in "
                                                   f"resource {res.name} is already used by "
                                                   f"resource {other} (at {where})")
                seen[key] = (res.name, host.where)


# --- which resources run on this node ----------------------------------

def for_node(config: Config, node_name: str) -> list[Resource]:
    """The resources that have an ``on NODE`` section for node_name, in file order."""
    return [res for res in config.resources.values() if res.host(node_name) is not None]


def check_node(config: Config, resource: Resource | str, node_name: str) -> Host:
    """This node's Host in resource, or EXIT_CONFIG if the resource is not configured here."""
    if isinstance(resource, str):
        if resource not in config.resources:
            raise ReplfsError(f"{config.path}: no resource named '{resource}' in the "
                              f"configuration", EXIT_CONFIG)
        resource = config.resources[resource]
    host = resource.host(node_name)
    if host is None:
        raise config_error(resource.where, f"resource {resource.name} has no 'on {node_name}' "
                                           f"section for this node (node name is "
                                           f"'{node_name}'; use --node or REPLFS_NODE to "
                                           f"override)")
    return host
