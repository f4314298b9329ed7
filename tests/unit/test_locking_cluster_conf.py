import pytest

from replfs.errors import EXIT_CONFIG, EXIT_SYNTAX, ReplfsError
from replfs.locking import cluster_conf as cc

WALKTHROUGH = """node:
 ip_port = 7777
 ip_address = 192.168.222.3
 number = 0
 name = o2host1
 cluster = ocfs2

node:
 ip_port = 7777
 ip_address = 192.168.222.4
 number = 1
 name = o2host2
 cluster = ocfs2

cluster:
 node_count = 2
 name = ocfs2
"""


def test_walkthrough_loads_verbatim():
    conf = cc.parse(WALKTHROUGH, "cluster.conf")
    assert [n.name for n in conf.nodes] == ["o2host1", "o2host2"]
    assert conf.nodes[1] == cc.Node("o2host2", 1, "192.168.222.4", 7777, "ocfs2")
    assert conf.clusters == (cc.Cluster("ocfs2", 2, None),)
    assert cc.this_node(conf, "o2host2").number == 1
    assert conf.nodes_of("ocfs2") == conf.nodes


def test_tabs_comments_and_heartbeat_stanza():
    text = WALKTHROUGH.replace(" ip_", "\tip_") + (
        "# a comment\n\nheartbeat:\n\tregion = 0A1B2C\n\tcluster = ocfs2\n")
    text = text.replace(" name = ocfs2", " name = ocfs2\n heartbeat_mode = global")
    conf = cc.parse(text)
    assert conf.heartbeats == (cc.Heartbeat("0A1B2C", "ocfs2"),)
    assert conf.clusters[0].heartbeat_mode == "global"


def test_dump_round_trip():
    conf = cc.parse(WALKTHROUGH)
    out = cc.dump(conf)
    assert out.startswith("node:\n\tip_port = 7777\n")
    assert cc.parse(out) == conf
    text2 = WALKTHROUGH + "heartbeat:\n region = abcd\n cluster = ocfs2\n"
    conf2 = cc.parse(text2.replace("name = ocfs2\n", "name = ocfs2\n heartbeat_mode = local\n"))
    assert cc.parse(cc.dump(conf2)) == conf2


def expect_error(text, line, fragment, code=EXIT_CONFIG):
    with pytest.raises(ReplfsError) as info:
        cc.parse(text, "c.conf")
    assert info.value.exit_code == code
    assert str(info.value).startswith(f"c.conf:{line}: "), str(info.value)
    assert fragment in str(info.value)


def test_node_count_mismatch():
    expect_error(WALKTHROUGH.replace("node_count = 2", "node_count = 3"), 16, "node_count = 3")


def test_duplicate_number():
    expect_error(WALKTHROUGH.replace("number = 1", "number = 0"), 11, "number 0")


def test_duplicate_name():
    expect_error(WALKTHROUGH.replace("name = o2host2", "name = o2host1"), 12, "o2host1")


def test_duplicate_endpoint():
    expect_error(WALKTHROUGH.replace("192.168.222.4", "192.168.222.3"), 10, "192.168.222.3:7777")
    # same address, different port is fine
    cc.parse(WALKTHROUGH.replace("192.168.222.4", "192.168.222.3").replace(
        "ip_port = 7777\n ip_address = 192.168.222.3\n number = 1", "ip_port = 7778\n ip_address = 192.168.222.3\n number = 1"))


def test_unknown_cluster():
    expect_error(WALKTHROUGH.replace("cluster = ocfs2\n\ncluster", "cluster = other\n\ncluster"),
                 13, "unknown cluster 'other'")


def test_unknown_key_bad_number_missing_key():
    expect_error(WALKTHROUGH.replace(" number = 1\n", " number = 1\n colour = red\n"), 12, "colour")
    expect_error(WALKTHROUGH.replace("ip_port = 7777\n ip_address = 192.168.222.4",
                                     "ip_port = 77x7\n ip_address = 192.168.222.4"), 9, "ip_port")
    expect_error(WALKTHROUGH.replace("number = 1", "number = 300"), 11, "out of range")
    expect_error(WALKTHROUGH.replace(" name = o2host2\n", ""), 8, "missing name")
    expect_error(WALKTHROUGH.replace("192.168.222.4", "192.168.222"), 10, "IPv4")


def test_syntax_errors():
    expect_error("node:\n ip_port 7777\n", 2, "key = value", EXIT_SYNTAX)
    expect_error(" ip_port = 1\n", 1, "before any stanza", EXIT_SYNTAX)
    expect_error("nodes:\n", 1, "unknown stanza")


def test_this_node_unknown():
    with pytest.raises(ReplfsError) as info:
        cc.this_node(cc.parse(WALKTHROUGH), "o2host9")
    assert info.value.exit_code == EXIT_CONFIG
    assert "o2host9" in str(info.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(ReplfsError):
        cc.load(str(tmp_path / "nope.conf"))
    p = tmp_path / "cluster.conf"
    p.write_text(WALKTHROUGH)
    assert cc.load(str(p)).nodes[0].name == "o2host1"


def test_timeouts():
    assert cc.Timeouts() == cc.Timeouts(31, 30000, 2000, 2000)
    assert cc.Timeouts().dead_after_seconds == 60
    t = cc.parse_timeouts('O2CB_ENABLED=true\nO2CB_HEARTBEAT_THRESHOLD=61\n'
                          'O2CB_IDLE_TIMEOUT_MS="60000"\nO2CB_RECONNECT_DELAY_MS=\n')
    assert t == cc.Timeouts(61, 60000, 2000, 2000)
    assert t.dead_after_seconds == 120
    with pytest.raises(ReplfsError) as info:
        cc.parse_timeouts("\nO2CB_IDLE_TIMEOUT_MS=abc\n", "o2cb")
    assert str(info.value).startswith("o2cb:2: ")
    with pytest.raises(ReplfsError):
        cc.parse_timeouts("O2CB_KEEPALIVE_DELAY_MS=40000\n")


def test_load_timeouts_missing_is_default(tmp_path):
    assert cc.load_timeouts(str(tmp_path / "none")) == cc.Timeouts()


def test_man_page_examples_parse():
    import pathlib
    import re
    page = pathlib.Path(__file__).resolve().parents[2] / "man" / "cluster.conf.5"
    blocks = re.findall(r"^\.nf\n(.*?)^\.fi$", page.read_text(), re.S | re.M)
    tables = [b for b in blocks if b.startswith("node:")]
    assert len(tables) == 2
    walkthrough, loopback = (cc.parse(b.replace("\\-", "-")) for b in tables)
    assert walkthrough == cc.parse(WALKTHROUGH)
    assert [n.ip_address for n in loopback.nodes] == ["127.0.0.1", "127.0.0.2"]
    timeouts = [b for b in blocks if b.startswith("O2CB_")]
    assert cc.parse_timeouts(timeouts[0]).dead_after_seconds == 120
