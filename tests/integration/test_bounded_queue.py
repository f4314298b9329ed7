"""A peer that stops reading (SIGSTOP) does not make the Primary's memory
grow: under protocol A the writers wait once max-buffers of data wait to
be sent, or with on-congestion pull-ahead the Primary goes Ahead; after
SIGCONT everything arrives and the disks are identical."""
from __future__ import annotations

import hashlib
import os
import signal
import threading
import time

import pytest

from replfs.ipc.client import SyncClient, socket_path
from replfs.localpair import LocalPair, read_data

MIB = 1024 * 1024
WRITES = 64


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("policy", ["block", "pull-ahead"])
def test_a_stalled_peer_does_not_grow_the_primarys_memory(tmp_path, policy):
    # The kernel's socket buffers sized here: autotuned, the receiver's can
    # grow to tcp_rmem's maximum (32 MiB on this host) while the initial
    # resync streams, and a stopped peer's then holds that much.
    net = ("\n\t\tmax-buffers 256;\n\t\tping-timeout 150;\n\t\ttimeout 140;"
           "\n\t\tsndbuf-size 1M;\n\t\trcvbuf-size 1M;")
    if policy == "pull-ahead":
        net += "\n\t\ton-congestion pull-ahead;\n\t\tcongestion-fill 512k;"
    pair = LocalPair(tmp_path, protocol="A", size=WRITES * MIB + 8 * MIB, extra_net=net)
    a, b = pair.alpha, pair.beta
    stopped = False
    try:
        pair.up_fresh()
        base = rss_mib(a.proc.pid)
        os.kill(b.proc.pid, signal.SIGSTOP)
        stopped = True
        done: list[int] = []
        errors: list[BaseException] = []

        def writer():
            try:
                with SyncClient(socket_path(a.rundir), timeout=120) as c:
                    for i in range(WRITES):
                        c.call("write", bytes([i + 1]) * MIB, res="r0", off=i * MIB)
                        done.append(i)
            except BaseException as e:      # noqa: BLE001 -- reported below
                errors.append(e)

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        if policy == "block":
            time.sleep(3)
            # max-buffers (1 MiB) plus what the kernel's socket buffers hold
            # (1 MiB each way, which the kernel doubles)
            assert len(done) < WRITES // 2, f"{len(done)} MiB accepted for a stopped peer"
        else:
            t.join(30)
            assert len(done) == WRITES and not errors, (len(done), errors)
            assert a.status()["cstate"] == "Ahead"
        grew = rss_mib(a.proc.pid) - base
        assert grew < 32, f"replfsd grew {grew:.0f} MiB while its peer was stopped"

        os.kill(b.proc.pid, signal.SIGCONT)
        stopped = False
        t.join(60)
        assert len(done) == WRITES and not errors, (len(done), errors)
        pair.wait_synced(timeout=90)
        size = a.status()["size"]
        assert hashlib.md5(read_data(a.disk, size)).digest() == \
            hashlib.md5(read_data(b.disk, size)).digest()
    finally:
        if stopped:
            os.kill(b.proc.pid, signal.SIGCONT)
        pair.teardown()
