"""The o2cb node table (``cluster.conf``) and the o2cb timeouts file.

The node table keeps the format ocfs2-tools writes, byte for byte in
spirit: stanza headers (``node:``, ``cluster:``, ``heartbeat:``) start at
column 0, and each following indented line (tab or spaces) is a
``key = value`` pair belonging to that stanza.  Blank lines and lines
starting with ``#`` are ignored.  Addresses are parsed and checked for
form only; nothing here opens a socket.

Reading happens in two stages, like drbdadm: ``parse`` turns text into
stanzas and checks each line on its own (file:line errors), then
``_validate`` checks the table as a whole (counts, duplicates, cross
references), still pointing at the offending line.  ``dump`` writes the
canonical form back, and ``parse(dump(conf)) == conf``.

The timeouts file is the ``/etc/default/o2cb`` shell-variable file; only
the four o2cb timeout variables are read, everything else in it (for
example ``O2CB_ENABLED`` or ``O2CB_BOOTCLUSTER``) is left to other tools.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Optional

from replfs.errors import EXIT_CONFIG, EXIT_SYNTAX, ReplfsError

DEFAULT_PATH = "/etc/replfs/cluster.conf"
DEFAULT_TIMEOUTS_PATH = "/etc/default/o2cb"

# o2nm keeps node numbers in a u8 and reserves 255 as "no node".
MAX_NODE_NUMBER = 254
HEARTBEAT_MODES = ("local", "global")


@dataclass(frozen=True)
class Node:
    name: str
    number: int
    ip_address: str
    ip_port: int
    cluster: str


@dataclass(frozen=True)
class Cluster:
    name: str
    node_count: int
    heartbeat_mode: Optional[str] = None
    # replfs's own keys (o2cb has none): "yes" secures the cluster link
    # with TLS (replfs/tls.py; the files in tls/ next to cluster.conf);
    # the fence agent (locking/fence.py), its delay and time limit (s)
    tls: Optional[str] = None
    fence_agent: Optional[str] = None
    fence_delay: Optional[int] = None
    fence_timeout: Optional[int] = None


@dataclass(frozen=True)
class Heartbeat:
    region: str
    cluster: str


@dataclass(frozen=True)
class ClusterConf:
    """The whole table, in file order (order matters for dump)."""

    nodes: tuple[Node, ...] = ()
    clusters: tuple[Cluster, ...] = ()
    heartbeats: tuple[Heartbeat, ...] = ()

    def cluster(self, name: str) -> Cluster:
        for c in self.clusters:
            if c.name == name:
                return c
        raise KeyError(name)

    def nodes_of(self, cluster: str) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.cluster == cluster)

    def node_by_number(self, number: int) -> Node:
        for n in self.nodes:
            if n.number == number:
                return n
        raise KeyError(number)


# Key order here is the order dump() writes them in, which is the order
# o2cb_ctl writes them in.
_STANZA_KEYS = {
    "node": ("ip_port", "ip_address", "number", "name", "cluster"),
    "cluster": ("node_count", "name", "heartbeat_mode", "tls", "fence_agent", "fence_delay",
                "fence_timeout"),
    "heartbeat": ("region", "cluster"),
}
_OPTIONAL_KEYS = {"cluster": {"heartbeat_mode", "tls", "fence_agent", "fence_delay",
                               "fence_timeout"}}


@dataclass
class _Stanza:
    kind: str
    line: int
    values: dict = field(default_factory=dict)  # key -> (value, line)


def _fail(filename: str, line: int, what: str, code: int = EXIT_CONFIG) -> ReplfsError:
    return ReplfsError(f"{filename}:{line}: {what}", code)


def _lex(text: str, filename: str) -> list[_Stanza]:
    stanzas: list[_Stanza] = []
    current: Optional[_Stanza] = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indented = raw[0] in " \t"
        if not indented:
            if not stripped.endswith(":") or " " in stripped or "\t" in stripped:
                raise _fail(filename, lineno,
                            f"expected a stanza header like 'node:', got {stripped!r}",
                            EXIT_SYNTAX)
            kind = stripped[:-1]
            if kind not in _STANZA_KEYS:
                raise _fail(filename, lineno,
                            f"unknown stanza {kind!r} (known: node, cluster, heartbeat)")
            current = _Stanza(kind, lineno)
            stanzas.append(current)
            continue
        if current is None:
            raise _fail(filename, lineno,
                        "indented 'key = value' line before any stanza header", EXIT_SYNTAX)
        key, sep, value = stripped.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise _fail(filename, lineno, f"expected 'key = value', got {stripped!r}",
                        EXIT_SYNTAX)
        if key not in _STANZA_KEYS[current.kind]:
            raise _fail(filename, lineno,
                        f"unknown key {key!r} in {current.kind} stanza "
                        f"(known: {', '.join(_STANZA_KEYS[current.kind])})")
        if key in current.values:
            raise _fail(filename, lineno,
                        f"{key} given twice in the {current.kind} stanza "
                        f"(first at line {current.values[key][1]})")
        if not value:
            raise _fail(filename, lineno, f"{key} has an empty value")
        current.values[key] = (value, lineno)
    return stanzas


def _decimal(text: str) -> int | None:
    """The value of ``text`` if it is an ASCII decimal number of at most
    18 digits (leading zeros aside), else None.  str.isdigit() alone also
    takes digits int() refuses ('²') and numbers of more than 4300
    digits, which int() refuses too."""
    if not (text.isascii() and text.isdigit()):
        return None
    text = text.lstrip("0") or "0"
    return int(text) if len(text) <= 18 else None


def _show(value: str) -> str:
    """``value`` for a message: repr, cut short."""
    return repr(value if len(value) <= 40 else value[:40] + "...")


def _number(filename: str, st: _Stanza, key: str, lo: int, hi: int) -> int:
    value, line = st.values[key]
    if not (value.isascii() and value.isdigit()):
        raise _fail(filename, line, f"{key} must be a decimal number, got {_show(value)}")
    n = _decimal(value)
    if n is None or not lo <= n <= hi:
        raise _fail(filename, line, f"{key} {_show(value)[1:-1]} out of range {lo}..{hi}")
    return n


def _build(stanzas: list[_Stanza], filename: str):
    nodes, clusters, heartbeats = [], [], []
    lines: dict[int, _Stanza] = {}  # id(object) -> stanza, for later error lines
    for st in stanzas:
        for key in _STANZA_KEYS[st.kind]:
            if key not in st.values and key not in _OPTIONAL_KEYS.get(st.kind, ()):
                raise _fail(filename, st.line, f"{st.kind} stanza is missing {key}")
        v = {k: val for k, (val, _) in st.values.items()}
        if st.kind == "node":
            try:
                ipaddress.IPv4Address(v["ip_address"])
            except ValueError:
                raise _fail(filename, st.values["ip_address"][1],
                            f"ip_address {v['ip_address']!r} is not a dotted IPv4 address")
            obj = Node(name=v["name"],
                       number=_number(filename, st, "number", 0, MAX_NODE_NUMBER),
                       ip_address=v["ip_address"],
                       ip_port=_number(filename, st, "ip_port", 1, 65535),
                       cluster=v["cluster"])
            nodes.append(obj)
        elif st.kind == "cluster":
            mode = v.get("heartbeat_mode")
            if mode is not None and mode not in HEARTBEAT_MODES:
                raise _fail(filename, st.values["heartbeat_mode"][1],
                            f"heartbeat_mode must be local or global, got {mode!r}")
            tls = v.get("tls")
            if tls is not None and tls not in ("yes", "no"):
                raise _fail(filename, st.values["tls"][1],
                            f"tls must be yes or no, got {tls!r}")
            for key in ("fence_delay", "fence_timeout"):
                if key in v and "fence_agent" not in v:
                    raise _fail(filename, st.values[key][1],
                                f"{key} has no effect without fence_agent")
            obj = Cluster(name=v["name"],
                          node_count=_number(filename, st, "node_count", 0,
                                             MAX_NODE_NUMBER + 1),
                          heartbeat_mode=mode, tls=tls, fence_agent=v.get("fence_agent"),
                          fence_delay=(_number(filename, st, "fence_delay", 0, 600)
                                       if "fence_delay" in v else None),
                          fence_timeout=(_number(filename, st, "fence_timeout", 1, 3600)
                                         if "fence_timeout" in v else None))
            clusters.append(obj)
        else:
            region = v["region"]
            if not all(c in "0123456789abcdefABCDEF" for c in region):
                raise _fail(filename, st.values["region"][1],
                            f"heartbeat region must be a hex string, got {region!r}")
            obj = Heartbeat(region=region, cluster=v["cluster"])
            heartbeats.append(obj)
        lines[id(obj)] = st
    return nodes, clusters, heartbeats, lines


def _validate(nodes, clusters, heartbeats, lines, filename: str) -> None:
    def where(obj, key=None):
        st = lines[id(obj)]
        return st.values[key][1] if key else st.line

    seen_clusters: dict[str, Cluster] = {}
    for c in clusters:
        if c.name in seen_clusters:
            raise _fail(filename, where(c, "name"),
                        f"cluster {c.name!r} defined twice "
                        f"(first at line {where(seen_clusters[c.name])})")
        seen_clusters[c.name] = c
    numbers: dict[tuple[str, int], Node] = {}
    names: dict[str, Node] = {}
    endpoints: dict[tuple[str, int], Node] = {}
    for n in nodes:
        if n.cluster not in seen_clusters:
            raise _fail(filename, where(n, "cluster"),
                        f"node {n.name} names unknown cluster {n.cluster!r}")
        if (n.cluster, n.number) in numbers:
            other = numbers[(n.cluster, n.number)]
            raise _fail(filename, where(n, "number"),
                        f"node number {n.number} of {n.name} is already used by "
                        f"{other.name} (line {where(other)})")
        if n.name in names:
            raise _fail(filename, where(n, "name"),
                        f"node name {n.name} is already used (line {where(names[n.name])})")
        ep = (n.ip_address, n.ip_port)
        if ep in endpoints:
            raise _fail(filename, where(n, "ip_address"),
                        f"{n.ip_address}:{n.ip_port} of {n.name} is already used by "
                        f"{endpoints[ep].name} (line {where(endpoints[ep])})")
        numbers[(n.cluster, n.number)] = n
        names[n.name] = n
        endpoints[ep] = n
    for c in clusters:
        have = sum(1 for n in nodes if n.cluster == c.name)
        if have != c.node_count:
            raise _fail(filename, where(c, "node_count"),
                        f"cluster {c.name} says node_count = {c.node_count} "
                        f"but {have} node stanza(s) name it")
    for hb in heartbeats:
        if hb.cluster not in seen_clusters:
            raise _fail(filename, where(hb, "cluster"),
                        f"heartbeat region {hb.region} names unknown cluster {hb.cluster!r}")


def parse(text: str, filename: str = "<cluster.conf>") -> ClusterConf:
    """Parse and validate a node table; raises ReplfsError with file:line."""
    stanzas = _lex(text, filename)
    nodes, clusters, heartbeats, lines = _build(stanzas, filename)
    _validate(nodes, clusters, heartbeats, lines, filename)
    return ClusterConf(tuple(nodes), tuple(clusters), tuple(heartbeats))


def load(path: str = DEFAULT_PATH) -> ClusterConf:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ReplfsError(f"{path}: no such file (the cluster node table)", EXIT_CONFIG)
    except (OSError, UnicodeDecodeError) as e:
        raise ReplfsError(f"{path}: cannot read: {e}", EXIT_CONFIG)
    return parse(text, path)


def dump(conf: ClusterConf) -> str:
    """Write the table in the canonical o2cb layout: nodes, clusters, heartbeats."""
    out: list[str] = []

    def stanza(kind: str, values: dict) -> None:
        out.append(f"{kind}:")
        for key in _STANZA_KEYS[kind]:
            if values.get(key) is not None:
                out.append(f"\t{key} = {values[key]}")
        out.append("")

    for n in conf.nodes:
        stanza("node", {"ip_port": n.ip_port, "ip_address": n.ip_address,
                        "number": n.number, "name": n.name, "cluster": n.cluster})
    for c in conf.clusters:
        stanza("cluster", {"node_count": c.node_count, "name": c.name,
                           "heartbeat_mode": c.heartbeat_mode, "tls": c.tls,
                           "fence_agent": c.fence_agent, "fence_delay": c.fence_delay,
                           "fence_timeout": c.fence_timeout})
    for hb in conf.heartbeats:
        stanza("heartbeat", {"region": hb.region, "cluster": hb.cluster})
    return "\n".join(out)


def this_node(conf: ClusterConf, name: str) -> Node:
    """The node stanza for ``name`` (normally ``uname -n`` or --node)."""
    for n in conf.nodes:
        if n.name == name:
            return n
    known = ", ".join(n.name for n in conf.nodes) or "none"
    raise ReplfsError(f"node {name!r} is not in the cluster node table (known: {known})",
                      EXIT_CONFIG)


# --------------------------------------------------------------- timeouts

@dataclass(frozen=True)
class Timeouts:
    """o2cb's four timeouts, under their o2cb names, with o2cb's defaults."""

    heartbeat_threshold: int = 31      # O2CB_HEARTBEAT_THRESHOLD, in 2 s disk beats
    idle_timeout_ms: int = 30000       # O2CB_IDLE_TIMEOUT_MS
    keepalive_delay_ms: int = 2000     # O2CB_KEEPALIVE_DELAY_MS
    reconnect_delay_ms: int = 2000     # O2CB_RECONNECT_DELAY_MS

    @property
    def dead_after_seconds(self) -> int:
        """Disk heartbeat: a node is dead after this long without a change."""
        return (self.heartbeat_threshold - 1) * 2


_TIMEOUT_VARS = {
    "O2CB_HEARTBEAT_THRESHOLD": "heartbeat_threshold",
    "O2CB_IDLE_TIMEOUT_MS": "idle_timeout_ms",
    "O2CB_KEEPALIVE_DELAY_MS": "keepalive_delay_ms",
    "O2CB_RECONNECT_DELAY_MS": "reconnect_delay_ms",
}


# o2cb keeps the timeouts in unsigned 32-bit configfs attributes.
_TIMEOUT_MAX = (1 << 32) - 1


def parse_timeouts(text: str, filename: str = "<o2cb>") -> Timeouts:
    """Read ``KEY=value`` lines; unset or empty variables keep the default."""
    found: dict[str, int] = {}
    lines: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].strip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key:
            raise _fail(filename, lineno, f"expected KEY=value, got {line!r}", EXIT_SYNTAX)
        if key not in _TIMEOUT_VARS:
            continue  # other o2cb settings are not ours to judge
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        if value == "":
            continue
        n = _decimal(value)
        if n is None or not 0 < n <= _TIMEOUT_MAX:
            raise _fail(filename, lineno, f"{key} must be a whole number from 1 to "
                                          f"{_TIMEOUT_MAX}, got {_show(value)}")
        found[_TIMEOUT_VARS[key]] = n
        lines[_TIMEOUT_VARS[key]] = lineno
    t = Timeouts(**found)
    if t.heartbeat_threshold < 2:
        raise _fail(filename, lines["heartbeat_threshold"],
                    "O2CB_HEARTBEAT_THRESHOLD must be at least 2")
    if t.keepalive_delay_ms >= t.idle_timeout_ms:
        line = lines.get("keepalive_delay_ms") or lines.get("idle_timeout_ms") or 0
        raise _fail(filename, line,
                    f"O2CB_KEEPALIVE_DELAY_MS ({t.keepalive_delay_ms}) must be smaller than "
                    f"O2CB_IDLE_TIMEOUT_MS ({t.idle_timeout_ms})")
    return t


def load_timeouts(path: str = DEFAULT_TIMEOUTS_PATH) -> Timeouts:
    """The timeouts file is optional: a missing file means o2cb's defaults."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return Timeouts()
    except (OSError, UnicodeDecodeError) as e:
        raise ReplfsError(f"{path}: cannot read: {e}", EXIT_CONFIG)
    return parse_timeouts(text, path)
