"""Roles, connection states and disk states, with DRBD's names.

The names are the user interface: admins read them in `replfsadm status`
and scripts compare them, so they are spelled exactly as DRBD spells
them.  The pure rules about which state changes are allowed live here
too, so the driver only asks and acts.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

from replfs.errors import (EXIT_CONFIG, EXIT_LOWER_THAN_OUTDATED, EXIT_NO_LOCAL_DISK,
                           EXIT_NO_UPTODATE, EXIT_STATE, ReplfsError)


class Role(enum.Enum):
    Unknown = "Unknown"
    Primary = "Primary"
    Secondary = "Secondary"


class ConnState(enum.Enum):
    StandAlone = "StandAlone"
    Disconnecting = "Disconnecting"
    Unconnected = "Unconnected"
    Timeout = "Timeout"
    BrokenPipe = "BrokenPipe"
    NetworkFailure = "NetworkFailure"
    ProtocolError = "ProtocolError"
    TearDown = "TearDown"
    WFConnection = "WFConnection"
    WFReportParams = "WFReportParams"
    Connected = "Connected"
    StartingSyncS = "StartingSyncS"
    StartingSyncT = "StartingSyncT"
    WFBitMapS = "WFBitMapS"
    WFBitMapT = "WFBitMapT"
    WFSyncUUID = "WFSyncUUID"
    SyncSource = "SyncSource"
    SyncTarget = "SyncTarget"
    PausedSyncS = "PausedSyncS"
    PausedSyncT = "PausedSyncT"
    VerifyS = "VerifyS"
    VerifyT = "VerifyT"
    Ahead = "Ahead"           # on-congestion pull-ahead: writes only marked for the peer
    Behind = "Behind"         # the peer is Ahead: this node will be resynced

    @property
    def is_connected(self) -> bool:
        """True once the handshake is over: replication flows."""
        return self in _CONNECTED

    @property
    def is_syncing(self) -> bool:
        return self in (ConnState.SyncSource, ConnState.SyncTarget,
                        ConnState.PausedSyncS, ConnState.PausedSyncT)


_CONNECTED = frozenset({
    ConnState.Connected, ConnState.StartingSyncS, ConnState.StartingSyncT,
    ConnState.WFBitMapS, ConnState.WFBitMapT, ConnState.WFSyncUUID,
    ConnState.SyncSource, ConnState.SyncTarget, ConnState.PausedSyncS,
    ConnState.PausedSyncT, ConnState.VerifyS, ConnState.VerifyT,
    ConnState.Ahead, ConnState.Behind,
})


class DiskState(enum.Enum):
    Diskless = "Diskless"
    Attaching = "Attaching"
    Failed = "Failed"
    Negotiating = "Negotiating"
    Inconsistent = "Inconsistent"
    Outdated = "Outdated"
    DUnknown = "DUnknown"
    Consistent = "Consistent"
    UpToDate = "UpToDate"


class Refusal(NamedTuple):
    """One of DRBD's numbered reasons for refusing a state change."""
    code: int
    text: str

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.code)

    @property
    def message(self) -> str:
        return f"State change failed: ({self.code}) {self.text}"


# DRBD 8.4's refusal table: the numbers of enum drbd_state_rv (drbd.h) and
# the words drbdsetup prints for them.  Scripts match on both, so they are
# DRBD's exactly; tests/unit/test_states_table.py holds its own copy and
# fails if one drifts.  (-3 is unused in DRBD too.)
SS_TWO_PRIMARIES = Refusal(-1, "Multiple primaries not allowed by config")
SS_NO_UP_TO_DATE_DISK = Refusal(-2, "Need access to UpToDate data")
SS_NO_LOCAL_DISK = Refusal(-4, "Can not resync without local disk")
SS_NO_REMOTE_DISK = Refusal(-5, "Can not resync without remote disk")
SS_CONNECTED_OUTDATES = Refusal(-6, "Refusing to be Outdated while Connected")
SS_PRIMARY_NOP = Refusal(-7, "Refusing to be Primary while peer is not outdated")
SS_RESYNC_RUNNING = Refusal(-8, "Can not start OV/resync since it is already active")
SS_ALREADY_STANDALONE = Refusal(-9, "Can not disconnect a StandAlone device")
SS_CW_FAILED_BY_PEER = Refusal(-10, "State change was refused by peer node")
SS_IS_DISKLESS = Refusal(-11, "Device is diskless, the requested operation requires a disk")
SS_DEVICE_IN_USE = Refusal(-12, "Device is held open by someone")
SS_NO_NET_CONFIG = Refusal(-13, "Have no net/connection configuration")
SS_NO_VERIFY_ALG = Refusal(-14, "Need a verify algorithm to start online verify")
SS_NEED_CONNECTION = Refusal(-15, "Need a connection to start verify or resync")
SS_LOWER_THAN_OUTDATED = Refusal(-16, "Disk state is lower than outdated")
SS_NOT_SUPPORTED = Refusal(-17, "Peer does not support protocol")
SS_IN_TRANSIENT_STATE = Refusal(-18, "In transient state, retry after next state change")
SS_CONCURRENT_ST_CHG = Refusal(-19, "Concurrent state changes detected and aborted")
SS_O_VOL_PEER_PRI = Refusal(-20, "Other vol primary on peer not allowed by config")
SS_OUTDATE_WO_CONN = Refusal(-21, "Need a connection for a graceful disconnect/outdate peer")

