"""replfs.conf reading: the walkthrough configs, includes, every refusal."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from replfs.blockrepl.conf import (
    DEFAULT_PATH, MetaDisk, Section, check_node, dump, for_node, load, parse_text,
)
from replfs.errors import EXIT_CONFIG, EXIT_SYNTAX, ReplfsError

WALKTHROUGH = """\
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
resource r1 {
        protocol C;
        net {
                allow-two-primaries;
        }
        on test-vm03.hyperdc.net {
                device  /dev/drbd1;
                disk    /dev/VG/OCFS2;
                address 122.213.181.233:7790;
                meta-disk       internal;
        }
        on test-vm04.hyperdc.net {
                device  /dev/drbd1;
                disk    /dev/VG/OCFS2;
                address 122.213.181.234:7790;
                meta-disk       internal;
        }
}
"""

GLOBAL_COMMON = """\
global { usage-count yes; } common { handlers { pri-on-incon-degr "/usr/lib/drbd/notify-pri-on-incon-degr.sh; reboot -f"; } startup { wfc-timeout 120; } disk { on-io-error detach; } net { cram-hmac-alg sha1; shared-secret "secret"; } }
include "drbd.d/*.res";
"""

# Two nodes that share no resource with the walkthrough; reused by error tests.
GOOD_HOSTS = """\
        on alpha {
                device /dev/drbd5;
                disk /tmp/a.img;
                address 127.0.0.1:7800;
        }
        on beta {
                device /dev/drbd5;
                disk /tmp/b.img;
                address 127.0.0.2:7800;
        }
