"""The test suite's own plumbing (tests/conftest.py): --shard splits a
selection into disjoint round-robin parts that cover it, a bad --shard
is a usage error, and the soak smoke leaves a soak test with a quick
twin to that twin only when the twin is in the run."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import soak

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def collect(*argv) -> tuple[int, list[str], str]:
    env = dict(os.environ)
    env.pop(soak.ENV, None)         # (make test runs in soak smoke mode: not inherited)
    cp = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         "--collect-only", *argv], cwd=REPO, capture_output=True, text=True,
                        timeout=120, env=env)
    ids = [line for line in cp.stdout.splitlines() if "::" in line]
    return cp.returncode, ids, cp.stdout + cp.stderr


def test_shards_are_disjoint_and_cover_the_selection():
    target = "tests/unit/test_splitbrain.py"
    rc, whole, out = collect(target)
    assert rc == 0 and len(whole) > 10, out
    parts = []
    for k in (1, 2, 3):
        rc, ids, out = collect(target, "--shard", f"{k}/3")
        assert rc == 0, out
        parts.append(ids)
    assert sorted(sum(parts, [])) == sorted(whole)
    assert sum(len(p) for p in parts) == len(whole)
    # round robin: sizes differ by at most one
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts[0][:2] == [whole[0], whole[3]]


@pytest.mark.parametrize("spec", ["3/2", "1-2"])
def test_a_bad_shard_is_a_usage_error(spec):
    rc, _, out = collect("tests/unit/test_splitbrain.py", "--shard", spec)
    assert rc == 4 and "expected K/N" in out and "Traceback" not in out, out


def test_soak_smoke_leaves_a_twinned_soak_test_to_its_twin():
    target = "tests/integration/test_random_faults.py"
    # make test: the twin runs, so the soak test's smoke does not
    _, ids, out = collect(target, "-m", "soak or not soak", "--soak-smoke")
    names = {i.split("::")[1].partition("[")[0] for i in ids}
    assert "test_random_faults" in names and "test_random_faults_soak" not in names, out
    # make soak-smoke: only soak tests are selected, so it runs once
    _, ids, out = collect(target, "-m", "soak", "--soak-smoke")
    assert [i.split("::")[1] for i in ids] == ["test_random_faults_soak[100]"], out
    # make soak: every seed
    _, ids, out = collect(target, "-m", "soak", "-o", "addopts=")
    assert len(ids) == 60, out
