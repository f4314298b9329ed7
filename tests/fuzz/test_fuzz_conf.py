"""Fuzzing the configuration readers: replfs.conf (blockrepl/conf: lexer,
parser, post-parse), cluster.conf and the o2cb timeouts file
(locking/cluster_conf.py).

Whatever the text, a reader either gives a configuration or raises
ReplfsError with the exit code of a syntax (2) or configuration (10)
error and a message that starts with ``FILE:LINE: `` -- never another
exception, never a hang.  A configuration it accepts must also work:
every typed value of the model can be computed, and the canonical dump
reads back to the same configuration (``parse(dump(x)) == x``).

Each reader gets HYP inputs from hypothesis and RANDOM from a seeded
random.Random in make test, a million under make soak.  Inputs start
from the examples of man/replfs.conf.5 and man/cluster.conf.5
and the configurations below, mutated character-, token- and line-wise
(tests/fuzz/mutators.py); arbitrary text and token soup come on top.
Regression inputs found by the fuzzers are kept as explicit examples.
"""
from __future__ import annotations

import os
import pathlib
import re
import time

import pytest
from hypothesis import example, given

from replfs.blockrepl import conf
from replfs.errors import EXIT_CONFIG, EXIT_SYNTAX, ReplfsError
from replfs.locking import cluster_conf as cc

from .mutators import HYP, RANDOM, SIZES, fuzz_settings, hyp, soak_run, text_input

MAN = pathlib.Path(__file__).resolve().parents[2] / "man"


def _man(name: str, start: str, end: str) -> list[str]:
    text = (MAN / name).read_text().replace("\\-", "-").replace("\\e", "\\")
    return re.findall(rf"^\{start}\n(.*?)^\{end}$", text, flags=re.S | re.M)


REPLFS_SEEDS = _man("replfs.conf.5", ".EX", ".EE") + [
    """\
global { usage-count yes; minor-count 8; }
common {
        protocol C;
        handlers { split-brain "/usr/lib/drbd/notify-split-brain.sh root"; fence-peer x; }
        startup { wfc-timeout 120; degr-wfc-timeout 60; }
        disk { on-io-error detach; resync-rate 40M; al-extents 257; }
        net { cram-hmac-alg sha1; shared-secret "secret"; ping-timeout 5; timeout 60; }
        skip { anything { nested } goes ; here }
}
resource r0 {
        net { protocol C; allow-two-primaries yes; after-sb-1pri consensus; fencing resource-only; }
        syncer { rate 10M; verify-alg sha1; al-extents 1237; }
        options { cpu-mask 0; }
        device /dev/drbd7;
        disk /var/lib/replfs/r0.img;
        meta-disk /var/lib/replfs/meta.img [2];
        on alpha { address ipv4 10.0.0.1:7789; node-id 0; }
        on beta {
                address ipv6 [fd00::2]:7789;
                node-id 1;
                flexible-meta-disk "/var/lib/replfs/meta b.img"[3];
        }
}
resource "r 1" {
        protocol B;
        on "alpha" { device minor 9; disk "/tmp/a b.img"; address 10.0.0.1:7790; meta-disk internal; }
        on beta { device /dev/replfs9 minor 9; disk /tmp/b.img; address 10.0.0.2:7790; }
}
""",
    """\
resource r0 {
        protocol A;
        on test03 {
                device  /dev/drbd0;
                disk    /dev/sdb1;
                address 192.168.1.3:7789;
                meta-disk       internal;
        }
        on test04 {
                device  /dev/drbd0;
                disk    /dev/sdb1;
                address 192.168.1.4:7789;
                meta-disk       internal;
        }
}
include "replfs.d/*.res";
""",
]

