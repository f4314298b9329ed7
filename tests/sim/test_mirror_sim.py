"""Random runs of the mirror simulation (mirror_sim_harness.Sim): two
engines, simulated disks and network, crashes, cuts, power failures,
failovers and both-Primary runs, checked after every step and at the end.
REPLFS_MIRROR_SIM_SEEDS sets how many seeds the default run takes; the
soak run takes 10,000 (tests/soak.py sizes it down for soak-smoke)."""
import os

import pytest

from mirror_sim_harness import Sim
from tests import soak

SEEDS = int(os.environ.get("REPLFS_MIRROR_SIM_SEEDS", "300"))


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_pair(seed):
    Sim(seed).run()


@pytest.mark.parametrize("seed", range(50_000, 50_030))
def test_long_fault_heavy_pair(seed):
    # Longer runs with more faults: recoveries overlap and get cut short.
    Sim(seed, steps=1200, crash_rate=0.02, cut_rate=0.04, max_faults=12).run()


@pytest.mark.soak(twin="test_random_pair")
@pytest.mark.parametrize("seed", soak.seeds(range(100_000, 110_000)))
def test_random_pair_soak(seed):
    Sim(seed, steps=soak.size(600, 200), max_faults=6).run()


# Seeds the soak found, kept in every run at the soak's size.
# 102233: a Primary re-attached the disk that had failed under it, the
# link broke before the full resync began, and after the next handshake
# it read a block from that disk (its bitmap said nothing about it yet).
@pytest.mark.parametrize("seed", [102233])
def test_soak_findings(seed):
    Sim(seed, steps=600, max_faults=6).run()
