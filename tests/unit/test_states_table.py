"""Refusals carry DRBD 8.4's numbers, words and exit codes.

The table below is written out again on purpose (from DRBD 8.4's
enum drbd_state_rv and drbd_strings.c, and drbdsetup's exit codes): if a
number or a text in blockrepl/core/states.py drifts, this test fails.
"""
import pytest

from replfs.blockrepl.core import states as S
from replfs.blockrepl.core.states import ConnState as C, DiskState as D, Role as R, View
from replfs.errors import ReplfsError

DRBD_84 = [
    ("SS_TWO_PRIMARIES", -1, "Multiple primaries not allowed by config", 11),
    ("SS_NO_UP_TO_DATE_DISK", -2, "Need access to UpToDate data", 17),
    ("SS_NO_LOCAL_DISK", -4, "Can not resync without local disk", 16),
    ("SS_NO_REMOTE_DISK", -5, "Can not resync without remote disk", 11),
    ("SS_CONNECTED_OUTDATES", -6, "Refusing to be Outdated while Connected", 11),
    ("SS_PRIMARY_NOP", -7, "Refusing to be Primary while peer is not outdated", 11),
    ("SS_RESYNC_RUNNING", -8, "Can not start OV/resync since it is already active", 11),
    ("SS_ALREADY_STANDALONE", -9, "Can not disconnect a StandAlone device", 11),
    ("SS_CW_FAILED_BY_PEER", -10, "State change was refused by peer node", 11),
    ("SS_IS_DISKLESS", -11, "Device is diskless, the requested operation requires a disk", 11),
    ("SS_DEVICE_IN_USE", -12, "Device is held open by someone", 11),
    ("SS_NO_NET_CONFIG", -13, "Have no net/connection configuration", 11),
    ("SS_NO_VERIFY_ALG", -14, "Need a verify algorithm to start online verify", 11),
    ("SS_NEED_CONNECTION", -15, "Need a connection to start verify or resync", 11),
    ("SS_LOWER_THAN_OUTDATED", -16, "Disk state is lower than outdated", 5),
    ("SS_NOT_SUPPORTED", -17, "Peer does not support protocol", 11),
    ("SS_IN_TRANSIENT_STATE", -18, "In transient state, retry after next state change", 11),
    ("SS_CONCURRENT_ST_CHG", -19, "Concurrent state changes detected and aborted", 11),
    ("SS_O_VOL_PEER_PRI", -20, "Other vol primary on peer not allowed by config", 11),
    ("SS_OUTDATE_WO_CONN", -21, "Need a connection for a graceful disconnect/outdate peer", 11),
]


@pytest.mark.parametrize("name,code,text,exit_code", DRBD_84, ids=[r[0] for r in DRBD_84])
def test_every_refusal_is_drbds(name, code, text, exit_code):
    r = getattr(S, name)
    assert (r.code, r.text, r.exit_code) == (code, text, exit_code)
    e = S.refuse(r)
    assert str(e) == f"State change failed: ({code}) {text}"
    assert (e.code, e.exit_code) == (code, exit_code)
    assert S.StateChangeRefused(code).text == text       # the table's words by default


def test_the_table_has_drbds_codes_and_no_others():
    assert sorted(S.SS_TABLE) == sorted(code for _, code, _, _ in DRBD_84)
    assert -3 not in S.SS_TABLE      # unused in DRBD too
    named = {n: getattr(S, n) for n in dir(S) if n.startswith("SS_") and n != "SS_TABLE"}
    assert set(named) == {n for n, *_ in DRBD_84}


def test_failures_are_drbds_config_errors():
    assert S.ERR_DISCARD_IMPOSSIBLE == (123, "--discard-my-data not allowed when primary.")
    assert S.ERR_NO_DISK == (138, "Device does not have a disk-config")
    e = S.fail(S.ERR_NO_DISK, "/dev/replfs0")
    assert isinstance(e, ReplfsError) and e.exit_code == 10
    assert e.message == "/dev/replfs0: Failure: (138) Device does not have a disk-config"


def test_named_cases_for_the_driver_are_drbds_reasons():
    assert S.DETACH_PRIMARY_WITHOUT_UPTODATE_PEER is S.SS_NO_UP_TO_DATE_DISK
    assert S.DEMOTE_WHILE_OPEN is S.SS_DEVICE_IN_USE
    assert S.OUTDATE_WHILE_CONNECTED is S.SS_CONNECTED_OUTDATES
    assert S.INVALIDATE_PRIMARY_DISCONNECTED is S.SS_NEED_CONNECTION
    assert S.SYNC_SOURCE_WITHOUT_UPTODATE is S.SS_NO_UP_TO_DATE_DISK
    assert S.VERIFY_WITHOUT_LOCAL_DISK is S.SS_NO_LOCAL_DISK
    assert S.VERIFY_WITHOUT_CONNECTION is S.SS_NEED_CONNECTION
    e = S.refused_by_peer(-12)
    assert (e.code, e.exit_code) == (-10, 11)
    assert str(e) == "State change failed: (-10) State change was refused by peer node"
    assert (e.peer_code, e.peer_text) == (-12, "Device is held open by someone")


def view(role=R.Secondary, disk=D.UpToDate, conn=C.StandAlone, peer_role=R.Unknown,
         peer_disk=D.DUnknown, two=False):
    return View(role, peer_role, disk, peer_disk, conn, two)


def refusal(fn, *a, **kw):
    with pytest.raises(S.StateChangeRefused) as e:
        fn(*a, **kw)
    return e.value.code, e.value.exit_code


def test_promotion_refusals():
    assert refusal(S.check_promote, view(disk=D.Outdated), force=False) == (-2, 17)
    assert refusal(S.check_promote, view(disk=D.Diskless), force=True) == (-2, 17)
    assert refusal(S.check_promote, view(conn=C.Connected, peer_role=R.Primary),
                   force=False) == (-1, 11)
    S.check_promote(view(disk=D.Outdated), force=True)
    S.check_promote(view(conn=C.Connected, peer_role=R.Primary, two=True), force=False)


def test_outdate_refusals_follow_drbd():
    assert refusal(S.check_outdate, view(role=R.Primary)) == (-2, 17)
    assert refusal(S.check_outdate, view(conn=C.Connected, peer_disk=D.UpToDate)) == (-6, 11)
    assert refusal(S.check_outdate, view(role=R.Primary, conn=C.Connected)) == (-6, 11)
    assert refusal(S.check_outdate, view(disk=D.Diskless)) == (-11, 11)
    assert refusal(S.check_outdate, view(disk=D.Inconsistent)) == (-16, 5)
    S.check_outdate(view(conn=C.WFConnection))
    S.check_outdate(view(disk=D.Consistent))
