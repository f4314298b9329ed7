import os

import pytest

from dlm_sim_harness import Sim

SEEDS = int(os.environ.get("REPLFS_SIM_SEEDS", "200"))


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_cluster(seed):
    n = 2 + seed % 3
    Sim(seed, n_nodes=n, steps=300).run()


@pytest.mark.soak
@pytest.mark.parametrize("seed", range(1000, 3000))
def test_random_cluster_soak(seed):
    Sim(seed, n_nodes=2 + seed % 4, n_resources=2 + seed % 3, steps=2000,
        crash_rate=0.002, max_crashes=4).run()