CLUSTER_SEEDS = [s for s in _man("cluster.conf.5", ".nf", ".fi") if "node:" in s] + [
    "node:\n\tip_port = 7777\n\tip_address = 10.0.0.1\n\tnumber = 0\n\tname = a\n"
    "\tcluster = c\n\nnode:\n\tip_port = 7778\n\tip_address = 10.0.0.1\n\tnumber = 7\n"
    "\tname = b\n\tcluster = c\n\ncluster:\n\tnode_count = 2\n\tname = c\n"
    "\theartbeat_mode = global\n\n# a comment\nheartbeat:\n\tregion = 0A1B2C\n"
    "\tcluster = c\n",
]

TIMEOUT_SEEDS = [s for s in _man("cluster.conf.5", ".nf", ".fi") if "O2CB_" in s] + [
    "# o2cb\nO2CB_ENABLED=true\nO2CB_BOOTCLUSTER=ocfs2\nO2CB_HEARTBEAT_THRESHOLD=31\n"
    "export O2CB_IDLE_TIMEOUT_MS=\"30000\"\nO2CB_KEEPALIVE_DELAY_MS='2000'\n"
    "O2CB_RECONNECT_DELAY_MS=\n",
]

# What an included file may say (replfs.d/*.res next to the fuzzed file).
INCLUDED = """\
resource inc {
        device /dev/drbd20; disk /tmp/inc.img; meta-disk internal;
        on gamma { address 10.1.0.1:7800; }
        on delta { address 10.1.0.2:7800; }
}
"""

# Inputs the fuzzers found, kept as regression examples (each crashed a
# reader with something other than ReplfsError before its fix).
_BIG = "9" * 5000
_HOSTS = ("on a {{ device {dev}; disk /a; address 10.0.0.1:{port}; node-id {nid}; "
          "meta-disk {meta}; }}\n on b {{ device /dev/drbd1; disk /b; address 10.0.0.2:7; "
          "node-id 1; }}")
_RES = "resource r {{\n {net}\n " + _HOSTS + "\n}}\n"
_OK = dict(dev="/dev/drbd1", port="7", nid="0", meta="internal", net="")
REPLFS_REGRESSIONS = [
    # int() of more than 4300 digits: ValueError
    _RES.format(**{**_OK, "dev": "minor " + _BIG}),
    _RES.format(**{**_OK, "dev": "/dev/drbd" + _BIG}),
    _RES.format(**{**_OK, "port": _BIG}),
    _RES.format(**{**_OK, "nid": _BIG}),
    _RES.format(**{**_OK, "meta": "/m [" + _BIG + "]"}),
    _RES.format(**{**_OK, "meta": "/m[" + _BIG + "]"}),
    # accepted, then the model's typed value failed: ValueError, or
    # OverflowError (int of an infinite float)
    _RES.format(**{**_OK, "net": "net { ping-int " + _BIG + "; }"}),
    _RES.format(**{**_OK, "net": "disk { al-extents " + _BIG + "; }"}),
    _RES.format(**{**_OK, "net": "disk { resync-rate " + "1" * 400 + "M; }"}),
    _RES.format(**{**_OK, "net": "disk { al-extents " + "0" * 5000 + "7; }"}),
    _RES.format(**{**_OK, "net": "syncer { rate " + "0" * 5000 + "7M; }"}),
    # ValueError (embedded null byte) from the file functions
    'include "re\x00fs.d/*.res";\n',
    'include "replfs.d/inc.res\x00";\n',
]
CLUSTER_REGRESSIONS = [
    # str.isdigit() takes '²', int() does not: ValueError
    "node:\n ip_port = ²\n ip_address = 10.0.0.1\n number = 0\n name = a\n cluster = c\n",
    "node:\n ip_port = 7\n ip_address = 10.0.0.1\n number = " + _BIG + "\n name = a\n"
    " cluster = c\n",
]
TIMEOUT_REGRESSIONS = [
    "O2CB_IDLE_TIMEOUT_MS=²\n",
    "O2CB_HEARTBEAT_THRESHOLD=" + _BIG + "\n",
]


