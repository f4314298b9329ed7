"""The simulation must be able to fail: each mutant below breaks one rule
of the core, and the normal seeds must catch it."""
import pytest

from dlm_sim_harness import InvariantError, Sim
from replfs.locking.dlm import core, lockres
from replfs.locking.dlm.lockres import Granted, LockResource


def mutant_everything_compatible(mp):
    mp.setattr(lockres, "compatible", lambda held, wanted: True)


def mutant_unlock_forgets_to_tell_owner(mp):
    orig = LockResource.unlock
    mp.setattr(LockResource, "unlock",
               lambda self, *a: [r for r in orig(self, *a) if not isinstance(r, Granted)])


def mutant_lvb_never_written(mp):
    mp.setattr(LockResource, "write_lvb", lambda self, lock, lvb, seq: None)


def mutant_recovery_trusts_every_lvb(mp):
    orig = core.DlmNode._settle_lvb

    def settle(self, res, rb, trust_lvb):
        orig(self, res, rb, trust_lvb)
        res.lvb_valid = True
    mp.setattr(core.DlmNode, "_settle_lvb", settle)


def mutant_pending_requests_not_reported(mp):
    orig = core.DlmNode._to_master

    def to_master(self, resource, msg):
        if isinstance(msg, core.LockReport) and msg.granted is None:
            return
        orig(self, resource, msg)
    mp.setattr(core.DlmNode, "_to_master", to_master)


def mutant_stale_messages_accepted(mp):
    orig = core.DlmNode.receive

    def receive(self, src, msg):
        if msg.epoch < self.epoch and src in self.members:
            self._dispatch(src, msg)
            return self._flush()
        return orig(self, src, msg)
    mp.setattr(core.DlmNode, "receive", receive)


MUTANTS = [mutant_everything_compatible, mutant_unlock_forgets_to_tell_owner,
           mutant_lvb_never_written, mutant_recovery_trusts_every_lvb,
           mutant_pending_requests_not_reported, mutant_stale_messages_accepted]


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda f: f.__name__[len("mutant_"):])
def test_simulation_catches(mutant, monkeypatch):
    mutant(monkeypatch)
    with pytest.raises(InvariantError) as info:
        for seed in range(200):
            Sim(seed, n_nodes=2 + seed % 3, steps=300).run()
    print(str(info.value).splitlines()[0])
