"""Fixtures of the decoder fuzzers (see fuzzlib.py)."""
import pytest

from tests import soak


@pytest.fixture
def report(capsys):
    """Print a line past pytest's capture (the soak fuzzers' inputs/s under
    make soak; nothing in smoke mode, where the counts are tiny)."""
    def write(line: str) -> None:
        if soak.smoke():
            return
        with capsys.disabled():
            print(f"\n{line}", flush=True)
    return write
