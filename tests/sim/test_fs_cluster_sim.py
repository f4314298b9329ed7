"""Two nodes mount one volume at once: a deterministic-ish simulator of
the shared filesystem (fs/core.py with fs/clusterlocks.py), in one
process.

Each node is a ``Filesystem`` in its own slot with its own metadata cache,
over its own handle on one volume image (a perfect protocol C mirror:
both see every completed write), with a ``LockCache`` on its own
``DlmDomain``; the two domains talk over in-memory pipes.  Device
requests wait seeded random virtual times, so the two nodes' requests
interleave at every await.

Workers (tests/fs/test_concurrency.py's) run every step on a node picked
at random: a file written on one node is appended to, renamed, read back
and unlinked on the other, and every read must return exactly what the
last completed write put there (zero stale reads).  After the run both
nodes must show the same tree and bytes; after both unmount the raw-block
oracle must find the volume clean.  Mutants (no commit before a lock goes
to the other node; no refresh of cached blocks when a lock comes back;
a lookup that trusts its cache without the child's lock) must be caught.

Not modelled yet (later steps of the dual-primary work): node death and
recovery, the open lock, kernel caches, separate disks joined by the
mirror.
"""
from __future__ import annotations

import random

import pytest
import trio

from replfs.fs.clusterlocks import ClusterLockManager
from replfs.fs import core as C
from replfs.fs.core import Filesystem
from replfs.locking.dlmdriver import DlmDomain
from replfs.locking.inproc import InProcessDlm
from tests import soak
from tests.fs.conftest import check_volume, format_image, make_image
from tests.fs.test_concurrency import JitterDevice, Worker, check_tree

DOMAIN = "vol"


def seed_scheduler(seed: int) -> None:
    """Seed trio's own scheduling choices (the order in which it runs a
    batch of ready tasks) so that a seed names one interleaving, not a
    family of them: without it a mutant was caught by a seed in one run
    and missed by the same seed in the next."""
    trio._core._run._r.seed(seed)


async def dlm_pair(nursery, seed: int, cut: set | None = None) -> dict[int, DlmDomain]:
    """Two DlmDomains joined by ordered in-memory pipes with seeded delays;
    messages from or to a node in ``cut`` are lost."""
    cut = set() if cut is None else cut
    doms: dict[int, DlmDomain] = {}
    sends = {}
    for me in (0, 1):
        tx, rx = trio.open_memory_channel(1000)
        rng = random.Random(seed * 31 + me)

        async def pump(rx=rx, src=me):
            async for data in rx:
                await trio.sleep(rng.random() * 0.001)
                if src in cut or 1 - src in cut:
                    continue
                await doms[1 - src].receive(src, data)

        async def send(to, data, tx=tx):
            await tx.send(data)

        sends[me] = send
        nursery.start_soon(pump)
    for me in (0, 1):
        doms[me] = DlmDomain(DOMAIN, me, [0, 1], sends[me])
        await nursery.start(doms[me].run)
    return doms


async def cut_off(c, doms) -> None:
    """End of a simulation, passed or failed: every node is cut off (its
    lock requests fail, its disk refuses), so that no operation still
    waiting -- shielded once it changed something, as it must be -- keeps
    the test from ending."""
    with trio.CancelScope(shield=True):
        for d in doms.values():
            if not d.fenced:
                await d.fence("simulation over")
    for fs in c.fss:
        fs.dev.dead = True


class SharedDisk:
    """The volume both nodes see, in memory (protocol C with a perfect
    link: a completed write is on both disks).  No threads, so the
    virtual clock decides every interleaving."""

    def __init__(self, data: bytes):
        self.buf = bytearray(data)

    @property
    def size(self) -> int:
        return len(self.buf)

    async def read(self, off: int, n: int) -> bytes:
        return bytes(self.buf[off:off + n])

    async def write(self, off: int, data) -> None:
        if off + len(data) > len(self.buf):
            raise OSError(28, "write past the end of the volume")
        self.buf[off:off + len(data)] = data

    async def flush(self) -> None:
        pass

    async def discard(self, off: int, n: int) -> None:
        await self.write(off, bytes(n))

    async def close(self) -> None:
        pass


class Cluster:
    def __init__(self, disk: SharedDisk, seed: int):
        self.disk = disk
        self.seed = seed
        self.fss: list[Filesystem] = []
        self.locks: list[ClusterLockManager] = []

    async def mount(self, nursery, doms) -> None:
        async def one(i):
            dev = JitterDevice(self.disk, self.seed * 10 + i)
            locks = ClusterLockManager(InProcessDlm({DOMAIN: doms[i]}, nursery), DOMAIN,
                                       nursery)
            self.locks.append(locks)
            # each node chooses its slot itself, under the super lock
            fs = await Filesystem.mount(dev, None, locks=locks, node=i,
                                        recover_dirty_slots=False)
            self.fss.append(fs)

        async with trio.open_nursery() as n:
            n.start_soon(one, 0)
            n.start_soon(one, 1)
        self.fss.sort(key=lambda f: f.node)
        assert sorted(f.slot for f in self.fss) == [0, 1], [f.slot for f in self.fss]

    def dump(self) -> str:
        out = []
        for fs in self.fss:
            out.append(f"node {fs.slot}: active={fs._active} closing={fs._closing} "
                       f"live={len(fs._live)} commit_lock={fs._commit_lock.locked()}")
            for op in fs._live:
                out.append(f"  op held={ {k: m.name for k, m in op.held.items()} } "
                           f"active={op.active}")
        for i, locks in enumerate(self.locks):
            out.append(f"lock cache {i}:")
            for e in locks.cache.entries.values():
                out.append(f"  {e!r} busy={e.busy.locked()} "
                           f"dlm={e.lock.mode if e.lock is not None else None}")
        out.append(task_stacks())
        return "\n".join(out)