SS_TABLE: dict[int, Refusal] = {r.code: r for r in (
    SS_TWO_PRIMARIES, SS_NO_UP_TO_DATE_DISK, SS_NO_LOCAL_DISK, SS_NO_REMOTE_DISK,
    SS_CONNECTED_OUTDATES, SS_PRIMARY_NOP, SS_RESYNC_RUNNING, SS_ALREADY_STANDALONE,
    SS_CW_FAILED_BY_PEER, SS_IS_DISKLESS, SS_DEVICE_IN_USE, SS_NO_NET_CONFIG,
    SS_NO_VERIFY_ALG, SS_NEED_CONNECTION, SS_LOWER_THAN_OUTDATED, SS_NOT_SUPPORTED,
    SS_IN_TRANSIENT_STATE, SS_CONCURRENT_ST_CHG, SS_O_VOL_PEER_PRI, SS_OUTDATE_WO_CONN)}


def exit_code_for(code: int) -> int:
    """The exit code drbdsetup ends with for a refusal: 17 when no UpToDate
    data is reachable, 16 for no local disk, 5 for a disk below Outdated,
    11 for every other refusal."""
    return {SS_NO_UP_TO_DATE_DISK.code: EXIT_NO_UPTODATE,
            SS_NO_LOCAL_DISK.code: EXIT_NO_LOCAL_DISK,
            SS_LOWER_THAN_OUTDATED.code: EXIT_LOWER_THAN_OUTDATED}.get(code, EXIT_STATE)


class StateChangeRefused(Exception):
    """A refused state change: DRBD's numbered reason and its exit code.

    Prints as drbdsetup does: ``State change failed: (-2) Need access to
    UpToDate data``.  Without ``text`` the table's words are used, without
    ``exit_code`` the exit code drbdsetup gives that number.
    """

    def __init__(self, code: int, text: str | None = None, exit_code: int | None = None):
        if text is None:
            known = SS_TABLE.get(code)
            text = known.text if known else "unknown error"
        super().__init__(f"State change failed: ({code}) {text}")
        self.code = code
        self.text = text
        self.exit_code = exit_code_for(code) if exit_code is None else exit_code


def refuse(reason: tuple[int, str], exit_code: int | None = None) -> StateChangeRefused:
    """The exception for one of the table's refusals (give the constant)."""
    return StateChangeRefused(reason[0], reason[1], exit_code)


# The hand-written refusals of blockrepl/driver/resource.py, named: each is
# the reason DRBD 8.4 gives in the same situation (see is_valid_state() and
# is_valid_soft_transition() in DRBD's drbd_state.c).
DETACH_PRIMARY_WITHOUT_UPTODATE_PEER = SS_NO_UP_TO_DATE_DISK   # detach: last good disk of a Primary
DEMOTE_WHILE_OPEN = SS_DEVICE_IN_USE                            # secondary/down: device open
OUTDATE_WHILE_CONNECTED = SS_CONNECTED_OUTDATES                 # outdate of a connected disk
INVALIDATE_PRIMARY_DISCONNECTED = SS_NEED_CONNECTION            # invalidate of a Primary, no peer
SYNC_SOURCE_WITHOUT_UPTODATE = SS_NO_UP_TO_DATE_DISK            # invalidate-remote, local not UpToDate
VERIFY_WITHOUT_LOCAL_DISK = SS_NO_LOCAL_DISK                    # verify on a Diskless node
VERIFY_WITHOUT_CONNECTION = SS_NEED_CONNECTION                  # verify while not Connected
PROMOTE_REFUSED_BY_PEER = SS_CW_FAILED_BY_PEER                  # the peer said no to our promotion