def examples(*texts):
    """Decorate a text fuzzer with regression examples."""
    def deco(f):
        for t in texts:
            f = example(text=t)(f)
        return f
    return deco


_LOCATION = re.compile(r"(?P<file>[^\n]+?):(?P<line>\d+): ")


@pytest.fixture(scope="module")
def confdir(tmp_path_factory) -> pathlib.Path:
    """A directory for the fuzzed file's includes: replfs.d/inc.res."""
    d = tmp_path_factory.mktemp("fuzzconf")
    (d / "replfs.d").mkdir()
    (d / "replfs.d" / "inc.res").write_text(INCLUDED)
    return d


def _lines(text: str) -> int:
    return text.count("\n") + 1


def _located(e: ReplfsError, files: dict[str, int]) -> None:
    """``e`` is a config error that names one of ``files`` (path -> lines)
    and a line of it."""
    assert e.exit_code in (EXIT_SYNTAX, EXIT_CONFIG), (e.exit_code, e.message)
    m = _LOCATION.match(e.message)
    assert m, f"no FILE:LINE in {e.message!r}"
    assert m["file"] in files, f"unknown file in {e.message!r}"
    assert 1 <= int(m["line"]) <= files[m["file"]], f"bad line in {e.message!r}"


def check_replfs_conf(text: str, confdir: pathlib.Path) -> None:
    path = str(confdir / "replfs.conf")
    t0 = time.monotonic()
    try:
        config = conf.parse_text(text, path)
    except ReplfsError as e:
        _located(e, {path: _lines(text),
                     str(confdir / "replfs.d" / "inc.res"): _lines(INCLUDED)})
        return
    finally:
        assert time.monotonic() - t0 < 10, "parse took more than 10 s"
    for res in config.resources.values():
        for name, value in vars(type(res)).items():
            if isinstance(value, property):
                getattr(res, name)
    assert conf.parse_text(conf.dump(config), path) == config


def check_cluster_conf(text: str) -> None:
    try:
        parsed = cc.parse(text, "cluster.conf")
    except ReplfsError as e:
        _located(e, {"cluster.conf": max(1, len(text.splitlines()))})
        return
    assert cc.parse(cc.dump(parsed), "cluster.conf") == parsed


def check_timeouts(text: str) -> None:
    try:
        t = cc.parse_timeouts(text, "o2cb")
    except ReplfsError as e:
        _located(e, {"o2cb": max(1, len(text.splitlines()))})
        return
    assert t.heartbeat_threshold >= 2 and t.keepalive_delay_ms < t.idle_timeout_ms
    assert t.dead_after_seconds >= 2


# ---------------------------------------------------------------- replfs.conf

@fuzz_settings(HYP)
@given(text=hyp(text_input, REPLFS_SEEDS))
@examples(*REPLFS_REGRESSIONS)
def test_replfs_conf(confdir, text):
    check_replfs_conf(text, confdir)


@pytest.mark.parametrize("n", SIZES)
def test_replfs_conf_random(confdir, n, report):
    rate = soak_run(n, text_input, (REPLFS_SEEDS,), lambda t: check_replfs_conf(t, confdir))
    if n > RANDOM:              # the soak runs say how fast they went
        report(f"replfs.conf: {n} inputs, {rate:.0f} inputs/s")


def test_replfs_conf_seeds_parse(confdir):
    """The seeds are valid, so mutations start from accepted text."""
    for text in REPLFS_SEEDS:
        assert conf.parse_text(text, str(confdir / "replfs.conf")) is not None


def _bytes_of(d) -> bytes:
    if d.coin():
        return d.binary(0, 300)
    return text_input(d, REPLFS_SEEDS).encode("utf-8", "surrogatepass")