def task_stacks() -> str:
    """Where every task of this trio run waits (for deadlock reports)."""
    lines = []

    def walk(task, depth):
        frames = []
        coro = task.coro
        while coro is not None:
            f = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            if f is not None:
                frames.append(f"{f.f_code.co_name}:{f.f_lineno}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
        lines.append("  " * depth + f"{task.name}: " + " > ".join(frames[-6:]))
        for n in task.child_nurseries:
            for t in n.child_tasks:
                walk(t, depth + 1)

    walk(trio.lowlevel.current_root_task(), 0)
    return "\n".join(lines)


async def run_cluster(tmp_path, seed: int, workers: int = 4, steps: int = 50,
                      size: int = 64 << 20) -> None:
    path = make_image(tmp_path / f"shared{seed}.img", size)
    seed_scheduler(seed)
    await format_image(path, slots=2)
    with open(path, "rb") as f:
        disk = SharedDisk(f.read())
    c = Cluster(disk, seed)
    async with trio.open_nursery() as nursery:
        doms = await dlm_pair(nursery, seed)
        try:
            report = []

            async def watchdog():
                await trio.sleep(3000)
                report.append(c.dump())

            nursery.start_soon(watchdog)
            try:
                with trio.fail_after(3600):      # virtual time: a deadlock ends here
                    await c.mount(nursery, doms)
                    a, b = c.fss
                    dirs = {}
                    for name in ["s1", "s2"] + [f"p{i}" for i in range(workers)]:
                        dirs[name] = (await a.mkdir(a.root_ino, name)).ino
                    ws = [Worker(i, random.Random(seed * 100 + i)) for i in range(workers)]
                    async with trio.open_nursery() as n:
                        for w in ws:
                            n.start_soon(w.run, c.fss, dirs, steps)
                    for fs in c.fss:
                        assert fs.failed is None, fs.failed
                        await check_tree(fs, ws, workers)
                        assert fs.alloc.deferred_total == 0, "a free waited for the bitmap lock"
                    await a.unmount()
                    await b.unmount()
            except trio.TooSlowError:
                raise AssertionError(f"seed {seed}: deadlock\n{''.join(report)}") from None
        finally:
            await cut_off(c, doms)
        nursery.cancel_scope.cancel()
    problems = await check_volume(disk)
    assert not problems, (seed, problems)


@pytest.mark.parametrize("seed", range(1, 9))
async def test_two_nodes_share_one_volume(tmp_path, autojump_clock, seed):
    await run_cluster(tmp_path, seed)


async def test_no_enospc_while_the_global_bitmap_has_room(tmp_path, autojump_clock,
                                                          monkeypatch):
    """A reservation fails (ENOSPC) only after it looked at the global
    bitmap under its lock.  It used to look once, before joining the
    transaction; when the join waited for a commit, other operations of
    the node took the window meanwhile, and the reservation failed with
    the window short and the global bitmap never asked: ENOSPC on a volume
    43 % free (a two-node soak run on real mounts; seed 13 here, on a
    small volume with six workers, shows it)."""
    failed = []
    orig = C.Filesystem._try_reserve

    async def watched(self, n):
        ok = await orig(self, n)
        op = C._current_op.get()
        if not ok and op is not None and ("bitmap", 0) not in op.held:
            failed.append((self.node, n, self.alloc.window_free(), self.alloc.reserved))
        return ok
    monkeypatch.setattr(C.Filesystem, "_try_reserve", watched)
    await run_cluster(tmp_path, 13, workers=6, steps=150, size=20 << 20)
    assert not failed, failed


@pytest.mark.soak(twin="test_two_nodes_share_one_volume")
@pytest.mark.parametrize("seed", soak.seeds(range(1000, 1300)))
async def test_two_nodes_share_one_volume_soak(tmp_path, autojump_clock, seed):
    await run_cluster(tmp_path, seed, workers=6, steps=120)


# ------------------------------------------------------------ mutants

async def _caught(tmp_path, seeds=range(1, 13)) -> str | None:
    for seed in seeds:
        try:
            await run_cluster(tmp_path, seed, steps=40)
        except (AssertionError, OSError) as e:
            return f"seed {seed}: {str(e)[:300]}"
        except BaseExceptionGroup as eg:
            return f"seed {seed}: {eg!r}"[:300]
    return None


async def test_mutant_no_commit_before_hand_over(tmp_path, autojump_clock, monkeypatch):
    """A node that gives a lock up without writing back what it changed
    under it: the other node reads old blocks."""
    async def downconvert(self, res, old, new):
        if new == C.NL:
            self._forget(res)
    monkeypatch.setattr(Filesystem, "downconvert", downconvert)
    got = await _caught(tmp_path)
    assert got, "no-commit mutant survived"


async def test_mutant_no_refresh_when_a_lock_comes_back(tmp_path, autojump_clock, monkeypatch):
    """Blocks cached before a lock went to NL trusted again when it comes
    back (cached outside the lock, or kept by a hand-over that did not
    forget)."""
    monkeypatch.setattr(ClusterLockManager, "_refresh", lambda self, name, mode: None)
    monkeypatch.setattr(Filesystem, "_forget", lambda self, res: None)
    got = await _caught(tmp_path)
    assert got, "no-refresh mutant survived"


async def test_mutant_reads_without_the_inode_lock(tmp_path, autojump_clock, monkeypatch):
    """An operation that reads an inode without its lock (as lookup did
    before this work): stale attributes and data across nodes."""
    real = Filesystem._locked

    def locked(self, *inos, shared=False, level="inode", ordered=False):
        if shared and level == "inode":
            return real(self)          # takes nothing
        return real(self, *inos, shared=shared, level=level, ordered=ordered)

    monkeypatch.setattr(Filesystem, "_locked", locked)
    got = await _caught(tmp_path)
    assert got, "lockless-read mutant survived"


# ------------------------------------------------------------ node death

async def run_node_death(tmp_path, seed: int, workers: int = 4, steps: int = 60,
                         mutate=None) -> dict:
    """Node 1 dies in the middle of the workload (its disk and its DLM
    links cut at a seeded moment); node 0 declares it dead, recovers its
    slot while its own workers go on, then checks: its own workers' files
    exactly as they made them, node 1's fsync'd and untouched files byte
    for byte, and the raw-block oracle clean after it unmounts (no
    cluster leaked: frees reach the global bitmap in the transaction that
    makes them)."""
    path = make_image(tmp_path / f"death{seed}.img", 64 << 20)
    seed_scheduler(seed)
    await format_image(path, slots=2)
    with open(path, "rb") as f:
        disk = SharedDisk(f.read())
    c = Cluster(disk, seed)
    rng = random.Random(seed)
    result = {}
    async with trio.open_nursery() as nursery:
        cut = set()
        doms = await dlm_pair(nursery, seed, cut)
        try:
            report = []

            async def watchdog():
                await trio.sleep(3000)
                report.append(c.dump())

            nursery.start_soon(watchdog)
            try:
                with trio.fail_after(3600):
                    await c.mount(nursery, doms)
                    a, b = c.fss
                    dirs = {}
                    for name in ["s1", "s2"] + [f"p{i}" for i in range(workers)]:
                        dirs[name] = (await a.mkdir(a.root_ino, name)).ino
                        await b.lookup(b.root_ino, name)     # b learns them by path
                    ws = [Worker(i, random.Random(seed * 100 + i)) for i in range(workers)]
                    on_b = ws[workers // 2:]
                    async with trio.open_nursery() as n:
                        scopes = []
                        for w in ws:
                            scope = trio.CancelScope()
                            scopes.append(scope)

                            async def run(w=w, scope=scope):
                                with scope:
                                    try:
                                        await w.run(b if w in on_b else a, dirs, steps)
                                    except OSError:
                                        if w not in on_b:
                                            raise       # node 0 must not see errors
                            n.start_soon(run)
                        await trio.sleep(rng.uniform(0.02, 0.4))
                        # node 1 dies: its disk and links first, then its tasks
                        b.dev.dead = True
                        cut.add(1)
                        # what is left of node 1 learns it is cut off: its lock
                        # requests fail (a real node's self-fence; its
                        # operations would otherwise wait for ever)
                        await doms[1].fence("node died")
                        # every free of a committed transaction went to the
                        # global bitmap with it: nothing waits in memory
                        assert not b.alloc.deferred, b.alloc.deferred
                        for w, scope in zip(ws, scopes):
                            if w in on_b:
                                scope.cancel()
                        t_dead = trio.current_time()
                        if mutate != "no-dead-event":
                            a.node_dead(1)
                        await doms[0].node_down(1)
                        slots = await a.recover_node(1)
                        result["stall"] = trio.current_time() - t_dead
                        assert slots == [b.slot] or mutate, slots
                    # node 0's workers finished without an error
                    assert a.failed is None, a.failed
                    for w in ws:
                        if w in on_b:
                            w.live = {}
                            for name, (where, data) in w.durable.items():
                                if name in w.touched:
                                    continue
                                d = await a.lookup(a.root_ino, where)
                                f = await a.lookup(d.ino, name)
                                fh = await a.open(f.ino)
                                assert await a.read(fh, 0, len(data) + 1) == data, name
                                await a.release(fh)
                    mine = [w for w in ws if w not in on_b]
                    for d in ["s1", "s2"] + [f"p{w.wid}" for w in mine]:
                        got = {n.decode() for n, _, _ in
                               await a.readdir((await a.lookup(a.root_ino, d)).ino)}
                        for w in mine:
                            want = {nm for nm, (wh, _) in w.live.items() if wh == d}
                            have = {nm for nm in got if nm.startswith(f"w{w.wid}-")}
                            assert have == want, (d, w.wid, sorted(have ^ want))
                    await a.unmount()
            except trio.TooSlowError:
                raise AssertionError(f"seed {seed}: deadlock\n{''.join(report)}") from None
        finally:
            await cut_off(c, doms)
        nursery.cancel_scope.cancel()
    problems = await check_volume(disk)
    assert not problems, (seed, problems)
    return result


@pytest.mark.parametrize("seed", range(1, 9))
async def test_node_dies_and_the_other_recovers_while_mounted(tmp_path, autojump_clock, seed):
    await run_node_death(tmp_path, seed)


@pytest.mark.soak(twin="test_node_dies_and_the_other_recovers_while_mounted")
@pytest.mark.parametrize("seed", soak.seeds(range(2000, 2200)))
async def test_node_death_soak(tmp_path, autojump_clock, seed):
    await run_node_death(tmp_path, seed, workers=6, steps=100)


async def _death_caught(tmp_path, mutate=None, seeds=range(1, 17)) -> str | None:
    for seed in seeds:
        try:
            await run_node_death(tmp_path, seed, steps=60, mutate=mutate)
        except (AssertionError, OSError) as e:
            return f"seed {seed}: {str(e)[:300]}"
        except BaseExceptionGroup as eg:
            return f"seed {seed}: {eg!r}"[:300]
    return None


async def test_mutant_locks_used_before_recovery(tmp_path, autojump_clock):
    """The filesystem is not told of the death before the lock manager
    regrants the dead node's locks: blocks older than its journal are
    read and changed.  The window is short (recovery starts right after
    the regrant), so only about one seed in ten catches it; with trio's
    scheduler seeded these are seeds that do (a run over 1..200 found
    28, 29, 39, 42, 45, 51, ...), and the run stops at the first."""
    assert await _death_caught(tmp_path, mutate="no-dead-event",
                               seeds=(28, 29, 39, 42, 45, 51)), \
        "mutant survived"


async def test_mutant_recovery_without_replay(tmp_path, autojump_clock, monkeypatch):
    """The dead slot's journal is not replayed: what it committed and
    acknowledged (fsync) is lost."""
    async def no_replay(dev, sb, slot):
        return None
    monkeypatch.setattr(C.J, "replay", no_replay)
    assert await _death_caught(tmp_path), "mutant survived"


async def test_recovery_stall_is_reported(tmp_path, autojump_clock):
    """How long node 0 waits from the death to the end of recovery (the
    cluster stack's dead threshold comes on top in a real cluster)."""
    stalls = [(await run_node_death(tmp_path, seed))["stall"] for seed in (1, 2, 3)]
    assert all(s < 5 for s in stalls), stalls


async def run_dead_while_alone(tmp_path, seed: int) -> tuple[list[int], int]:
    """Node 0 unmounts; then node 1 dies with committed (fsync'd) changes
    only in its journal, while no node is mounted to recover it.  Node 0
    mounts again: under the super lock it finds node 1's slot in use with
    a free journal lock (OCFS2's mark_dead_nodes), replays it, and has
    node 1's files.  Returns the slots the mount recovered, and node 1's."""
    path = make_image(tmp_path / f"alone{seed}.img", 64 << 20)
    await format_image(path, slots=2)
    with open(path, "rb") as f:
        disk = SharedDisk(f.read())
    c = Cluster(disk, seed)
    rng = random.Random(seed)
    async with trio.open_nursery() as nursery:
        cut = set()
        doms = await dlm_pair(nursery, seed, cut)
        try:
            with trio.fail_after(3600):
                await c.mount(nursery, doms)
                a, b = c.fss
                d = await b.mkdir(b.root_ino, "d")
                files = {}
                for i in range(rng.randint(3, 12)):
                    fh, _ = await b.create(d.ino, f"f{i}")
                    data = rng.randbytes(rng.choice([10, 5000, 70000]))
                    await b.write(fh, 0, data)
                    await b.release(fh)
                    files[f"f{i}"] = data
                await b.fsync()
                await a.unmount()
                # node 1 dies: its journal holds what it committed
                b.dev.dead = True
                cut.add(1)
                await doms[1].fence("node died")
                await doms[0].node_down(1)
                locks = ClusterLockManager(InProcessDlm({DOMAIN: doms[0]}, nursery), DOMAIN,
                                           nursery)
                a2 = await Filesystem.mount(JitterDevice(disk, seed * 10 + 7), None,
                                            locks=locks, node=0, recover_dirty_slots=False)
                c.fss.append(a2)
                dd = await a2.lookup(a2.root_ino, "d")
                for name, data in files.items():
                    f = await a2.lookup(dd.ino, name)
                    fh = await a2.open(f.ino)
                    assert await a2.read(fh, 0, len(data) + 1) == data, name
                    await a2.release(fh)
                recovered = (list(a2.recovered_slots), b.slot)
                await a2.unmount()
        finally:
            await cut_off(c, doms)
        nursery.cancel_scope.cancel()
    problems = await check_volume(disk)
    assert not problems, (seed, problems)
    return recovered


@pytest.mark.parametrize("seed", range(1, 5))
async def test_mount_recovers_a_node_that_died_while_nobody_was_mounted(
        tmp_path, autojump_clock, seed):
    recovered, dead_slot = await run_dead_while_alone(tmp_path, seed)
    assert recovered == [dead_slot]


async def test_mutant_mount_ignores_dead_slots(tmp_path, autojump_clock, monkeypatch):
    """The mount does not look for in-use slots without a live mount: the
    dead node's committed files are missing (or the volume is damaged)."""
    async def skip(self, s, jl, windows):
        await jl.unlock()
    monkeypatch.setattr(Filesystem, "_recover_slot_held", skip)
    with pytest.raises((AssertionError, OSError)):
        await run_dead_while_alone(tmp_path, 1)


async def run_handover_then_death(tmp_path, seed: int = 1) -> None:
    """Node 1 changes a file (EX); node 0 reads it (node 1 goes EX -> PR:
    its log may keep the images); node 0 changes it (node 1 goes PR -> NL:
    its log must be retired first); node 1 dies; node 0 recovers node 1's
    slot.  Node 0's change must survive the replay of node 1's log."""
    path = make_image(tmp_path / f"handover{seed}.img", 64 << 20)
    await format_image(path, slots=2)
    with open(path, "rb") as f:
        disk = SharedDisk(f.read())
    c = Cluster(disk, seed)
    async with trio.open_nursery() as nursery:
        cut = set()
        doms = await dlm_pair(nursery, seed, cut)
        try:
            with trio.fail_after(3600):
                await c.mount(nursery, doms)
                a, b = c.fss
                fh, at = await b.create(b.root_ino, "f")
                await b.write(fh, 0, b"node 1 wrote this")
                await b.release(fh)
                await b.fsync()
                fa = await a.lookup(a.root_ino, "f")
                fh = await a.open(fa.ino)
                assert await a.read(fh, 0, 100) == b"node 1 wrote this"
                await a.release(fh)
                fh = await a.open(fa.ino, C.os.O_RDWR)
                await a.write(fh, 0, b"NODE 0 REWROTE IT, LONGER")
                await a.release(fh)
                await a.fsync()
                # and in its home block (fsync leaves home writes owed,
                # and a later one would hide a replay that undid it)
                await a.sync()
                b.dev.dead = True
                cut.add(1)
                await doms[1].fence("node died")
                a.node_dead(1)
                await doms[0].node_down(1)
                await a.recover_node(1)
                fh = await a.open(fa.ino)
                got = await a.read(fh, 0, 100)
                await a.release(fh)
                assert got == b"NODE 0 REWROTE IT, LONGER", got
                await a.unmount()
        finally:
            await cut_off(c, doms)
        nursery.cancel_scope.cancel()
    problems = await check_volume(disk)
    assert not problems, problems


async def test_handover_then_death_keeps_the_survivors_change(tmp_path, autojump_clock):
    await run_handover_then_death(tmp_path)


async def test_mutant_log_kept_past_a_handover_to_nl(tmp_path, autojump_clock, monkeypatch):
    """A node that retires its log only when it gives up EX (not when it
    gives up a PR it got by going EX -> PR) lets its recovered log undo the
    other node's change."""
    async def retire_only_from_ex(self, res, old, new):
        token = C._current_op.set(None)
        try:
            if old == C.EX and self.mounted and not self.readonly:
                await self._commit()
                await self.pay_home()
                if new == C.NL:
                    async with self._commit_lock:
                        await self._pay_home_locked()
                        await self.journal.checkpoint()
            if new == C.NL:
                self._forget(res)
        finally:
            C._current_op.reset(token)
    monkeypatch.setattr(Filesystem, "downconvert", retire_only_from_ex)
    with pytest.raises(BaseExceptionGroup) as caught:
        await run_handover_then_death(tmp_path)
    # node 1's replayed inode image undid node 0's longer write
    assert caught.group_contains(AssertionError, match="NODE 0 REWROTE IT")


# ------------------------------------------------------------ the open lock

async def run_unlink_while_open(tmp_path, seed: int, files: int = 6) -> None:
    """Node 0 unlinks files node 1 has open; node 1 keeps reading and
    writing them (and gets its bytes back) until it closes them; the
    space comes back when the last user is gone, whichever node that is."""
    path = make_image(tmp_path / f"open{seed}.img", 64 << 20)
    await format_image(path, slots=2)
    with open(path, "rb") as f:
        disk = SharedDisk(f.read())
    c = Cluster(disk, seed)
    rng = random.Random(seed)
    async with trio.open_nursery() as nursery:
        doms = await dlm_pair(nursery, seed)
        try:
            with trio.fail_after(3600):
                await c.mount(nursery, doms)
                a, b = c.fss
                d = await a.mkdir(a.root_ino, "d")
                content = {}
                for i in range(files):
                    fh, at = await a.create(d.ino, f"f{i}")
                    data = rng.randbytes(rng.choice([100, 9000, 70000]))
                    await a.write(fh, 0, data)
                    await a.release(fh)
                    content[i] = data
                db = await b.lookup(b.root_ino, "d")
                handles = {}
                for i in range(files):
                    at = await b.lookup(db.ino, f"f{i}")
                    handles[i] = (await b.open(at.ino, C.os.O_RDWR), at.ino)
                for i in range(files):
                    await a.unlink(d.ino, f"f{i}")
                # node 1 still reads and writes every one of them
                async with trio.open_nursery() as n:
                    for i in range(files):
                        async def use(i=i):
                            fh, _ = handles[i]
                            assert await b.read(fh, 0, len(content[i]) + 1) == content[i]
                            more = rng.randbytes(5000)
                            await b.write(fh, len(content[i]), more)
                            content[i] += more
                            assert await b.read(fh, 0, len(content[i]) + 1) == content[i]
                        n.start_soon(use)
                # node 0 writing meanwhile must not get those clusters
                fh, _ = await a.create(d.ino, "filler")
                await a.write(fh, 0, rng.randbytes(300000))
                await a.release(fh)
                for i in range(files):
                    fh, _ = handles[i]
                    assert await b.read(fh, 0, len(content[i]) + 1) == content[i]
                    await b.release(fh)
                await a.unlink(d.ino, "filler")
                # every unlinked file is freed now that nobody uses it (the
                # oracle below checks the bitmaps against what is referenced)
                for fs in (a, b):
                    for info in fs.sb.slots:
                        assert not await fs.readdir(info.orphan_ino), "orphans left"
                await b.unmount()
                await a.unmount()
        finally:
            await cut_off(c, doms)
        nursery.cancel_scope.cancel()
    problems = await check_volume(disk)
    assert not problems, (seed, problems)


@pytest.mark.parametrize("seed", range(1, 5))
async def test_unlinked_on_one_node_while_open_on_the_other(tmp_path, autojump_clock, seed):
    await run_unlink_while_open(tmp_path, seed)


async def test_mutant_unlink_without_the_open_lock(tmp_path, autojump_clock, monkeypatch):
    """Freeing an unlinked inode without asking the open lock: the other
    node's open file loses its data to whatever reuses the clusters."""
    class Granted:
        async def unlock(self):
            pass

    async def always(self, ino):
        return Granted()
    monkeypatch.setattr(ClusterLockManager, "open_try", always)
    caught = None
    for seed in range(1, 9):
        try:
            await run_unlink_while_open(tmp_path, seed)
        except (AssertionError, OSError) as e:
            caught = str(e)[:200]
            break
        except BaseExceptionGroup as eg:
            caught = repr(eg)[:200]
            break
    assert caught, "mutant survived"


# ------------------------------------------------------------ races on one name

async def _two_nodes(tmp_path, seed, body, size: int = 64 << 20) -> None:
    path = make_image(tmp_path / f"race{seed}.img", size)
    seed_scheduler(seed)
    await format_image(path, slots=2)
    with open(path, "rb") as f:
        disk = SharedDisk(f.read())
    c = Cluster(disk, seed)
    async with trio.open_nursery() as nursery:
        doms = await dlm_pair(nursery, seed)
        try:
            with trio.fail_after(3600):
                await c.mount(nursery, doms)
                await body(*c.fss)
                for fs in c.fss:
                    assert fs.failed is None, fs.failed
                await c.fss[0].unmount()
                await c.fss[1].unmount()
        finally:
            await cut_off(c, doms)
        nursery.cancel_scope.cancel()
    problems = await check_volume(disk)
    assert not problems, (seed, problems)


async def _both(f0, f1):
    """Run two calls at once; their outcomes (a value or the errno)."""
    out = [None, None]

    async def one(i, f):
        try:
            out[i] = ("ok", await f())
        except OSError as e:
            out[i] = ("err", e.errno)
    async with trio.open_nursery() as n:
        n.start_soon(one, 0, f0)
        n.start_soon(one, 1, f1)
    return out


@pytest.mark.parametrize("seed", range(1, 4))
async def test_same_name_created_on_both_nodes_at_once(tmp_path, autojump_clock, seed):
    """Exactly one of two concurrent creates of one name succeeds; the
    other gets EEXIST; both nodes then list the name once, and it is the
    winner's file."""
    async def body(a, b):
        d = await a.mkdir(a.root_ino, "d")
        db = (await b.lookup(b.root_ino, "d")).ino
        for i in range(40):
            name = f"x{i}"
            ra, rb = await _both(lambda: a.create(d.ino, name), lambda: b.create(db, name))
            oks = [r for r in (ra, rb) if r[0] == "ok"]
            assert len(oks) == 1, (name, ra, rb)
            assert [r for r in (ra, rb) if r[0] == "err"] == [("err", C.errno.EEXIST)]
            winner, loser = (a, b) if ra[0] == "ok" else (b, a)
            fh, attr = oks[0][1]
            await winner.write(fh, 0, f"written by {winner.node}".encode())
            await winner.release(fh)
            for fs in (a, b):
                dd = (await fs.lookup(fs.root_ino, "d")).ino
                names = [n for n, _, _ in await fs.readdir(dd)]
                assert names.count(name.encode()) == 1
                got = await fs.lookup(dd, name)
                assert got.ino == attr.ino
    await _two_nodes(tmp_path, seed, body)


@pytest.mark.parametrize("seed", range(1, 4))
async def test_crossed_directory_renames_on_both_nodes(tmp_path, autojump_clock, seed):
    """Node 0 moves p/A under B while node 1 moves p/B under A: at most
    one succeeds (the other finds its source gone or would make a cycle),
    and the tree stays a tree (the oracle walks it from the root)."""
    async def body(a, b):
        for i in range(20):
            p = await a.mkdir(a.root_ino, f"p{i}")
            await a.mkdir(p.ino, "A")
            B = await a.mkdir(p.ino, "B")
            pb = (await b.lookup(b.root_ino, f"p{i}")).ino
            Ab = (await b.lookup(pb, "A")).ino
            await b.lookup(pb, "B")          # b learns it by path
            ra, rb = await _both(lambda: a.rename(p.ino, "A", B.ino, "A"),
                                 lambda: b.rename(pb, "B", Ab, "B"))
            assert [ra[0], rb[0]].count("ok") <= 1, (ra, rb)
            assert [ra[0], rb[0]].count("ok") == 1 or all(
                r[1] in (C.errno.EINVAL, C.errno.ENOENT) for r in (ra, rb)), (ra, rb)
            # both nodes see the same shape
            shapes = []
            for fs in (a, b):
                pp = (await fs.lookup(fs.root_ino, f"p{i}")).ino
                top = sorted(n for n, _, _ in await fs.readdir(pp))
                shapes.append(top)
            assert shapes[0] == shapes[1], shapes
    await _two_nodes(tmp_path, seed, body)


async def _reuse_block(b, dir_ino: int, ino: int):
    """Node b makes empty files in ``dir_ino`` until one lands in the
    freed block ``ino`` (after b's sync, so the free is in its window):
    (its name, its attributes).  Each stays known to b's "kernel" (held),
    so its close frees nothing and locks nothing."""
    # b's next search of its window starts at the window's beginning, as
    # once it has wrapped (its refills, which give back a window's last
    # free clusters, would otherwise keep the block away for long)
    b.alloc.hint = 0
    for i in range(20):
        fh, new = await b.create(dir_ino, f"new{i}")
        b.hold(new.ino)
        await b.release(fh)
        if new.ino == ino:
            return f"new{i}", new
    pytest.fail("the freed block was never given to a new inode")


async def run_new_inode_in_a_block_the_other_node_saw_freed(tmp_path, seed: int = 1):
    """Node a looks a file of node b's up (caching its inode and lock),
    b deletes it, a asks for the stale number (and caches the tombstone
    under the inode's lock), then b makes empty files until one lands in
    the freed block -- making a new inode takes no lock on it (nobody
    else knows the number yet).  a must find the new file: by name, by
    number, in a listing."""
    async def body(a, b):
        d = await b.mkdir(b.root_ino, "d")
        fh, old = await b.create(d.ino, "old")
        await b.release(fh)
        da = (await a.lookup(a.root_ino, "d")).ino
        assert (await a.lookup(da, "old")).ino == old.ino
        await b.unlink(d.ino, "old")
        with pytest.raises(OSError) as e:
            await a.getattr(old.ino)
        assert e.value.errno == C.errno.ESTALE
        await b.sync()                      # the free reaches b's window
        name, new = await _reuse_block(b, d.ino, old.ino)
        assert (await a.lookup(da, name)).ino == old.ino
        assert (await a.getattr(old.ino)).nlink == 1
        listed = [n for n, _, _ in await a.readdir(da)]
        assert name.encode() in listed
    await _two_nodes(tmp_path, seed, body, size=16 << 20)


async def test_new_inode_in_a_block_the_other_node_saw_freed(tmp_path, autojump_clock):
    await run_new_inode_in_a_block_the_other_node_saw_freed(tmp_path)


async def test_mutant_tombstone_trusted(tmp_path, autojump_clock, monkeypatch):
    """A cache that trusts a cached tombstone fails the test above."""
    from replfs.fs import cache as cache_mod
    real = cache_mod.MetaCache.get

    async def trusting(self, blkno, kind, owner=None):
        obj = self.objs.get(blkno)
        if kind == "inode" and isinstance(obj, cache_mod.F.Inode):
            return obj
        return await real(self, blkno, kind, owner)
    monkeypatch.setattr(cache_mod.MetaCache, "get", trusting)
    with pytest.raises(BaseException) as e:
        await run_new_inode_in_a_block_the_other_node_saw_freed(tmp_path)

    def leaves(x):
        return [y for s in x.exceptions for y in leaves(s)] \
            if isinstance(x, BaseExceptionGroup) else [x]
    assert any(isinstance(x, OSError) and x.errno == C.errno.ESTALE
               for x in leaves(e.value)), e.value


async def run_lookup_then_reuse_before_the_pin(tmp_path, seed: int = 1):
    """The FUSE lookup's window: node a looks a file up (its locks go back
    to the cache), and before a pins the inode's open lock for its
    kernel, b deletes the file and makes a new one in its block.  The pin
    must see that the inode is not the one looked up (ESTALE), not hand
    a's kernel the new file under the old name; a pin of the new file
    (its own generation) is fine."""
    async def body(a, b):
        d = await b.mkdir(b.root_ino, "d")
        fh, old = await b.create(d.ino, "old")
        await b.release(fh)
        da = (await a.lookup(a.root_ino, "d")).ino
        found = await a.lookup(da, "old")
        assert found.ino == old.ino
        await b.unlink(d.ino, "old")        # nobody pins it: b frees it
        await b.sync()
        name, new = await _reuse_block(b, d.ino, old.ino)
        assert new.generation != found.generation
        a.hold(found.ino)                   # the kernel reference of the lookup
        with pytest.raises(OSError) as e:
            await a.pin_open(found.ino, found.generation)
        assert e.value.errno == C.errno.ESTALE
        await a.unhold(found.ino)           # the reply is not sent: its reference goes
        assert not a.locks.pinned(found.ino)
        again = await a.lookup(da, name)
        a.hold(again.ino)
        await a.pin_open(again.ino, again.generation)
        assert a.locks.pinned(again.ino)
        await a.unhold(again.ino)
    await _two_nodes(tmp_path, seed, body, size=16 << 20)


async def test_lookup_then_reuse_before_the_pin(tmp_path, autojump_clock):
    await run_lookup_then_reuse_before_the_pin(tmp_path)


async def test_mutant_pin_without_generation_check(tmp_path, autojump_clock, monkeypatch):
    """A pin that does not check the generation fails the test above."""
    real = Filesystem.pin_open

    async def unchecked(self, ino, generation=None):
        await real(self, ino)
    monkeypatch.setattr(Filesystem, "pin_open", unchecked)
    with pytest.raises(BaseException) as e:
        await run_lookup_then_reuse_before_the_pin(tmp_path)
    assert "DID NOT RAISE" in str(e.value) or any(
        "DID NOT RAISE" in str(x) for x in getattr(e.value, "exceptions", ())), e.value


async def run_two_lookups_racing_a_reuse(tmp_path, seed: int = 1):
    """Two FUSE lookups of one name on node a read the inode before either
    has pinned its open lock (the first one's pin is held up); meanwhile b
    deletes the file and makes a new one in its block.  Neither lookup may
    hand the kernel the old name with the reused number: both ask again
    and find nothing."""
    from replfs.fs.fuseops import SharedReplfsOperations
    from replfs.fuse import FUSEError

    async def body(a, b):
        ops = SharedReplfsOperations(a, shared=True)
        d = await b.mkdir(b.root_ino, "d")
        fh, old = await b.create(d.ino, "old")
        await b.release(fh)
        da = (await a.lookup(a.root_ino, "d")).ino
        real_pin = a.locks.open_pin
        gate, pinning = trio.Event(), []

        async def held_pin(ino):
            pinning.append(ino)
            await gate.wait()
            await real_pin(ino)
        a.locks.open_pin = held_pin
        out = {}

        async def look(i):
            try:
                out[i] = await ops.lookup(da, b"old")
            except FUSEError as e:
                out[i] = e.errno
        async with trio.open_nursery() as n:
            n.start_soon(look, 0)
            while not pinning:
                await trio.sleep(0.01)
            n.start_soon(look, 1)
            while ops.lookup_counts.get(old.ino, 0) < 2:
                await trio.sleep(0.01)
            await trio.sleep(0.1)           # (an unchecked reply goes out now)
            await b.unlink(d.ino, "old")
            await b.sync()
            await _reuse_block(b, d.ino, old.ino)
            gate.set()
        a.locks.open_pin = real_pin
        assert out == {0: C.errno.ENOENT, 1: C.errno.ENOENT}, out
        assert ops.lookup_counts.get(old.ino, 0) == 0
    await _two_nodes(tmp_path, seed, body, size=16 << 20)


async def test_two_lookups_racing_a_reuse(tmp_path, autojump_clock):
    await run_two_lookups_racing_a_reuse(tmp_path)


async def test_mutant_only_the_pinning_lookup_checks(tmp_path, autojump_clock, monkeypatch):
    """Checking the generation only in the lookup that pins fails the test
    above (the second lookup's reply carries the reused number)."""
    from replfs.fs import fuseops as ops_mod
    real = ops_mod.ReplfsOperations._looked_up

    async def first_only(self, e):
        if self.lookup_counts.get(e.st_ino, 0) == 0:
            return await real(self, e)
        self.lookup_counts[e.st_ino] += 1
        return e
    monkeypatch.setattr(ops_mod.ReplfsOperations, "_looked_up", first_only)
    with pytest.raises(BaseException) as caught:
        await run_two_lookups_racing_a_reuse(tmp_path)
    # (the second lookup answered with an entry: the reused inode)
    assert "EntryAttributes(ino=" in repr(caught.value), caught.value


async def run_owed_home_writes_reach_the_other_node(tmp_path, seed: int = 1):
    """A commit leaves its home writes owed (the journal holds them; they
    go out with the next commit).  The other node reads homes: every lock
    this node gives up from EX must have paid them first -- a directory
    entry, an inode, file data sizes, a rename -- whichever node asks."""
    async def body(a, b):
        d = await a.mkdir(a.root_ino, "d")
        fh, f = await a.create(d.ino, "f")
        await a.write(fh, 0, b"payload" * 100)
        await a.release(fh)
        await a.fsync()
        assert a._owed, "the commit left no home writes owed"
        db = (await b.lookup(b.root_ino, "d")).ino
        fb = await b.lookup(db, "f")
        assert fb.size == 700
        fh, _ = await b.create(db, "g")
        await b.release(fh)
        await b.rename(db, "f", db, "h")
        await b.fsync()
        names = sorted(n for n, _, _ in await a.readdir(d.ino))
        assert names == [b"g", b"h"], names
        fh = await a.open((await a.lookup(d.ino, "h")).ino)
        assert await a.read(fh, 0, 700) == b"payload" * 100
        await a.release(fh)
    await _two_nodes(tmp_path, seed, body, size=16 << 20)


async def test_owed_home_writes_reach_the_other_node(tmp_path, autojump_clock):
    await run_owed_home_writes_reach_the_other_node(tmp_path)


async def test_mutant_hand_over_without_paying_home(tmp_path, autojump_clock, monkeypatch):
    """Giving a lock up without writing the owed homes first fails the
    test above (the other node reads the old blocks)."""
    async def unpaid(self):
        pass

    async def unpaid_locked(self):
        pass
    monkeypatch.setattr(Filesystem, "pay_home", unpaid)
    monkeypatch.setattr(Filesystem, "_pay_home_locked", unpaid_locked)
    with pytest.raises(BaseException):
        await run_owed_home_writes_reach_the_other_node(tmp_path)


async def run_dead_node_comes_back(tmp_path, seed: int = 1) -> None:
    """Node 0 holds the global bitmap's lock (cached EX) when node 1 dies;
    it recovers node 1's slot (the replay, then node 1's window back to
    the global bitmap under that lock).  Node 1 comes back, mounts the
    slot again and takes a new window from the global bitmap, writing a
    file into it.  Node 0 then deletes that file: its clusters go back to
    the global bitmap, which node 0 must read afresh under the lock.
    (The netns fault runs' seeds 1005 and 1028: "cluster N already free in
    the global bitmap" on the survivor, after its slot recovery had left
    the group descriptors in its cache without their lock as owner.)"""
    path = make_image(tmp_path / f"back{seed}.img", 64 << 20)
    await format_image(path, slots=2)
    with open(path, "rb") as f:
        disk = SharedDisk(f.read())
    c = Cluster(disk, seed)
    async with trio.open_nursery() as nursery:
        cut = set()
        doms = await dlm_pair(nursery, seed, cut)
        try:
            with trio.fail_after(3600):
                await c.mount(nursery, doms)
                a, b = c.fss
                d = await a.mkdir(a.root_ino, "d")
                # node 1 writes (it takes a window from the global bitmap)
                await b.lookup(b.root_ino, "d")
                fh, _ = await b.create(d.ino, "b0")
                await b.write(fh, 0, b"y" * 9000)
                await b.release(fh)
                await b.fsync()
                # node 0 frees clusters: it takes the bitmap's lock EX and
                # keeps it cached
                fh, _ = await a.create(d.ino, "gone")
                await a.write(fh, 0, b"x" * 20000)
                await a.release(fh)
                await a.unlink(d.ino, "gone")
                await a.fsync()
                assert a.locks.cached_ex(("bitmap", 0))
                # node 1 changes more (its journal is dirty), then dies
                fh, _ = await b.create(d.ino, "b00")
                await b.write(fh, 0, b"w" * 5000)
                await b.release(fh)
                await b.fsync()
                assert a.locks.cached_ex(("bitmap", 0))
                b.dev.dead = True
                cut.add(1)
                await doms[1].fence("node died")
                a.node_dead(1)
                await doms[0].node_down(1)
                assert await a.recover_node(1) == [1]
                # node 1 comes back: a new lock domain, a new mount
                await doms[0].node_up(1)
                dom1 = DlmDomain(DOMAIN, 1, [0, 1], doms[1]._send, epoch=doms[0].core.epoch)
                await nursery.start(dom1.run)
                doms[1] = dom1
                cut.discard(1)
                await dom1._apply(dom1.core.join())
                locks = ClusterLockManager(InProcessDlm({DOMAIN: dom1}, nursery), DOMAIN,
                                           nursery)
                b2 = await Filesystem.mount(JitterDevice(disk, seed * 10 + 5), None,
                                            locks=locks, node=1, recover_dirty_slots=False)
                c.fss.append(b2)
                assert b2.slot == 1
                dd = await b2.lookup(b2.root_ino, "d")
                fh, _ = await b2.create(dd.ino, "b1")
                await b2.write(fh, 0, b"z" * 30000)     # from a new window of slot 1
                await b2.release(fh)
                await b2.fsync()
                # node 0 deletes it: the clusters go back to the global bitmap
                await a.unlink(d.ino, "b1")
                await a.fsync()
                assert a.failed is None, a.failed
                # node 1 writes again and dies again: node 0 recovers the
                # slot a second time, and gives the new window back
                fh, _ = await b2.create(dd.ino, "b2")
                await b2.write(fh, 0, b"v" * 5000)
                await b2.release(fh)
                await b2.fsync()
                b2.dev.dead = True
                cut.add(1)
                await dom1.fence("node died again")
                a.node_dead(1)
                await doms[0].node_down(1)
                assert await a.recover_node(1) == [1]
                assert a.failed is None, a.failed
                for name, data in [("b0", b"y" * 9000), ("b00", b"w" * 5000),
                                   ("b2", b"v" * 5000)]:
                    f = await a.lookup(d.ino, name)
                    fh = await a.open(f.ino)
                    assert await a.read(fh, 0, 10000) == data, name
                    await a.release(fh)
                await a.unmount()
                assert a.failed is None, a.failed
        finally:
            await cut_off(c, doms)
        nursery.cancel_scope.cancel()
    problems = await check_volume(disk)
    assert not problems, problems


async def test_dead_node_comes_back_after_recovery(tmp_path, autojump_clock):
    await run_dead_node_comes_back(tmp_path)
