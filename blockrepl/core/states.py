"""Roles, connection states and disk states, with DRBD's names.

The names are the user interface: admins read them in `replfsadm status`
and scripts compare them, so they are spelled exactly as DRBD spells
them.  The pure rules about which state changes are allowed live here
too, so the driver only asks and acts.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from replfs.errors import EXIT_NO_LOCAL_DISK, EXIT_NO_UPTODATE, EXIT_STATE


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


class StateChangeRefused(Exception):
    """A refused state change: DRBD's numbered reason plus an exit code."""

    def __init__(self, code: int, text: str, exit_code: int = EXIT_STATE):
        super().__init__(f"State change failed: ({code}) {text}")
        self.code = code
        self.text = text
        self.exit_code = exit_code


# DRBD's refusal numbers and texts that replfs can produce.
SS_NO_UP_TO_DATE_DISK = (-2, "Refusing to be Primary without at least one UpToDate disk")
SS_TWO_PRIMARIES = (-1, "Multiple primaries not allowed by config")
SS_NO_LOCAL_DISK = (-4, "Need access to UpToDate data")  # used for verbs needing a disk
SS_DEVICE_IN_USE = (-12, "Device is held open by someone")
SS_NO_NET_CONFIG = (-13, "Need a connection to start verify or resync")
SS_IS_DISKLESS = (-17, "Device is diskless, the requested operation requires a disk")
SS_LOWER_THAN_OUTDATED = (-9, "Disk state is lower than outdated")
SS_PRIMARY_NOP = (-8, "Refusing to be Outdated while Primary")
SS_RESYNC_RUNNING = (-10, "Can not start OV/resync since it is already active")
SS_NEED_CONNECTION = (-15, "Need a connection to start verify or resync")
SS_ALREADY_STANDALONE = (-6, "Already StandAlone")


def refuse(reason: tuple[int, str], exit_code: int = EXIT_STATE) -> StateChangeRefused:
    return StateChangeRefused(reason[0], reason[1], exit_code)


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
        raise refuse(SS_NO_UP_TO_DATE_DISK, EXIT_NO_UPTODATE)
    if v.disk is DiskState.UpToDate:
        return
    if v.disk in (DiskState.Consistent, DiskState.Outdated, DiskState.Inconsistent):
        if force:
            return
        raise refuse(SS_NO_UP_TO_DATE_DISK, EXIT_NO_UPTODATE)
    raise refuse(SS_NO_UP_TO_DATE_DISK, EXIT_NO_UPTODATE)


def check_outdate(v: View) -> None:
    if v.role is Role.Primary:
        raise refuse(SS_PRIMARY_NOP)
    if v.disk is DiskState.Diskless:
        raise refuse(SS_IS_DISKLESS, EXIT_NO_LOCAL_DISK)
    if v.disk is DiskState.Inconsistent:
        raise refuse(SS_LOWER_THAN_OUTDATED)
