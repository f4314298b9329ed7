"""events2's pure parts: a resource's objects, the events between two
states, the line format, and the event log's order, filter and loss."""
from __future__ import annotations

import json
import types

import trio

from replfs.daemon import events as E


def res(role="Secondary", cstate="WFConnection", dstate="UpToDate", pdsk="DUnknown",
        peer_role="Unknown", susp=False, user_isp=False, peer_isp=False):
    mk = lambda v: types.SimpleNamespace(value=v)   # noqa: E731
    return types.SimpleNamespace(
        role=mk(role), cstate=mk(cstate), dstate=mk(dstate), pdsk=mk(pdsk),
        peer_role=mk(peer_role), io_suspended=susp,
        engine=types.SimpleNamespace(user_isp=user_isp, peer_isp=peer_isp),
        peer=types.SimpleNamespace(name="beta"), me=types.SimpleNamespace(minor=0))


def test_drbd9_connection_and_replication_names():
    assert E.connection_state("StandAlone") == "StandAlone"
    assert E.connection_state("WFConnection") == "Connecting"
    assert E.connection_state("SyncSource") == "Connected"
    assert E.replication_state("WFConnection") == "Off"
    assert E.replication_state("Connected") == "Established"
    assert E.replication_state("PausedSyncT") == "PausedSyncT"
    assert E.replication_state("Ahead") == "Ahead"


def test_diff_gives_only_what_changed_with_the_object_keys():
    a = E.project(res())
    assert E.diff("r0", a, a) == []
    b = E.project(res(role="Primary", cstate="SyncSource", pdsk="Inconsistent",
                      peer_role="Secondary"))
    evs = E.diff("r0", a, b)
    lines = [E.format_event(e) for e in evs]
    assert lines == [
        "change resource name:r0 role:Primary",
        "change connection name:r0 peer-node:beta connection:Connected role:Secondary",
        "change peer-device name:r0 peer-node:beta volume:0 replication:SyncSource "
        "peer-disk:Inconsistent",
    ]
    created = [E.format_event(e) for e in E.diff("r0", None, a)]
    assert created[0] == "create resource name:r0 role:Secondary suspended:no"
    assert [line.split()[1] for line in created] == list(E.OBJECTS)
    gone = [E.format_event(e) for e in E.diff("r0", a, None)]
    assert gone == ["destroy peer-device name:r0 peer-node:beta volume:0",
                    "destroy device name:r0 volume:0 minor:0",
                    "destroy connection name:r0 peer-node:beta",
                    "destroy resource name:r0"]
    susp = E.diff("r0", a, E.project(res(susp=True, user_isp=True)))
    assert [E.format_event(e) for e in susp] == [
        "change resource name:r0 suspended:fencing",
        "change peer-device name:r0 peer-node:beta volume:0 resync-suspended:user"]


def test_timestamps_are_iso_8601_with_microseconds():
    line = E.format_event({"kind": "change", "object": "resource", "name": "r0",
                           "fields": {"role": "Primary"}, "time": 1795826141.25},
                          timestamps=True)
    stamp, rest = line.split(" ", 1)
    assert rest == "change resource name:r0 role:Primary"
    assert stamp[10] == "T" and stamp[19:26] == ".250000" and stamp[-3] == ":", stamp


async def test_log_orders_filters_and_wakes():
    log = E.EventLog(keep=8)
    r = res()
    log.observe("r0", r)
    log.observe("r1", r)
    seq, exists = log.snapshot("r0")
    assert seq == 8 and [e["kind"] for e in exists] == ["exists"] * 4
    log.observe("r0", r)                    # nothing changed: no event
    assert log.seq == 8
    woke = []

    async def waiter():
        await log.wait(8)
        woke.append(log.since(8, "r1"))

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(waiter)
            await trio.sleep(0.01)
            assert not woke
            r.role = types.SimpleNamespace(value="Primary")
            log.observe("r1", r)
    (evs, lost), = woke
    assert [(e["name"], e["fields"]) for e in evs] == [("r1", {"role": "Primary"})]
    assert not lost and json.dumps(evs)              # JSON-able, for --json
    for i in range(10):                               # more than the log keeps
        r.role = types.SimpleNamespace(value="Primary" if i % 2 else "Secondary")
        log.observe("r0", r)
    evs, lost = log.since(8, None)
    assert lost and len(evs) == 8
    log.gone("r0")
    assert log.since(log.seq - 4, None)[0][-1]["kind"] == "destroy"
    assert [e["name"] for e in log.snapshot()[1]] == ["r1"] * 4
