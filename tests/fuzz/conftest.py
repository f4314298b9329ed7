"""Fixtures of the decoder fuzzers (see fuzzlib.py)."""
import pytest


@pytest.fixture
def report(capsys):
    """Print a line past pytest's capture (the soak fuzzers' inputs/s)."""
    def write(line: str) -> None:
        with capsys.disabled():
            print(f"\n{line}", flush=True)
    return write
