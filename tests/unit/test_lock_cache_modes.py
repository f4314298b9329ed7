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


async def test_a_cancelled_waiter_leaves_no_request_granted_to_nobody(nursery, autojump_clock):
    """A holder cancelled while the lock manager has not granted yet (a
    FUSE request interrupted): the grant, when it comes, stays in the
    cache, and a BAST then gives it back -- the other node is not left
    waiting for a lock nobody holds."""
    import trio

    from replfs.locking.cache import LockCache

    granted = trio.Event()

    class FakeLock:
        def __init__(self, name, mode, on_bast):
            self.name, self.mode, self.on_bast = name, mode, on_bast
            self.lvb, self.lvb_valid = b"", False
            self.unlocked = False

        async def convert(self, mode, lvb=None):
            self.mode = mode

        async def unlock(self, lvb=None):
            self.unlocked = True
            self.mode = None

    class SlowDlm:
        locks = []

        async def lock(self, domain, name, mode, on_bast=None):
            await granted.wait()            # the other node holds it for now
            lk = FakeLock(name, mode, on_bast)
            self.locks.append(lk)
            return lk

    dlm = SlowDlm()
    cache = LockCache(dlm, "d", nursery=nursery)
    entered = []

    async def holder(scope):
        with scope:
            async with cache.hold("x", Mode.EX):
                entered.append(1)

    scope = trio.CancelScope()
    nursery.start_soon(holder, scope)
    await trio.sleep(1)
    scope.cancel()                      # interrupted while it waits
    await trio.sleep(1)
    granted.set()
    with trio.fail_after(10):
        while not dlm.locks:
            await trio.sleep(0.1)
    await trio.sleep(1)
    assert not entered                  # the cancelled caller did not get in
    e = cache.entries["x"]
    assert e.lock is dlm.locks[0] and e.mode == Mode.EX and not e.held_modes()
    # the other node asks: the cached grant goes down at once
    await e.lock.on_bast(e.lock, Mode.EX)
    with trio.fail_after(10):
        while e.mode != Mode.NL:
            await trio.sleep(0.1)
    assert dlm.locks[0].mode == Mode.NL
