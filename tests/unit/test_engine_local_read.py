"""The read fast path's rule (Engine.local_read_ok): the driver reads the
backing file itself only where the engine's own read would read it
locally with nothing to wait for -- Primary, an attached UpToDate disk,
I/O not suspended, inside the device."""
from replfs.blockrepl.core.states import DiskState

from test_engine_resize import MIB, Pair  # (tests/unit is on sys.path)


def test_local_read_ok_follows_role_disk_state_and_range():
    p = Pair(4 * MIB, 4 * MIB)
    a, b = p.a.e, p.b.e
    size = a.size
    assert not a.local_read_ok(0, 4096), "a Secondary serves no application I/O"
    p.run(p.a, a.primary("p"))
    assert a.local_read_ok(0, 4096) and a.local_read_ok(size - 4096, 4096)
    assert not a.local_read_ok(size - 4096, 8192) and not a.local_read_ok(-1, 10)
    before = a.dr
    a.local_read_done(4096)
    assert a.dr == before + 4096
    # Inconsistent (a SyncTarget Primary): stale blocks come from the peer,
    # so every read takes the engine's path
    a.dstate = DiskState.Inconsistent
    assert not a.local_read_ok(0, 4096)
    a.dstate = DiskState.UpToDate
    a.susp = True
    assert not a.local_read_ok(0, 4096)
    a.susp = False
    assert not b.local_read_ok(0, 4096)