@fuzz_settings(200)
@given(raw=hyp(_bytes_of))
@example(raw=b"\x80")              # no FILE:LINE for a file that is not UTF-8
@example(raw=b"global {\r usage-count no; }\r\xff")
def test_replfs_conf_file_bytes(confdir, raw):
    """load() of a file with arbitrary bytes (not UTF-8, NUL, CR, ...)."""
    path = confdir / "bytes.conf"
    path.write_bytes(raw)
    try:
        config = conf.load(str(path))
    except ReplfsError as e:
        _located(e, {str(path): raw.count(b"\n") + raw.count(b"\r") + 1,
                     str(confdir / "replfs.d" / "inc.res"): _lines(INCLUDED)})
    else:
        assert config.path == str(path)


# ---------------------------------------------------------------- cluster.conf

@fuzz_settings(HYP)
@given(text=hyp(text_input, CLUSTER_SEEDS))
@examples(*CLUSTER_REGRESSIONS)
def test_cluster_conf(text):
    check_cluster_conf(text)


@pytest.mark.parametrize("n", SIZES)
def test_cluster_conf_random(n, report):
    rate = soak_run(n, text_input, (CLUSTER_SEEDS,), check_cluster_conf)
    if n > RANDOM:              # the soak runs say how fast they went
        report(f"cluster.conf: {n} inputs, {rate:.0f} inputs/s")


def test_cluster_conf_seeds_parse():
    for text in CLUSTER_SEEDS:
        assert cc.parse(text).nodes


# ---------------------------------------------------------------- o2cb timeouts

@fuzz_settings(HYP)
@given(text=hyp(text_input, TIMEOUT_SEEDS))
@examples(*TIMEOUT_REGRESSIONS)
def test_o2cb_timeouts(text):
    check_timeouts(text)


@pytest.mark.parametrize("n", SIZES)
def test_o2cb_timeouts_random(n, report):
    rate = soak_run(n, text_input, (TIMEOUT_SEEDS,), check_timeouts)
    if n > RANDOM:              # the soak runs say how fast they went
        report(f"o2cb timeouts: {n} inputs, {rate:.0f} inputs/s")


def test_o2cb_timeout_seeds_parse():
    for text in TIMEOUT_SEEDS:
        assert cc.parse_timeouts(text).idle_timeout_ms > 0


# ---------------------------------------------------------------- includes

def test_include_of_a_fifo_or_device_is_refused(tmp_path):
    """A pattern may match anything: a FIFO used to block the reader for
    ever (open waits for a writer), /dev/zero to feed it without end."""
    os.mkfifo(tmp_path / "pipe.res")
    (tmp_path / "replfs.conf").write_text('include "*.res";\n')
    with pytest.raises(ReplfsError, match="pipe.res' is not a regular file") as info:
        conf.load(str(tmp_path / "replfs.conf"))
    _located(info.value, {str(tmp_path / "replfs.conf"): 2})
    (tmp_path / "zero.conf").write_text('include "/dev/zero";\n')
    with pytest.raises(ReplfsError, match="is not a regular file"):
        conf.load(str(tmp_path / "zero.conf"))


def test_include_fan_out_is_bounded(tmp_path):
    """Levels of two files, each including both files of the next level
    (no loop, so the depth limit does not end it): 2**30 files read."""
    for level in range(30):
        for x in "ab":
            (tmp_path / f"l{level}{x}.conf").write_text(f'include "l{level + 1}?.conf";\n')
    t0 = time.monotonic()
    with pytest.raises(ReplfsError, match="more than 1000 files included") as info:
        conf.load(str(tmp_path / "l0a.conf"))
    assert time.monotonic() - t0 < 30
    assert info.value.exit_code == EXIT_SYNTAX


def test_oversized_file_is_refused(tmp_path):
    path = tmp_path / "big.conf"
    with open(path, "wb") as f:
        f.write(b"# x\n" * ((16 << 20) // 4 + 1))
    with pytest.raises(ReplfsError, match="larger than 16 MiB"):
        conf.load(str(path))
