"""Random runs of the dlm-lite simulation (dlm_sim_harness.Sim): seeded
clusters of 2-5 nodes with lock traffic, crashes and rejoins, invariants
checked after every step.  REPLFS_SIM_SEEDS sets how many seeds the
default run takes; the soak variants take sizes from tests/soak.py."""
import os

import pytest

from dlm_sim_harness import Sim
from tests import soak

SEEDS = int(os.environ.get("REPLFS_SIM_SEEDS", "200"))


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_cluster(seed):
    n = 2 + seed % 3
    Sim(seed, n_nodes=n, steps=300).run()


@pytest.mark.soak(twin="test_random_cluster")
@pytest.mark.parametrize("seed", soak.seeds(range(1000, 3000)))
def test_random_cluster_soak(seed):
    Sim(seed, n_nodes=2 + seed % 4, n_resources=2 + seed % 3, steps=soak.size(2000, 300),
        crash_rate=0.002, max_crashes=4).run()


@pytest.mark.parametrize("seed", range(10_000, 10_050))
def test_crash_heavy_cluster(seed):
    # Frequent crashes and rejoins, so recoveries overlap and get cut short.
    Sim(seed, n_nodes=2 + seed % 3, steps=300, crash_rate=0.03, max_crashes=8).run()


@pytest.mark.soak(twin="test_crash_heavy_cluster")
@pytest.mark.parametrize("seed", soak.seeds(range(20_000, 21_000)))
def test_crash_heavy_cluster_soak(seed):
    Sim(seed, n_nodes=2 + seed % 4, steps=soak.size(1500, 300), crash_rate=0.02,
        max_crashes=12).run()
