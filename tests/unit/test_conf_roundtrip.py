"""parse(dump(x)) == x for generated configurations.

The strategy builds model objects directly (not text), the way post-parse
would leave them: common options already merged under each resource,
protocols explicit, minors known.  dump must then write text that the
reader turns back into an equal Config.
"""
from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replfs.blockrepl.conf import Config, Host, MetaDisk, Resource, Section, dump, parse_text
from replfs.blockrepl.conf import options as opts

# Characters that force quoting and escaping, plus ordinary ones.
TRICKY = "ab Z09-_./:;#{}\"\\[]"
names = st.text(alphabet=TRICKY, min_size=1, max_size=10)
paths = st.text(alphabet="abz09-_./ ;#{}\"\\", min_size=1, max_size=12).map(lambda s: "/" + s)
free_values = st.text(alphabet=TRICKY, max_size=12)


def implemented_value(section: str, name: str) -> st.SearchStrategy[str]:
    if name == "tls":
        return st.sampled_from(["yes", "no"])
    if name == "allow-two-primaries":
        return st.just("no")  # "yes"/flag only where protocol C is known; see resources()
    if name in opts.AFTER_SB:
        return st.sampled_from(opts.AFTER_SB[name])
    if name == "on-io-error":
        return st.sampled_from(opts.ON_IO_ERROR)
    if name == "fencing":
        return st.sampled_from(opts.FENCING)
    if name == "on-congestion":
        return st.just("block")  # the others only with protocol A; see test_conf.py
    if name in ("csums-alg", "data-integrity-alg", "verify-alg"):
        return st.sampled_from(opts.digest_algorithms())
    if name in opts.RANGES:
        lo, hi = opts.RANGES[name]
        return st.integers(lo, hi).map(str)
    if name in opts.INTEGER.get(section, ()):
        return st.integers(0, 10**6).map(str)
    if name in opts.SIZE.get(section, ()):
        return st.tuples(st.integers(0, 10**5), st.sampled_from(["", "k", "M", "G"])).map(
            lambda t: f"{t[0]}{t[1]}")
    return st.text(alphabet=TRICKY, min_size=1, max_size=12)  # shared-secret


@st.composite
def option(draw, section: str) -> tuple[str, str]:
    if section == "handlers":
        name = draw(st.text(alphabet="abcdefghijklmnop-", min_size=1, max_size=12)
                    .filter(lambda s: s != "skip"))
        return name, draw(free_values)
    candidates = sorted(opts.KNOWN[section] - {"protocol"})
    name = draw(st.sampled_from(candidates))
    if opts.is_implemented(section, name):
        return name, draw(implemented_value(section, name))
    return name, draw(free_values)


def section(name: str) -> st.SearchStrategy[Section]:
    return st.lists(option(name), max_size=4).map(lambda o: Section(tuple(o)))


@st.composite
def hosts(draw, index: int) -> tuple[Host, Host]:
    first, second = draw(st.lists(names, min_size=2, max_size=2, unique=True))
    minor = index + 100 * draw(st.integers(0, 3))
    custom_device = draw(st.booleans())
    device = draw(paths) + f"#{index}" if custom_device else f"/dev/drbd{minor}"
    disk = draw(paths) + f"@{index}"
    ipv6 = draw(st.booleans())
    with_ids = draw(st.booleans())
    result = []
    for j, name in enumerate((first, second)):
        if ipv6:
            address = str(ipaddress.IPv6Address((0xfd00 << 112) + (index << 16) + j + 1))
        else:
            address = f"10.{index}.{j}.1"
        meta = draw(st.one_of(
            st.just(MetaDisk()),
            st.builds(MetaDisk, internal=st.just(False),
                      path=paths.filter(lambda p: "[" not in p and p != "internal"),
                      index=st.one_of(st.none(), st.integers(0, 9)))))
        result.append(Host(name=name, device=device, minor=minor, disk=disk, address=address,
                           port=draw(st.integers(1, 65535)), meta_disk=meta,
                           node_id=j if with_ids else None))
    return result[0], result[1]


@st.composite
def configs(draw) -> Config:
    common_names = draw(st.sets(st.sampled_from(opts.SECTIONS)))
    common = {name: draw(section(name)) for name in sorted(common_names)}
    resource_names = draw(st.lists(names, max_size=4, unique=True))
    resources = {}
    for index, name in enumerate(resource_names):
        protocol = draw(st.sampled_from("ABC"))
        own = {s: draw(section(s)) for s in opts.SECTIONS}
        if protocol == "C" and draw(st.booleans()):
            flag = draw(st.sampled_from(["", "yes"]))
            own["net"] = Section(own["net"].options + (("allow-two-primaries", flag),))
        merged = {s: own[s].merged_over(common.get(s, Section())) for s in opts.SECTIONS}
        resources[name] = Resource(name=name, protocol=protocol, hosts=draw(hosts(index)),
                                   **merged)
    return Config(path="gen.conf", resources=resources, global_=draw(section("global")),
                  common=common, common_protocol=draw(st.sampled_from([None, "A", "B", "C"])))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_parse_of_dump_is_identity(config):
    text = dump(config)
    assert parse_text(text, config.path) == config


@settings(max_examples=60, deadline=None)
@given(configs())
def test_dump_is_canonical(config):
    text = dump(config)
    assert dump(parse_text(text, config.path)) == text


@settings(max_examples=60, deadline=None)
@given(configs())
def test_dump_of_one_resource_parses_alone(config):
    for res in config.resources.values():
        again = parse_text(dump(config, res), "one.conf")
        assert list(again.resources) == [res.name]
        assert again.resource(res.name) == res


def test_roundtrip_catches_a_difference():
    """The comparison is not vacuous: a changed field makes configs differ."""
    base = parse_text("resource r { on a { device /dev/drbd0; disk /d; address 127.0.0.1:1; }"
                      " on b { device /dev/drbd0; disk /d; address 127.0.0.2:1; } }")
    other = parse_text(dump(base).replace("127.0.0.2:1", "127.0.0.2:2"))
    assert other != base
