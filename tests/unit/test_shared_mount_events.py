"""replfsd's tie between a shared mount and the cluster stack
(replfs/daemon/mounts.py ``_SharedMount``), with stand-ins for the
filesystem and the cluster: what each cluster event does to the mount,
and what a failed filesystem does to the node."""
from __future__ import annotations

import trio

from replfs.daemon.mounts import _SharedMount


class FakeDom:
    name = "vol"


class FakeDev:
    def __init__(self):
        self.fenced = None

    def fence(self, why):
        self.fenced = why


class FakeFs:
    def __init__(self):
        self.dead, self.recovered, self.failed, self.on_fail = [], [], None, None

    def node_dead(self, n):
        self.dead.append(n)

    async def recover_node(self, n):
        self.recovered.append(n)
        return [1]

    def _fail(self, why):
        if self.failed is None:
            self.failed = why
            if self.on_fail:
                self.on_fail(why)


class FakeOps:
    def __init__(self):
        self.lost = None

    def device_lost(self, why):
        self.lost = why


class FakeCluster:
    def __init__(self):
        self.fenced = []

    async def fence_self(self, why):
        self.fenced.append(why)


async def test_events_before_and_after_the_mount_is_up(nursery):
    dev = FakeDev()
    m = _SharedMount("/mnt", FakeDom(), 0, dev, nursery, cluster=FakeCluster())
    m.event("node-dead", 1)             # while mounting: kept
    fs, ops = FakeFs(), FakeOps()
    m.mounted(fs, ops, None)
    assert fs.dead == [1]
    m.event("node-down", 1)
    await trio.sleep(0.1)
    assert fs.recovered == [1]


async def test_fence_stops_the_mount(nursery):
    dev, cluster = FakeDev(), FakeCluster()
    m = _SharedMount("/mnt", FakeDom(), 0, dev, nursery, cluster=cluster)
    fs, ops = FakeFs(), FakeOps()
    m.mounted(fs, ops, None)
    m.event("fenced", "quorum lost")
    assert dev.fenced == "quorum lost" and "quorum lost" in fs.failed and ops.lost
    await trio.sleep(0.1)
    assert cluster.fenced == []          # a fence does not fence again


async def test_failed_filesystem_fences_the_node(nursery):
    dev, cluster = FakeDev(), FakeCluster()
    m = _SharedMount("/mnt", FakeDom(), 0, dev, nursery, cluster=cluster)
    fs, ops = FakeFs(), FakeOps()
    m.mounted(fs, ops, None)
    fs._fail("journal write failed: EIO")
    await trio.sleep(0.1)
    assert len(cluster.fenced) == 1 and "journal write failed" in cluster.fenced[0]


async def test_pri_lost_after_split_brain_stops_the_mount_and_fences_the_node(nursery):
    dev, cluster = FakeDev(), FakeCluster()
    m = _SharedMount("/mnt", FakeDom(), 0, dev, nursery, cluster=cluster)
    fs, ops = FakeFs(), FakeOps()
    m.mounted(fs, ops, None)
    m.pri_lost("split brain: this Primary's data is discarded")
    assert dev.fenced and "split brain" in fs.failed and ops.lost
    await trio.sleep(0.1)
    assert len(cluster.fenced) == 1 and "split brain" in cluster.fenced[0]
    m.pri_lost("again")                  # once is enough
    await trio.sleep(0.1)
    assert len(cluster.fenced) == 1


def test_pri_lost_hook_stops_only_the_mounts_of_that_resource():
    from replfs.daemon.mounts import MountService
    svc = MountService()
    stopped = []
    svc._stoppers = {"/m0": ("r0", lambda why: stopped.append(("/m0", why))),
                     "/m1": ("r1", lambda why: stopped.append(("/m1", why)))}
    svc._pri_lost("r0", "lost")
    assert stopped == [("/m0", "lost")]