def refused_by_peer(peer_code: int) -> StateChangeRefused:
    """Our promotion was refused by the peer: DRBD reports (-10) to the
    admin and logs the peer's own reason; the exception carries that
    reason (``peer_code``, ``peer_text``) for the log line."""
    e = refuse(PROMOTE_REFUSED_BY_PEER)
    peer = SS_TABLE.get(peer_code)
    e.peer_code = peer_code
    e.peer_text = peer.text if peer else "unknown error"
    return e


# Failures that are not state changes: drbdsetup prints them as
# ``Failure: (N) text`` and ends with exit code 10.  Numbers and words of
# DRBD 8.4's enum drbd_ret_code, for the checks replfs makes.
class Failure(NamedTuple):
    code: int
    text: str

    @property
    def message(self) -> str:
        return f"Failure: ({self.code}) {self.text}"


ERR_DISCARD_IMPOSSIBLE = Failure(123, "--discard-my-data not allowed when primary.")
ERR_NO_DISK = Failure(138, "Device does not have a disk-config")
ERR_PAUSE_IS_SET = Failure(134, "Sync-pause flag is already set")
ERR_PAUSE_IS_CLEAR = Failure(135, "Sync-pause flag is already cleared")
ERR_PIC_PEER_DEP = Failure(157, "Sync-pause flag is already cleared.\n"
                                "Note: Resync pause caused by the peer node.")
ERR_RESIZE_RESYNC = Failure(130, "Resize not allowed during resync.")
ERR_MD_DISK_TOO_SMALL = Failure(112, "Meta device too small.")
ERR_IMPLICIT_SHRINK = Failure(170, "Implicit device shrinking not allowed. See kernel log.")
ERR_TABLE: dict[int, Failure] = {f.code: f for f in (
    ERR_DISCARD_IMPOSSIBLE, ERR_NO_DISK, ERR_PAUSE_IS_SET, ERR_PAUSE_IS_CLEAR,
    ERR_PIC_PEER_DEP, ERR_RESIZE_RESYNC, ERR_MD_DISK_TOO_SMALL, ERR_IMPLICIT_SHRINK)}


def fail(failure: Failure, where: str) -> ReplfsError:
    """``where: Failure: (N) text``, exit code 10, as drbdsetup reports it."""
    return ReplfsError(f"{where}: {failure.message}", EXIT_CONFIG)


@dataclass(frozen=True)
class View:
    """What the promotion rule needs to know about a resource."""
    role: Role
    peer_role: Role
    disk: DiskState
    peer_disk: DiskState
    conn: ConnState
    allow_two_primaries: bool


def check_promote(v: View, *, force: bool) -> None:
    """Raise StateChangeRefused if this node may not become Primary.

    ``force`` is `primary --force` (alias --overwrite-data-of-peer, -o):
    it lets a node whose data is not known to be good declare it good.
    """
    if v.role is Role.Primary:
        return
    if v.conn.is_connected and v.peer_role is Role.Primary and not v.allow_two_primaries:
        raise refuse(SS_TWO_PRIMARIES)
    if v.disk is DiskState.Diskless:
        if v.peer_disk is DiskState.UpToDate and v.conn.is_connected:
            return
        raise refuse(SS_NO_UP_TO_DATE_DISK)
    if v.disk is DiskState.UpToDate:
        return
    if v.disk is DiskState.Inconsistent and v.conn.is_connected \
            and v.peer_disk is DiskState.UpToDate:
        return      # a SyncTarget: what it lacks is read from the peer (as DRBD 8.4)
    if v.disk in (DiskState.Consistent, DiskState.Outdated, DiskState.Inconsistent):
        if force:
            return
        raise refuse(SS_NO_UP_TO_DATE_DISK)
    raise refuse(SS_NO_UP_TO_DATE_DISK)


def check_outdate(v: View) -> None:
    """Raise StateChangeRefused if the local disk may not become Outdated,
    with the reason DRBD gives: a disconnected Primary would lose its only
    UpToDate data (-2); a connected disk stays what the peer knows (-6); a
    Diskless node has nothing to outdate (-11); an Inconsistent disk is
    already below Outdated (-16)."""
    if v.role is Role.Primary and not v.conn.is_connected:
        raise refuse(SS_NO_UP_TO_DATE_DISK)
    if v.conn.is_connected and v.disk is not DiskState.Inconsistent:
        raise refuse(OUTDATE_WHILE_CONNECTED)
    if v.disk is DiskState.Diskless:
        raise refuse(SS_IS_DISKLESS)
    if v.disk is DiskState.Inconsistent:
        raise refuse(SS_LOWER_THAN_OUTDATED)
