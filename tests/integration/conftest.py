"""Fixtures: two real replfsd daemons on 127.0.0.1 and 127.0.0.2 (see
replfs/localpair.py), torn down after each test."""
import pytest

from replfs.localpair import LocalPair, read_data  # noqa: F401  (re-exported for tests)


@pytest.fixture
def cluster(tmp_path):
    c = LocalPair(tmp_path)
    yield c
    c.teardown()
