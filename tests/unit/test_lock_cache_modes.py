from replfs.locking.cache import _strongest_compatible
from replfs.locking.dlm.modes import Mode, compatible


def test_downconvert_target_is_the_strongest_mode_that_lets_the_other_in():
    assert _strongest_compatible(Mode.PR, Mode.EX) == Mode.PR
    assert _strongest_compatible(Mode.EX, Mode.EX) == Mode.NL
    assert _strongest_compatible(Mode.CR, Mode.EX) == Mode.PW
    assert _strongest_compatible(Mode.PW, Mode.PR) == Mode.CR
    for held in Mode:
        for blocked in Mode:
            t = _strongest_compatible(blocked, held)
            assert compatible(t, blocked) and compatible(blocked, t)


async def test_a_failed_down_conversion_drops_the_lock_without_raising(nursery):
    """The connection to replfsd going away while a BAST is being served
    (unmount, a fenced node) loses the lock; it must not take the owner's
    nursery down, and the next holder asks for a new lock."""
    import errno

    import trio

    from replfs.blockdev import BlockDeviceError
    from replfs.locking.cache import LockCache

    class FakeLock:
        def __init__(self, name, mode, on_bast):
            self.name, self.mode, self.on_bast = name, mode, on_bast
            self.lvb, self.lvb_valid = b"", False

        async def convert(self, mode, lvb=None):
            raise BlockDeviceError(errno.EIO, "replfsd went away")

    class FakeDlm:
        requests = 0

        async def lock(self, domain, name, mode, on_bast=None):
            self.requests += 1
            return FakeLock(name, mode, on_bast)

    dlm = FakeDlm()
    cache = LockCache(dlm, "d", nursery=nursery)
    async with cache.hold("x", Mode.EX):
        pass
    lk = cache.entries["x"].lock
    await lk.on_bast(lk, Mode.EX)
    with trio.fail_after(5):
        while cache.entries["x"].lock is not None:
            await trio.sleep(0.01)
    assert cache.entries["x"].mode == Mode.NL and cache.entries["x"].blocked is None
    async with cache.hold("x", Mode.PR):
        pass
    assert dlm.requests == 2