"""


def error_of(text: str, path: str = "t.conf") -> ReplfsError:
    with pytest.raises(ReplfsError) as info:
        parse_text(textwrap.dedent(text), path)
    return info.value


# --- the walkthrough ---------------------------------------------------

def test_walkthrough_r0_and_r1_parse_verbatim():
    config = parse_text(WALKTHROUGH, "/etc/replfs/replfs.conf")
    assert list(config.resources) == ["r0", "r1"]
    r0, r1 = config.resource("r0"), config.resource("r1")
    assert r0.protocol == "A" and not r0.allow_two_primaries
    assert [h.name for h in r0.hosts] == ["test03", "test04"]
    t03 = r0.host("test03")
    assert (t03.device, t03.minor, t03.disk) == ("/dev/drbd0", 0, "/dev/sdb1")
    assert (t03.address, t03.port) == ("192.168.1.3", 7789)
    assert t03.meta_disk == MetaDisk(internal=True)
    assert r0.peer_of("test03").address == "192.168.1.4"
    assert r1.protocol == "C" and r1.allow_two_primaries
    assert r1.net == Section((("allow-two-primaries", ""),))
    vm04 = r1.host("test-vm04.hyperdc.net")
    assert (vm04.device, vm04.minor, vm04.disk) == ("/dev/drbd1", 1, "/dev/VG/OCFS2")
    assert (vm04.address, vm04.port) == ("122.213.181.234", 7790)
    assert str(r1.where) == "/etc/replfs/replfs.conf:16"
    assert str(vm04.where) == "/etc/replfs/replfs.conf:27"
    assert config.warnings == ()


def test_walkthrough_defaults_from_model():
    r0 = parse_text(WALKTHROUGH).resource("r0")
    assert r0.ping_int_s == 10 and r0.timeout_s == 6 and r0.ping_timeout_s == 0.5
    assert r0.after_sb_0pri == "disconnect" and r0.on_io_error == "detach"


def test_walkthrough_round_trips_through_dump():
    config = parse_text(WALKTHROUGH, "x.conf")
    text = dump(config)
    assert "\ton test03 {\n\t\tdevice" in text  # tabs, like drbdadm dump
    assert parse_text(text, "x.conf") == config
    one = dump(config, "r1")
    assert one.startswith("resource r1 {") and "r0" not in one
    assert parse_text(one).resource("r1") == config.resource("r1")


def test_walkthrough_from_file(tmp_path):
    path = tmp_path / "replfs.conf"
    path.write_text(WALKTHROUGH)
    config = load(str(path))
    assert config.path == str(path)
    assert config == parse_text(WALKTHROUGH, str(path))
    assert DEFAULT_PATH == "/etc/replfs/replfs.conf"


def test_for_node_and_check_node():
    config = parse_text(WALKTHROUGH, "w.conf")
    assert [r.name for r in for_node(config, "test03")] == ["r0"]
    assert [r.name for r in for_node(config, "test-vm04.hyperdc.net")] == ["r1"]
    assert for_node(config, "nobody") == []
    assert check_node(config, "r0", "test04").address == "192.168.1.4"
    assert check_node(config, config.resource("r1"), "test-vm03.hyperdc.net").port == 7790
    with pytest.raises(ReplfsError) as info:
        check_node(config, "r0", "test-vm03.hyperdc.net")
    assert info.value.exit_code == EXIT_CONFIG
    assert info.value.message == (
        "w.conf:1: resource r0 has no 'on test-vm03.hyperdc.net' section for this node "
        "(node name is 'test-vm03.hyperdc.net'; use --node or REPLFS_NODE to override)")
    with pytest.raises(ReplfsError) as info:
        check_node(config, "r9", "test03")
    assert info.value.exit_code == EXIT_CONFIG and "r9" in info.value.message


# --- DRBD 8.4 global_common.conf and includes ----------------------------

def test_global_common_with_include(tmp_path):
    (tmp_path / "drbd.d").mkdir()
    (tmp_path / "global_common.conf").write_text(GLOBAL_COMMON)
    (tmp_path / "drbd.d" / "r1.res").write_text(WALKTHROUGH.split("resource r1")[0])
    (tmp_path / "drbd.d" / "r2.res").write_text("resource r1" + WALKTHROUGH.split("resource r1")[1])
    (tmp_path / "drbd.d" / "ignored.txt").write_text("this is not { a config")
    config = load(str(tmp_path / "global_common.conf"))
    assert list(config.resources) == ["r0", "r1"]  # sorted glob: r1.res then r2.res
    assert config.global_ == Section((("usage-count", "yes"),))
    assert config.common["handlers"].get("pri-on-incon-degr") == \
        "/usr/lib/drbd/notify-pri-on-incon-degr.sh; reboot -f"
    r0 = config.resource("r0")
    assert r0.protocol == "A"
    assert r0.shared_secret == "secret"
    assert r0.net.get("cram-hmac-alg") == "sha1"
    assert r0.startup.get("wfc-timeout") == "120"
    assert r0.on_io_error == "detach"
    assert r0.handlers.has("pri-on-incon-degr")
    # where the included resource came from
    assert str(r0.where) == f"{tmp_path}/drbd.d/r1.res:1"
    gc = f"{tmp_path}/global_common.conf"
    assert config.warnings == (
        f"{gc}:1: warning: option 'usage-count' is accepted but has no effect in replfs",
        f"{gc}:1: warning: handler 'pri-on-incon-degr' is accepted but has no effect in replfs",
        f"{gc}:1: warning: option 'cram-hmac-alg' is accepted but has no effect in replfs",
    )
    assert parse_text(dump(config), config.path) == config


def test_resource_options_win_over_common():
    config = parse_text(textwrap.dedent("""\
        common { protocol B; net { ping-int 3; timeout 40; } disk { on-io-error pass_on; } }
        resource r { net { ping-int 7; } """ + GOOD_HOSTS + "}\n"))
    r = config.resource("r")
    assert r.protocol == "B"
    assert r.net.options == (("timeout", "40"), ("ping-int", "7"))
    assert r.ping_int_s == 7 and r.timeout_s == 4
    assert r.on_io_error == "pass_on"
    assert config.common_protocol == "B"
    assert parse_text(dump(config)) == config


def test_protocol_in_net_section_84_style():
    config = parse_text("resource r { net { protocol A; } " + GOOD_HOSTS + "}")
    assert config.resource("r").protocol == "A"
    assert not config.resource("r").net.has("protocol")
    assert parse_text("resource r {" + GOOD_HOSTS + "}").resource("r").protocol == "C"


def test_include_relative_to_including_file_and_nested(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b").mkdir()
    (tmp_path / "main.conf").write_text('include "a/first.conf";\n')
    (tmp_path / "a" / "first.conf").write_text("include b/*.res;\n")
    (tmp_path / "a" / "b" / "x.res").write_text("resource x {" + GOOD_HOSTS + "}\n")
    config = load(str(tmp_path / "main.conf"))
    assert list(config.resources) == ["x"]
    assert str(config.resource("x").where) == f"{tmp_path}/a/b/x.res:1"


def test_include_glob_without_match_is_fine_but_missing_file_is_not(tmp_path):
    (tmp_path / "m.conf").write_text('include "none/*.res";\n\ninclude "missing.conf";\n')
    with pytest.raises(ReplfsError) as info:
        load(str(tmp_path / "m.conf"))
    assert info.value.exit_code == EXIT_SYNTAX
    assert info.value.message == (f"{tmp_path}/m.conf:3: included file "
                                  f"'{tmp_path}/missing.conf' does not exist")


def test_include_loop_is_refused(tmp_path):
    (tmp_path / "loop.conf").write_text('include "loop.conf";\n')
    with pytest.raises(ReplfsError) as info:
        load(str(tmp_path / "loop.conf"))
    assert info.value.exit_code == EXIT_SYNTAX and "nested deeper" in info.value.message


def test_syntax_error_in_included_file_names_that_file(tmp_path):
    (tmp_path / "m.conf").write_text('include "bad.res";\n')
    (tmp_path / "bad.res").write_text("resource r {\n  protocol C\n}\n")
    with pytest.raises(ReplfsError) as info:
        load(str(tmp_path / "m.conf"))
    assert info.value.message == f"{tmp_path}/bad.res:3: expected ';' after 'protocol C', found '}}'"


def test_missing_file():
    with pytest.raises(ReplfsError) as info:
        load("/nonexistent/replfs.conf")
    assert info.value.message.startswith("cannot read config file '/nonexistent/replfs.conf'")


# --- statement forms ------------------------------------------------------

def test_device_address_meta_disk_forms():
    config = parse_text(textwrap.dedent("""\
        resource r {
            on alpha {
                device /dev/replfs-a minor 3;
                disk /dev/sdb1;
                address ipv4 10.0.0.1:7789;
                meta-disk /dev/sdc1 [0];
                node-id 0;
            }
            on beta {
                device minor 4;
                disk /dev/sdb1;
                address ipv6 [fd00:0::1]:7789;
                flexible-meta-disk /dev/sdc1[2];
                node-id 1;
            }
        }
        resource s {
            on alpha { device /dev/drbd9; disk /dev/sdd; address [fd00::2]:7790; meta-disk /dev/md; }
            on beta { device /dev/drbd9; disk /dev/sdd; address 10.0.0.2:7790; }
        }
        """))
    a, b = config.resource("r").hosts
    assert (a.device, a.minor, a.node_id) == ("/dev/replfs-a", 3, 0)
    assert a.meta_disk == MetaDisk(internal=False, path="/dev/sdc1", index=0)
    assert (b.device, b.minor, b.node_id) == ("/dev/drbd4", 4, 1)
    assert (b.address, b.port) == ("fd00::1", 7789)
    assert b.meta_disk == MetaDisk(internal=False, path="/dev/sdc1", index=2)
    s_alpha = config.resource("s").host("alpha")
    assert s_alpha.address == "fd00::2"
    assert s_alpha.meta_disk == MetaDisk(internal=False, path="/dev/md", index=None)
    assert parse_text(dump(config)) == config


def test_resource_level_items_are_inherited_by_hosts():
    config = parse_text(textwrap.dedent("""\
        resource r {
            device /dev/drbd7;
            disk /dev/vg/r;
            meta-disk internal;
            on alpha { address 127.0.0.1:7801; }
            on beta { address 127.0.0.2:7801; disk /dev/vg/other; }
        }
        """))
    a, b = config.resource("r").hosts
    assert (a.device, a.minor, a.disk) == ("/dev/drbd7", 7, "/dev/vg/r")
    assert (b.device, b.disk) == ("/dev/drbd7", "/dev/vg/other")


def test_skip_blocks_and_comments_are_ignored():
    config = parse_text(textwrap.dedent("""\
        # a comment
        skip { resource junk { on x { nonsense { } } } }
        resource r { # trailing comment
            skip this { too }
            net { skip { ko-count 4; } ping-int 2; }
        """) + GOOD_HOSTS + "}\n")
    assert list(config.resources) == ["r"]
    assert config.resource("r").net.options == (("ping-int", "2"),)


def test_multi_word_values_are_joined_and_warned():
    config = parse_text("resource r { startup { become-primary-on both; } "
                        "net { unplug-watermark 128; sndbuf-size 512k; } " + GOOD_HOSTS + "}", "v.conf")
    r = config.resource("r")
    assert r.startup.get("become-primary-on") == "both"
    assert r.sndbuf_size_bytes == 512 * 1024
    assert config.warnings == (
        "v.conf:1: warning: option 'become-primary-on' is accepted but has no effect in replfs",
        "v.conf:1: warning: option 'unplug-watermark' is accepted but has no effect in replfs",
    )
    config = parse_text("resource r { handlers { split-brain /usr/bin/notify root; } "
                        + GOOD_HOSTS + "}")
    assert config.resource("r").handlers.get("split-brain") == "/usr/bin/notify root"
    assert parse_text(dump(config)) == config


def test_drbd_83_style_options_accepted():
    config = parse_text("resource r { syncer { rate 10M; al-extents 257; verify-alg md5; } "
                        "disk { no-disk-barrier; } " + GOOD_HOSTS + "}")
    r = config.resource("r")
    assert r.resync_rate_kib == 10 * 1024 and r.al_extents == 257 and r.verify_alg == "md5"


# --- syntax errors (exit 2) -------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("resource r0 {\n  protocol C\n  on a {}\n}\n", "t.conf:3: expected ';' after 'protocol C', found 'on'"),
    ("resource r0 {\n on test03 {\n  devise /dev/drbd0;\n }\n}\n",
     "t.conf:3: unknown keyword 'devise' in section 'on test03'"),
    ("resource r0 {\n net {\n  foo 1;\n }\n}\n", "t.conf:3: unknown option 'foo' in section 'net'"),
    ("global {\n  usage-count no;\n  bogus;\n}\n", "t.conf:3: unknown option 'bogus' in section 'global'"),
    ("common {\n disk {\n  on-io-eror detach;\n }\n}\n",
     "t.conf:3: unknown option 'on-io-eror' in section 'disk'"),
    ("resource r0 {\n  floating 10.0.0.1:7788 { }\n}\n",
     "t.conf:2: 'floating' sections are not supported by replfs: name each node with "
     "'on HOSTNAME { ... }'"),
    ("resource r0 {\n  volume 0 { }\n}\n",
     "t.conf:2: 'volume' sections are not supported by replfs: use one resource per device"),
    ("resourse r0 { }\n", "t.conf:1: unknown keyword 'resourse' at top level "
                          "(expected global, common, resource or include)"),
    ("resource r0 {\n  bogus 1;\n}\n", "t.conf:2: unknown keyword 'bogus' in section 'resource r0'"),
    ("resource r0 {\n  net\n  ping-int 3;\n}\n", "t.conf:3: expected '{' after 'net', found 'ping-int'"),
    ("resource r0 {\n on a {\n  device /dev/drbd0;\n  device /dev/drbd1;\n }\n}\n",
     "t.conf:4: 'device' given twice in 'on a' (first at line 3)"),
    ("resource r0 {\n protocol A;\n protocol C;\n}\n",
     "t.conf:3: 'protocol' given twice in 'resource r0' (first at line 2)"),
    ("resource { }\n", "t.conf:1: expected a resource name after 'resource', found '{'"),
    ("resource r0 {\n on a {\n  disk;\n }\n}\n", "t.conf:3: 'disk' needs a value"),
    ("global { }\nglobal { }\n", "t.conf:2: second 'global' section (the first is at t.conf:1)"),
    ("common { }\n\ncommon { }\n", "t.conf:3: second 'common' section (the first is at t.conf:1)"),
    ('resource "" { }\n', "t.conf:1: a resource name may not be empty"),
    ("resource r0 {\n net { ping-int 3 }\n}\n", "t.conf:2: expected ';' after 'ping-int 3', found '}'"),
])
def test_syntax_errors(text, message):
    err = error_of(text)
    assert err.exit_code == EXIT_SYNTAX
    assert err.message == message


def test_unbalanced_braces():
    err = error_of("resource r0 {\n on a {\n  device /dev/drbd0;\n }\n")
    assert err.exit_code == EXIT_SYNTAX
    assert err.message == "t.conf:5: unexpected end of file: missing '}' to close 'resource r0' " \
                          "opened at line 1"
    err = error_of("resource r0 {" + GOOD_HOSTS + "}\n}\n")
    assert err.message == "t.conf:12: unexpected '}' at top level (no open section to close)"


# --- config errors (exit 10) --------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("resource r1 {\n protocol A;\n net {\n  allow-two-primaries;\n }\n" + GOOD_HOSTS + "}\n",
     "t.conf:4: allow-two-primaries requires protocol C"),
    ("common {\n net {\n  allow-two-primaries yes;\n }\n}\nresource r1 {\n protocol B;\n"
     + GOOD_HOSTS + "}\n", "t.conf:3: allow-two-primaries requires protocol C"),
    ("resource r {\n protocol D;\n" + GOOD_HOSTS + "}\n",
     "t.conf:2: invalid protocol 'D' (must be A, B or C)"),
    ("common {\n protocol c;\n}\n", "t.conf:2: invalid protocol 'c' (must be A, B or C)"),
    ("resource r {\n protocol A;\n net { protocol C; }\n" + GOOD_HOSTS + "}\n",
     "t.conf:3: protocol C in net section contradicts protocol A of resource r (at t.conf:2)"),
    ("resource r {\n" + GOOD_HOSTS + "}\nresource r {\n" + GOOD_HOSTS + "}\n",
     "t.conf:13: resource r is defined twice (first at t.conf:1)"),
    ("resource r {\n on alpha { device /dev/drbd0; disk /d; address 127.0.0.1:7789; }\n}\n",
     "t.conf:1: resource r has 1 'on' section; replfs mirrors between exactly two nodes, "
     "so it needs two"),
    ("resource r {\n" + GOOD_HOSTS
     + " on gamma { device /dev/drbd0; disk /d; address 127.0.0.3:7789; }\n}\n",
     "t.conf:1: resource r has 3 'on' sections; replfs mirrors between exactly two nodes, "
     "so it needs two"),
    ("resource r {\n on a { device /dev/drbd0; disk /d; address 127.0.0.1:1; }\n"
     " on a { device /dev/drbd0; disk /d; address 127.0.0.2:1; }\n}\n",
     "t.conf:3: host a appears twice in resource r"),
    ("resource r {\n on a { device /dev/drbd0; disk /d; }\n"
     " on b { device /dev/drbd0; disk /d; address 127.0.0.2:1; }\n}\n",
     "t.conf:2: host a of resource r has no 'address' (give it in 'on a' or in the resource)"),
    ("resource r {\n on a { device /dev/drbd0; address 127.0.0.1:1; }\n"
     " on b { device /dev/drbd0; disk /d; address 127.0.0.2:1; }\n}\n",
     "t.conf:2: host a of resource r has no 'disk' (give it in 'on a' or in the resource)"),
    ("resource r {\n on a { disk /d; address 127.0.0.1:1; }\n"
     " on b { device /dev/drbd0; disk /d; address 127.0.0.2:1; }\n}\n",
     "t.conf:2: host a of resource r has no 'device' (give it in 'on a' or in the resource)"),
    ("resource r {\n on a { device /dev/drbd0; disk /d; address 127.0.0.1:70000; }\n"
     " on b { device /dev/drbd0; disk /d; address 127.0.0.2:1; }\n}\n",
     "t.conf:2: bad port '70000' in address '127.0.0.1:70000' (must be 1-65535)"),
    ("resource r {\n on a { device /dev/drbd0; disk /d; address 127.0.0.1:0; }\n"
     " on b { device /dev/drbd0; disk /d; address 127.0.0.2:1; }\n}\n",
     "t.conf:2: bad port '0' in address '127.0.0.1:0' (must be 1-65535)"),
    ("resource r {\n on a { device /dev/drbd0; disk /d; address 127.0.0.1; }\n"
     " on b { device /dev/drbd0; disk /d; address 127.0.0.2:1; }\n}\n",
     "t.conf:2: address '127.0.0.1' has no port (write ADDRESS:PORT)"),
    ("resource r {\n on a { device /dev/drbd0; disk /d; address alpha.example:7789; }\n"
     " on b { device /dev/drbd0; disk /d; address 127.0.0.2:1; }\n}\n",
     "t.conf:2: invalid IPv4 address 'alpha.example' (replfs needs a literal IP address, "
     "not a host name)"),
    ("resource r {\n on a { device /dev/drbd0; disk /d; address sdp 10.0.0.1:7789; }\n"
     " on b { device /dev/drbd0; disk /d; address 127.0.0.2:1; }\n}\n",
     "t.conf:2: address family 'sdp' is not supported by replfs (use ipv4 or ipv6)"),
    ("resource r {\n on a { device /dev/drbd0; disk /d; address ipv4 [fd00::1]:7789; }\n"
     " on b { device /dev/drbd0; disk /d; address 127.0.0.2:1; }\n}\n",
     "t.conf:2: address '[fd00::1]:7789' is not an ipv4 address"),
    ("resource r {\n on a { device /dev/drbd0; disk /d; address 127.0.0.1:1; }\n"
     " on b { device /dev/drbd0; disk /d; address 127.0.0.1:1; }\n}\n",
     "t.conf:3: both hosts of resource r use address 127.0.0.1:1"),
    ("resource r {\n on a { device /dev/sdx; disk /d; address 127.0.0.1:1; }\n"
     " on b { device /dev/drbd0; disk /d; address 127.0.0.2:1; }\n}\n",
     "t.conf:2: cannot derive the minor number from device '/dev/sdx'; "
     "write 'device /dev/sdx minor N;'"),
    ("resource r {\n on a { device /dev/drbd0; disk /d; address 127.0.0.1:1; node-id 0; }\n"
     " on b { device /dev/drbd0; disk /d; address 127.0.0.2:1; }\n}\n",
     "t.conf:3: host b of resource r has no node-id, but its peer has one (give both or neither)"),
    ("resource r {\n on a { device /dev/drbd0; disk /d; address 127.0.0.1:1; node-id 40; }\n"
     " on b { device /dev/drbd0; disk /d; address 127.0.0.2:1; }\n}\n",
     "t.conf:2: node-id must be a number from 0 to 31, got '40'"),
    ("resource r {\n net {\n  ping-int soon;\n }\n" + GOOD_HOSTS + "}\n",
     "t.conf:3: invalid value 'soon' for option 'ping-int' in section 'net' "
     "(expected a whole number)"),
    ("resource r {\n net {\n  after-sb-2pri discard-local;\n }\n" + GOOD_HOSTS + "}\n",
     "t.conf:3: invalid value 'discard-local' for option 'after-sb-2pri' in section 'net' "
     "(expected disconnect, violently-as0p, call-pri-lost-after-sb)"),
    ("resource r {\n disk {\n  resync-rate fast;\n }\n" + GOOD_HOSTS + "}\n",
     "t.conf:3: invalid value 'fast' for option 'resync-rate' in section 'disk' "
     "(expected a number of KiB, optionally with suffix k, M or G)"),
])
def test_config_errors(text, message):
    err = error_of(text)
    assert err.exit_code == EXIT_CONFIG
    assert err.message == message


def _pair(name: str, minor: int, port: int, disk: str = "/d", a: str = "127.0.0.1",
          b: str = "127.0.0.2") -> str:
    return (f"resource {name} {{\n"
            f" on alpha {{ device /dev/drbd{minor}; disk {disk}{name}; address {a}:{port}; }}\n"
            f" on beta {{ device /dev/drbd{minor}; disk {disk}{name}; address {b}:{port}; }}\n"
            f"}}\n")


def test_duplicates_across_resources_on_the_same_host():
    err = error_of(_pair("r0", 0, 7789) + _pair("r1", 1, 7789))
    assert err.exit_code == EXIT_CONFIG
    assert err.message == ("t.conf:6: address 127.0.0.1:7789 of host alpha in resource r1 is "
                           "already used by resource r0 (at t.conf:2)")
    err = error_of(_pair("r0", 0, 7789) + _pair("r1", 0, 7790))
    assert err.message == ("t.conf:6: minor 0 of host alpha in resource r1 is already used by "
                           "resource r0 (at t.conf:2)")
    err = error_of(_pair("r0", 0, 7789) + _pair("r1", 1, 7790).replace("/dr1", "/dr0"))
    assert err.message == ("t.conf:6: disk /dr0 of host alpha in resource r1 is already used "
                           "by resource r0 (at t.conf:2)")
    same_path = _pair("r1", 1, 7790).replace("device /dev/drbd1;", "device /dev/drbd0 minor 1;")
    err = error_of(_pair("r0", 0, 7789) + same_path)
    assert err.message == ("t.conf:6: device /dev/drbd0 of host alpha in resource r1 is already "
                           "used by resource r0 (at t.conf:2)")
    # the same address:port on different host names is not a conflict here
    parse_text(_pair("r0", 0, 7789) + _pair("r1", 1, 7789, a="127.0.0.3", b="127.0.0.4"))


def test_package_imports_no_trio_or_socket():
    code = ("import sys, replfs.blockrepl.conf as c; c.parse_text('');"
            "bad = [m for m in ('trio', 'socket', '_socket') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- after-sb policies and on-congestion (checks of combinations) --------------

def _net(net: str, protocol: str = "C") -> str:
    return f"resource r {{\n protocol {protocol};\n net {{\n{net} }}\n" + GOOD_HOSTS + "}\n"


UNSAFE = ("with allow-two-primaries: with a filesystem mounted on both nodes it discards "
          "acknowledged writes beneath live caches; 'disconnect' is the only safe setting "
          "with two Primaries")


def test_policies_that_discard_a_primarys_data_are_warned_about_with_two_primaries():
    config = parse_text(_net("  allow-two-primaries;\n  after-sb-0pri discard-zero-changes;\n"
                             "  after-sb-1pri discard-secondary;\n"
                             "  after-sb-2pri violently-as0p;\n"), "t.conf")
    assert config.warnings == (
        f"t.conf:5: warning: after-sb-0pri discard-zero-changes {UNSAFE}",
        f"t.conf:6: warning: after-sb-1pri discard-secondary {UNSAFE}",
        f"t.conf:7: warning: after-sb-2pri violently-as0p {UNSAFE}",
    )
    config = parse_text(_net("  allow-two-primaries;\n  after-sb-1pri violently-as0p;\n"),
                        "t.conf")
    assert config.warnings == (f"t.conf:5: warning: after-sb-1pri violently-as0p {UNSAFE}",)


def test_policy_from_common_is_warned_about_where_it_is_written():
    text = ("common {\n net {\n  after-sb-2pri violently-as0p;\n }\n}\n"
            + _net("  allow-two-primaries;\n"))
    assert parse_text(text, "t.conf").warnings == (
        f"t.conf:3: warning: after-sb-2pri violently-as0p {UNSAFE}",)


def test_safe_policies_and_single_primary_draw_no_warning():
    assert parse_text(_net("  allow-two-primaries;\n  after-sb-0pri disconnect;\n"
                           "  after-sb-1pri disconnect;\n  after-sb-2pri disconnect;\n"), "t.conf"
                      ).warnings == ()
    assert parse_text(_net("  allow-two-primaries;\n  after-sb-1pri consensus;\n"
                           "  after-sb-2pri call-pri-lost-after-sb;\n"), "t.conf").warnings == ()
    # without allow-two-primaries the same policies are fine
    assert parse_text(_net("  after-sb-0pri discard-zero-changes;\n"
                           "  after-sb-1pri discard-secondary;\n"
                           "  after-sb-2pri violently-as0p;\n"), "t.conf").warnings == ()


def test_discard_local_and_remote_say_what_the_other_node_needs():
    (w,) = parse_text(_net("  after-sb-0pri discard-local;\n"), "t.conf").warnings
    assert w.startswith("t.conf:4: warning: after-sb-0pri discard-local applies to the node "
                        "whose replfs.conf says it: the other node's must say discard-remote")
    (w,) = parse_text(_net("  after-sb-0pri discard-remote;\n"), "t.conf").warnings
    assert "must say discard-local" in w and "both would keep their own data" in w


@pytest.mark.parametrize("protocol,extra,policy", [
    ("C", "", "pull-ahead"), ("B", "", "pull-ahead"), ("C", "  allow-two-primaries;\n",
                                                       "pull-ahead"),
    ("C", "", "disconnect")])
def test_on_congestion_other_than_block_needs_protocol_a(protocol, extra, policy):
    err = error_of(_net(f"{extra}  on-congestion {policy};\n", protocol))
    assert err.exit_code == EXIT_CONFIG
    two = " and allow-two-primaries" if extra else ""
    line = 5 if extra else 4
    assert err.message == (f"t.conf:{line}: on-congestion {policy} requires protocol A "
                           f"(resource r uses protocol {protocol}{two}); DRBD allows only "
                           f"on-congestion block with protocols B and C")


def test_on_congestion_with_protocol_a_or_block_is_accepted_and_acted_on():
    for text, policy in ((_net("  on-congestion pull-ahead;\n  congestion-fill 128s;\n",
                               "A"), "pull-ahead"),
                         (_net("  on-congestion block;\n", "C"), "block")):
        config = parse_text(text, "t.conf")
        assert config.warnings == ()
        res = next(iter(config.resources.values()))
        assert res.on_congestion == policy
    res = next(iter(parse_text(_net("  on-congestion pull-ahead;\n  congestion-fill 128s;\n",
                                    "A"), "t.conf").resources.values()))
    assert res.congestion_fill_bytes == 128 * 512
    assert res.congestion_extents == res.al_extents
    with pytest.raises(ReplfsError) as e:
        parse_text(_net("  on-congestion drop;\n", "A"), "t.conf")
    assert "block, pull-ahead, disconnect" in e.value.message


# --- resync options (issue 10) -------------------------------------------------

def test_resync_controller_and_checksum_options_are_implemented():
    config = parse_text(
        "resource r { disk { c-plan-ahead 10; c-fill-target 1M; c-delay-target 5; "
        "c-max-rate 50M; c-min-rate 1M; } net { csums-alg sha256; data-integrity-alg md5; } "
        + GOOD_HOSTS + "}", "c.conf")
    r = config.resource("r")
    assert config.warnings == ()
    assert (r.c_plan_ahead_s, r.c_fill_target_bytes, r.c_delay_target_s) == (1.0, 1 << 20, 0.5)
    assert (r.c_max_rate_kib, r.c_min_rate_kib) == (50 * 1024, 1024)
    assert (r.csums_alg, r.data_integrity_alg) == ("sha256", "md5")
    assert parse_text(dump(config), "c.conf") == config
    # DRBD 8.4's defaults; c-fill-target in sectors without a suffix
    d = parse_text("resource r { disk { c-fill-target 2048; } " + GOOD_HOSTS + "}").resource("r")
    assert (d.c_plan_ahead_s, d.c_fill_target_bytes, d.c_delay_target_s) == (2.0, 1 << 20, 1.0)
    assert (d.c_max_rate_kib, d.c_min_rate_kib, d.csums_alg) == (100 * 1024, 250, None)
    # the DRBD 8.3 syncer spellings; disk wins over syncer
    s = parse_text("resource r { syncer { csums-alg md5; c-plan-ahead 0; c-min-rate 0; } "
                   "disk { c-min-rate 4M; } " + GOOD_HOSTS + "}").resource("r")
    assert (s.csums_alg, s.c_plan_ahead_s, s.c_min_rate_kib) == ("md5", 0.0, 4096)


@pytest.mark.parametrize("option, message", [
    ("disk { c-plan-ahead 301; }", "expected 0 to 300 tenths of a second"),
    ("disk { c-delay-target 0; }", "expected 1 to 100 tenths of a second"),
    ("disk { c-max-rate 100k; }", "expected 250 to 4194304 KiB/s"),
    ("disk { c-fill-target 2G; }", "expected 0 to 1048576 sectors"),
    ("disk { c-fill-target 1x; }", "a number of 512-byte sectors"),
    ("net { csums-alg crc32c; }", "unknown csums-alg 'crc32c' in section 'net': replfs "
                                  "accepts blake2b, blake2s, md5, sha1"),
    ("net { data-integrity-alg shake_128; }", "unknown data-integrity-alg 'shake_128'"),
])
def test_resync_option_values_are_checked(option, message):
    with pytest.raises(ReplfsError) as info:
        parse_text("resource r {\n " + option + "\n" + GOOD_HOSTS + "}", "v.conf")
    assert info.value.exit_code == EXIT_CONFIG
    assert str(info.value).startswith("v.conf:2: ")
    assert message in str(info.value)


def test_buffer_options():
    r = parse_text("resource r { net { max-buffers 64; rcvbuf-size 2M; } " + GOOD_HOSTS + "}"
                   ).resource("r")
    assert (r.max_buffers, r.sndbuf_size_bytes, r.rcvbuf_size_bytes) == (64, 0, 2 << 20)
    assert parse_text("resource r { " + GOOD_HOSTS + "}").resource("r").max_buffers == 2048
    for bad, why in (("max-buffers 16;", "32 to 131072 pages of 4 KiB"),
                     ("sndbuf-size 11M;", "0 to 10485760 bytes"),
                     ("rcvbuf-size lots;", "a number of bytes")):
        with pytest.raises(ReplfsError, match=why):
            parse_text("resource r { net { " + bad + " } " + GOOD_HOSTS + "}")
    # a congestion-fill the send queue never reaches is warned about
    config = parse_text("resource r { protocol A; net { on-congestion pull-ahead; "
                        "congestion-fill 16M; max-buffers 1024; } " + GOOD_HOSTS + "}", "c.conf")
    assert any("congestion-fill (16384 KiB) is more than the 4096 KiB" in w
               for w in config.warnings), config.warnings
