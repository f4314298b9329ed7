"""startup { wfc-timeout; degr-wfc-timeout; outdated-wfc-timeout; }: which
one applies (the pure rule and the daemon's reading of its meta-data), how
they bound each other, and the verbs' command lines."""
from types import SimpleNamespace

import pytest

from replfs.blockrepl.conf import parse_text
from replfs.blockrepl.core import startup as S
from replfs.blockrepl.core.states import DiskState, Role
from replfs.blockrepl.core.uuids import Uuids
from replfs.blockrepl.meta import format as md
from replfs.cli.main import main
from replfs.daemon.mirror import MirrorService


def kind(primary_flag=False, is_primary=False, bitmap_uuid=0, peer_outdated=False):
    return S.kind_from_metadata(primary_flag=primary_flag, is_primary=is_primary,
                                bitmap_uuid=bitmap_uuid, peer_outdated=peer_outdated)


def test_which_timeout_applies():
    assert kind() == S.WFC                                       # a whole pair went down
    assert kind(primary_flag=True) == S.WFC                      # crashed Primary, in sync
    assert kind(bitmap_uuid=0x1234) == S.WFC                     # Secondary: not degraded
    assert kind(primary_flag=True, bitmap_uuid=0x1234) == S.DEGR  # Primary without its peer
    assert kind(primary_flag=True, is_primary=True, bitmap_uuid=0x1234) == S.WFC  # running
    assert kind(peer_outdated=True) == S.OUTDATED
    assert kind(primary_flag=True, bitmap_uuid=1, peer_outdated=True) == S.OUTDATED


def test_unset_timeouts_take_the_one_above():
    assert S.effective(120, None, None) == ({S.WFC: 120, S.DEGR: 120, S.OUTDATED: 120}, ())
    assert S.effective(120, 30, None)[0] == {S.WFC: 120, S.DEGR: 30, S.OUTDATED: 30}
    assert S.effective(0, 60, 5)[0] == {S.WFC: 0, S.DEGR: 60, S.OUTDATED: 5}
    assert S.choose(S.DEGR, 0, 60, 5) == S.Choice(S.DEGR, 60)
    assert S.choose(S.OUTDATED, 0, None, None) == S.Choice(S.OUTDATED, 0)   # for ever


def test_longer_timeouts_are_cut_with_a_note():
    values, notes = S.effective(120, 300, None)
    assert values == {S.WFC: 120, S.DEGR: 120, S.OUTDATED: 120}
    assert notes == ("degr-wfc-timeout (300s) is longer than wfc-timeout (120s); using 120s",)
    values, notes = S.effective(120, 0, 0)                        # 0 is for ever: longest
    assert values[S.DEGR] == 120 and values[S.OUTDATED] == 120 and len(notes) == 2
    values, notes = S.effective(0, 60, 0)
    assert values[S.OUTDATED] == 60
    assert notes == ("outdated-wfc-timeout (for ever) is longer than degr-wfc-timeout (60s); "
                     "using 60s",)


def res_stub(flags=0, bitmap=0, role=Role.Secondary, pdsk=DiskState.DUnknown, disk=True):
    sb = md.Superblock(1 << 20, Uuids(0x10, bitmap), flags, 0, 127, None) if disk else None
    return SimpleNamespace(disk=SimpleNamespace(sb=sb) if disk else None, role=role, pdsk=pdsk)


def test_the_daemon_reads_the_kind_from_the_meta_data():
    k = MirrorService._timeout_kind
    assert k(res_stub()) == S.WFC
    assert k(res_stub(flags=md.F_PRIMARY | md.F_CONSISTENT, bitmap=0x20)) == S.DEGR
    assert k(res_stub(flags=md.F_PRIMARY, bitmap=0x20, role=Role.Primary)) == S.WFC
    assert k(res_stub(flags=md.F_PEER_OUTDATED)) == S.OUTDATED
    assert k(res_stub(pdsk=DiskState.Outdated)) == S.OUTDATED
    assert k(res_stub(disk=False)) == S.WFC


CONF = """resource r0 {{
	startup {{ {startup} }}
	on alpha {{ device /dev/replfs0 minor 0; disk /tmp/a; address 127.0.0.1:7789; meta-disk internal; }}
	on beta {{ device /dev/replfs0 minor 0; disk /tmp/b; address 127.0.0.2:7789; meta-disk internal; }}
}}
"""


def test_the_options_are_implemented_whole_numbers():
    c = parse_text(CONF.format(startup="wfc-timeout 9; degr-wfc-timeout 5; "
                                       "outdated-wfc-timeout 2;"), "r.conf")
    assert c.warnings == ()
    assert c.resources["r0"].startup.get("degr-wfc-timeout") == "5"
    with pytest.raises(Exception) as e:
        parse_text(CONF.format(startup="degr-wfc-timeout soon;"), "r.conf")
    assert "a whole number" in str(e.value)


def adm(tmp_path, *argv, startup="wfc-timeout 9; degr-wfc-timeout 12;"):
    conf = tmp_path / "replfs.conf"
    conf.write_text(CONF.format(startup=startup))
    out, err = [], []
    rc = main(["-c", str(conf), "--node", "alpha", "--rundir", str(tmp_path / "run"), *argv],
              out=out.append, err=err.append)
    return rc, out, err


def test_verbs_and_options(tmp_path):
    rc, out, err = adm(tmp_path, "-d", "wait-con-int")
    assert rc == 0 and out == ["replfsd wait-connect r0"]
    assert err == ["r0: degr-wfc-timeout (12s) is longer than wfc-timeout (9s); using 9s"]
    rc, out, _ = adm(tmp_path, "-d", "up", "--wait", "r0")
    assert rc == 0 and out[-1] == "replfsd wait-connect r0"
    rc, _, err = adm(tmp_path, "wait-connect", "--degr-wfc-timeout", "x", "r0")
    assert rc == 1 and "degr-wfc-timeout expects a whole number of seconds" in err[-1]
    rc, _, err = adm(tmp_path, "wait-connect", "-t", "-3", "r0")
    assert rc == 1
    rc, _, err = adm(tmp_path, "wait-connect", "--outdated-wfc-timeout", "1", "r0")
    assert rc == 20 and "replfsd is not running" in err[-1]     # no daemon here
    rc, _, err = adm(tmp_path, "status", "--wait", "r0")
    assert rc == 1 and "'status' does not take --wait" in err[-1]
    rc, out, _ = adm(tmp_path, "wait-con-int", "--help")
    assert rc == 0 and "wait-con-int" in out[0] and "--degr-wfc-timeout" in out[0]
