"""man/replfs.conf.5 stays true to the reader: its examples parse, every option is listed."""
from __future__ import annotations

import pathlib
import re

from replfs.blockrepl.conf import parse_text
from replfs.blockrepl.conf import options as opts

MAN = pathlib.Path(__file__).resolve().parents[2] / "man" / "replfs.conf.5"


def man_text() -> str:
    return MAN.read_text().replace("\\-", "-").replace("\\e", "\\")


def examples() -> list[str]:
    return re.findall(r"^\.EX\n(.*?)^\.EE$", man_text(), flags=re.S | re.M)


def test_examples_parse(tmp_path):
    blocks = examples()
    assert len(blocks) == 3
    r1 = parse_text(blocks[0], "r1.conf").resource("r1")
    assert r1.allow_two_primaries and r1.protocol == "C"
    assert [h.name for h in r1.hosts] == ["test-vm03.hyperdc.net", "test-vm04.hyperdc.net"]
    demo_config = parse_text(blocks[1], "demo.conf")
    demo = demo_config.resource("demo")
    assert {h.address for h in demo.hosts} == {"127.0.0.1", "127.0.0.2"}
    assert demo.host("alpha").device == "/dev/drbd10" and demo.ping_int_s == 2
    assert demo_config.warnings == ("demo.conf:1: warning: option 'usage-count' is accepted "
                                    "but has no effect in replfs",)
    layout = tmp_path / "replfs.conf"
    layout.write_text(blocks[2])
    assert parse_text(blocks[2], str(layout)).resources == {}


def test_every_option_is_documented():
    text = man_text()
    names = set().union(*opts.KNOWN.values(), *opts.IMPLEMENTED.values())
    missing = sorted(n for n in names if not re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", text))
    assert missing == []


def test_default_path_and_see_also():
    text = man_text()
    assert "/etc/replfs/replfs.conf" in text
    assert ".BR replfsadm (8)" in text and ".BR replfsd (8)" in text
