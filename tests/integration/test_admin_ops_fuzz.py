"""The admin interface under hostile use: an unprivileged local user cannot
reach replfsd's socket, and random orders of replfsadm verbs on both
nodes of a pair never crash a daemon or print a traceback.

A seeded run issues verbs in an order no admin would (detach a Primary,
invalidate while disconnected, resize mid-resync, outdate, new UUIDs...),
each through the real replfsadm, and checks after every one: an exit
code from drbdadm's classes, no Python traceback on either stream, both
daemons still answering.  At the end the daemons' logs hold no traceback.
Soak: more seeds, longer."""
from __future__ import annotations

import errno
import os
import random
import socket
import subprocess

import pytest

from replfs.ipc.client import socket_path
from replfs.localpair import LocalPair
from tests import soak

VERBS = ["up", "down", "attach", "detach", "connect", "disconnect", "primary", "secondary",
         "primary --force", "invalidate", "invalidate-remote", "outdate", "new-current-uuid",
         "verify", "pause-sync", "resume-sync", "adjust", "resize", "resume-io", "role",
         "cstate", "dstate", "status", "connect --discard-my-data", "wait-connect -t 1",
         "wait-sync -t 1", "dump", "show-gi", "get-gi"]
# drbdadm's exit-code classes (replfsadm(8)): ok, usage, syntax, timed
# out, config, state change, no local disk, no UpToDate disk, exec
EXIT_CODES = {0, 1, 2, 5, 10, 11, 16, 17, 20}


def test_an_unprivileged_user_cannot_reach_the_admin_socket(tmp_path):
    pair = LocalPair(tmp_path)
    try:
        pair.alpha.adm("create-md", "r0")
        pair.alpha.start()
        path = socket_path(pair.alpha.rundir)
        os.chmod(str(tmp_path), 0o755)       # (so only replfsd's own modes stand in the way)
        os.chmod(pair.alpha.root, 0o755)
        probe = ("import socket, sys\n"
                 "s = socket.socket(socket.AF_UNIX)\n"
                 "try:\n"
                 f"    s.connect({path!r})\n"
                 "except OSError as e:\n"
                 "    print(e.errno); sys.exit(0)\n"
                 "print('connected')\n")
        cp = subprocess.run(["python3", "-c", probe], capture_output=True, text=True,
                            timeout=30, user=65534, group=65534)
        assert cp.stdout.strip() in (str(errno.EACCES), str(errno.EPERM)), cp
        # root still can
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
    finally:
        pair.teardown()


def run(tmp_path, seed: int, n_ops: int) -> None:
    rng = random.Random(seed)
    pair = LocalPair(tmp_path)
    done: list[str] = []
    try:
        pair.up_fresh()
        for _ in range(n_ops):
            node = rng.choice(pair.nodes)
            verb = rng.choice(VERBS)
            words = verb.split()
            cp = node.adm(*words[1:], words[0], "r0", check=False, timeout=90) \
                if len(words) > 1 else node.adm(verb, "r0", check=False, timeout=90)
            done.append(f"{node.name}: replfsadm {verb} r0 -> {cp.returncode}")
            out = cp.stdout + cp.stderr
            assert "Traceback" not in out, "\n".join(done) + "\n" + out
            assert cp.returncode in EXIT_CODES, "\n".join(done) + "\n" + out
            for n in pair.nodes:
                assert n.proc.poll() is None, f"{n.name}'s replfsd died:\n" + \
                    "\n".join(done) + "\n" + n.log()[-4000:]
                with n.client() as c:       # still answering
                    c.call("ping")
        for n in pair.nodes:
            assert "Traceback" not in n.log(), "\n".join(done) + "\n" + n.log()[-6000:]
    finally:
        pair.teardown()


@pytest.mark.parametrize("seed", [1])
def test_random_admin_verb_orders(tmp_path, seed):
    run(tmp_path, seed, 30)


@pytest.mark.soak(twin="test_random_admin_verb_orders")
@pytest.mark.parametrize("seed", soak.seeds(range(100, 130)))
def test_random_admin_verb_orders_soak(tmp_path, seed):
    run(tmp_path, seed, soak.size(150, 20))
