"""Fuzzing the DLM core with message *sequences* (locking/dlm/core.py).

The byte decoders are fuzzed elsewhere; the bugs that take a cluster down
are in what a node does with a stream of well-formed messages that make
no sense together: grants for locks never asked for, unlocks of locks
never granted, answers from an old or a future epoch, recovery reports
out of turn, interleaved with this node's own calls and membership
changes.  A seeded run feeds node 0 of a two-node cluster such a stream
"from node 1" and checks after every step:

* the core raises nothing but LocalProtocolError for a local call it
  refuses (never a KeyError or AssertionError: those would take the
  daemon's lock service down);
* while node 1 sends only requests and answers (no recovery reports), the
  resources node 0 masters never hold two incompatible grants -- however
  wrong node 1's messages are;
* what it keeps for later (messages of a future epoch) stays bounded by
  what arrived.

Recovery reports are trusted by design (a survivor's report of what it
holds is the authority after its master died), so with them in the
stream only the first rule is checked.
"""
from __future__ import annotations

import random
import traceback

import pytest

from replfs.locking.dlm import core as C
from replfs.locking.dlm import messages as M
from replfs.locking.dlm.modes import Mode, compatible
from tests import soak

MODES = list(Mode)
NAMES = ["a", "b", "c", "d"]
REQUESTS_AND_ANSWERS = tuple(range(7))
EVERYTHING = tuple(range(10))


def _message(rng: random.Random, epoch: int, kinds) -> M.Message:
    e = max(0, epoch + rng.choice((0, 0, 0, 0, 1, -1)))
    name, lockid, mode = rng.choice(NAMES), rng.randrange(1, 6), rng.choice(MODES)
    lvb = rng.randbytes(M.LVB_LEN) if rng.random() < 0.5 else bytes(M.LVB_LEN)
    seq = rng.randrange(5)
    k = rng.choice(kinds)
    if k == 0:
        return M.LockRequest(e, name, lockid, mode, rng.choice((0, M.FLAG_NOQUEUE)))
    if k == 1:
        return M.ConvertRequest(e, name, lockid, mode, rng.choice((0, M.FLAG_NOQUEUE)),
                                rng.choice((None, lvb)), seq)
    if k == 2:
        return M.UnlockRequest(e, name, lockid, rng.choice((None, lvb)), seq)
    if k == 3:
        return M.CancelRequest(e, name, lockid)
    if k == 4:
        return M.GrantMsg(e, name, lockid, mode, lvb, seq, rng.random() < 0.5)
    if k == 5:
        return M.BastMsg(e, name, lockid, mode)
    if k == 6:
        return M.RefuseMsg(e, name, lockid, rng.randrange(1, 5))
    if k == 7:
        return M.LockReport(e, name, lockid, rng.choice([None, *MODES]),
                            rng.choice([None, *MODES]), 0, lvb, seq, rng.random() < 0.5)
    if k == 8:
        return M.LvbReport(e, name, lvb, seq, rng.random() < 0.5, rng.random() < 0.5)
    return M.RecoveryDone(e, rng.random() < 0.8)


def _incompatible(node: C.DlmNode) -> str | None:
    for res in node.mastered.values():
        g = res.granted
        for i, x in enumerate(g):
            for y in g[i + 1:]:
                if not compatible(x.granted, y.granted):
                    return f"incompatible grants on {res.name}: {x.granted.name} and {y.granted.name}"
    return None


def run(seed: int, steps: int, kinds) -> str | None:
    """One seeded stream; None, or what went wrong and where."""
    rng = random.Random(seed)
    node = C.DlmNode(0, [0, 1])
    lockid = 100
    received = 0
    for step in range(steps):
        r = rng.random()
        try:
            if r < 0.6:
                received += 1
                node.receive(1, _message(rng, node.epoch, kinds))
            elif r < 0.75:
                lockid += 1
                node.lock(lockid, rng.choice(NAMES), rng.choice(MODES),
                          noqueue=rng.random() < 0.3)
            elif r < 0.85 and node.locks:
                victim = rng.choice(sorted(node.locks))
                if rng.random() < 0.5:
                    node.unlock(victim)
                elif rng.random() < 0.5:
                    node.cancel(victim)
                else:
                    node.convert(victim, rng.choice(MODES))
            elif r < 0.9:
                node.node_down(1) if 1 in node.members else node.node_up(1)
            else:
                node.tick(float(step))
        except M.LocalProtocolError:
            pass
        except Exception as e:      # noqa: BLE001 -- the finding
            return (f"seed {seed} step {step}: {type(e).__name__}: {e}\n"
                    + traceback.format_exc())
        if kinds == REQUESTS_AND_ANSWERS:
            bad = _incompatible(node)
            if bad:
                return f"seed {seed} step {step}: {bad}"
        if len(node._future) > received:
            return f"seed {seed} step {step}: {len(node._future)} future messages kept"
    return None


@pytest.mark.parametrize("kinds", [REQUESTS_AND_ANSWERS, EVERYTHING],
                         ids=["requests-and-answers", "with-recovery-reports"])
def test_dlm_message_sequences(kinds):
    failures = [f for f in (run(seed, 300, kinds) for seed in range(150)) if f]
    assert not failures, f"{len(failures)} of 150 streams failed; first:\n{failures[0]}"


@pytest.mark.soak
@pytest.mark.parametrize("kinds", [REQUESTS_AND_ANSWERS, EVERYTHING],
                         ids=["requests-and-answers", "with-recovery-reports"])
def test_dlm_message_sequences_soak(kinds, report):
    n = soak.size(20000, 200)
    failures = [f for f in (run(seed, 400, kinds) for seed in range(10_000, 10_000 + n)) if f]
    what = "all kinds" if kinds == EVERYTHING else "requests and answers"
    report(f"DLM message sequences ({what}): {n} streams of 400 steps, "
           f"{len(failures)} failed")
    assert not failures, failures[0]
