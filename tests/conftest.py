"""Suite-wide test plumbing: the soak smoke mode and the leak check.

Soak smoke (``--soak-smoke`` or REPLFS_SOAK_SMOKE=1; ``make soak-smoke``,
and part of ``make test``): every ``@pytest.mark.soak`` test runs once at
its smallest size -- tests/soak.py gives the sizes, and here only the
first parameter set of each soak test is kept; a soak test with a quick
twin in the run (``@pytest.mark.soak(twin="test_x")``) is left to it.

Leak check: nothing a test starts may outlive it.  After each test, FUSE
mounts and processes of this run that appeared during the test (replfsd,
replfs mount processes, device-file helpers, anything else started with
the run's environment; see tests/harness/leaks.py) and are still there
after a grace period are reported as an error of that test -- unless the
test already failed -- and taken down, so one leak does not break the
tests after it.  At the end of the session, anything of this run still
there is reported and taken down too, and any leak fails the run
(exit status 1) with a list of what leaked where.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import secrets
import tempfile
import threading

import pytest

from tests import soak
from tests.harness import leaks

_watch: leaks.LeakWatch | None = None
_tmpdir = ""
_found: list[tuple[str, list[str], list[str]]] = []   # (where, what leaked, not removable)


def pytest_addoption(parser):
    parser.addoption("--soak-smoke", action="store_true", default=False,
                     help="run soak tests once each at their smallest size (with -m soak)")
    parser.addoption("--no-leak-check", action="store_true", default=False,
                     help="do not check for mounts and processes left behind by tests")
    parser.addoption("--shard", default="", metavar="K/N",
                     help="run only the K-th of N round-robin shards of the selected "
                          "tests (K from 1); make soak SHARDS=N runs N at once")


def pytest_configure(config):
    if config.getoption("--soak-smoke"):
        # Test modules read it when they are imported (during collection).
        os.environ[soak.ENV] = "1"
    # Every process a test starts inherits this (through mount(8),
    # daemonizing and setsid too): it tells this run's processes apart
    # from everything else on the machine.
    os.environ[leaks.TOKEN_VAR] = f"{os.getpid()}-{secrets.token_hex(6)}"
    # The filesystem checks that every allocation was reserved first (a
    # rule of its concurrency model; fs/core.py), in every process here.
    os.environ["REPLFS_FS_STRICT"] = "1"
    # The mirror's last-known-size records (blockrepl/driver/disk.py) go to
    # a directory of this run, not /var/lib/replfs, unless a test sets one.
    if "REPLFS_STATEDIR" not in os.environ:
        state = tempfile.mkdtemp(prefix="replfs-test-state-")
        os.environ["REPLFS_STATEDIR"] = state
        atexit.register(shutil.rmtree, state, True)


def _shard(config, items) -> None:
    """--shard K/N: keep every N-th test from the K-th on.  Round robin
    over the collection order, so each shard gets its share of every
    parametrized family (the seeds of one simulator are adjacent)."""
    spec = config.getoption("--shard")
    if not spec:
        return
    try:
        k, n = (int(x) for x in spec.split("/"))
        if not 1 <= k <= n:
            raise ValueError
    except ValueError:
        raise pytest.UsageError(f"--shard {spec!r}: expected K/N with 1 <= K <= N") from None
    keep = items[k - 1::n]
    drop = [it for i, it in enumerate(items) if i % n != k - 1]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.hookimpl(trylast=True)          # after -m and -k have deselected
def pytest_collection_modifyitems(config, items):
    _smoke(config, items)
    _shard(config, items)


def _smoke(config, items) -> None:
    """Soak smoke: the first parameter set of each soak test; none of a
    soak test marked ``@pytest.mark.soak(twin="test_x")`` when its quick
    twin ``test_x`` of the same module (the same code at make test's
    size) is in the run too: the smoke would run that code a second
    time."""
    if not soak.smoke():
        return
    selected = {(str(it.path), it.name.partition("[")[0]) for it in items}
    seen = set()
    keep, drop = [], []
    for item in items:
        mark = item.get_closest_marker("soak")
        if mark is None:
            keep.append(item)
            continue
        twin = mark.kwargs.get("twin")
        if twin is not None:
            if not callable(getattr(item.module, twin, None)):
                raise pytest.UsageError(f"{item.nodeid}: its soak twin {twin!r} is not a "
                                        f"test of {item.path.name}")
            if (str(item.path), twin) in selected:
                drop.append(item)
                continue
        fn = getattr(item, "function", None)
        key = (str(item.path), getattr(fn, "__qualname__", item.name.partition("[")[0]))
        (drop if key in seen else keep).append(item)
        seen.add(key)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_sessionstart(session):
    global _watch, _tmpdir
    if session.config.getoption("--no-leak-check"):
        return
    roots = []
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None:
        roots.append(str(factory.getbasetemp()))
    # tempfile.mkdtemp of the tests (module fixtures, short paths) goes to a
    # directory of this run, so their mounts are known to be this run's.
    # Not under the basetemp: /tmp/pytest-of-root is 0700, and some tests
    # run commands as an unprivileged user in their directories.
    _tmpdir = tempfile.mkdtemp(prefix="replfs-tests-")
    os.chmod(_tmpdir, 0o755)
    tempfile.tempdir = _tmpdir
    roots.append(_tmpdir)
    _watch = leaks.LeakWatch(os.environ[leaks.TOKEN_VAR], roots)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        item._replfs_failed = True


# A FUSE request that is never answered does not fail a test, it hangs it
# (and CI with it): past this many seconds a test's FUSE mounts of this run
# are aborted through /sys/fs/fuse/connections, so their callers get
# ENOTCONN and the test fails.
HANG_LIMIT = float(os.environ.get("REPLFS_TEST_HANG_LIMIT", "600"))


def _abort_hung_mounts(nodeid: str) -> None:
    from replfs.fuse import mount as fmount
    for m in _watch.fuse_mounts():
        major, _, minor = m.dev.partition(":")
        conn = (int(major) << 20) | int(minor)
        print(f"\n{nodeid}: still running after {HANG_LIMIT:.0f} s; aborting the FUSE "
              f"connection of {m.mountpoint}", file=sys.stderr, flush=True)
        try:
            fmount.abort_connection(conn)
        except OSError as e:
            print(f"  abort failed: {e}", file=sys.stderr, flush=True)


@pytest.fixture(autouse=True)
def _nothing_left_behind(request):
    """Fail a test that leaves mounts or processes behind (and remove them)."""
    if _watch is None:
        yield
        return
    before = _watch.snapshot()
    timer = threading.Timer(HANG_LIMIT, _abort_hung_mounts, (request.node.nodeid,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    procs, mnts = _watch.leaked_since(before)
    if not procs and not mnts:
        return
    what = [p.describe() for p in procs] + [m.describe() for m in mnts]
    stuck = _watch.reap(procs, mnts)
    _found.append((request.node.nodeid, what, stuck))
    if not getattr(request.node, "_replfs_failed", False):
        pytest.fail("left behind by this test (now removed):\n  " + "\n  ".join(what)
                    + ("\nCOULD NOT BE REMOVED:\n  " + "\n  ".join(stuck) if stuck else ""),
                    pytrace=False)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    if _watch is None:
        return
    procs, mnts = _watch.leaked_since((set(), set()), grace=15.0)
    if procs or mnts:
        what = [p.describe() for p in procs] + [m.describe() for m in mnts]
        _found.append(("end of the session", what, _watch.reap(procs, mnts)))
    if _found and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    tempfile.tempdir = None
    try:
        os.rmdir(_tmpdir)       # what failed tests kept stays for a look
    except OSError:
        pass


def pytest_terminal_summary(terminalreporter):
    if not _found:
        return
    tr = terminalreporter
    tr.write_sep("=", "mounts and processes left behind", red=True, bold=True)
    for where, what, stuck in _found:
        tr.write_line(f"{where}:")
        for w in what:
            tr.write_line(f"    {w}")
        for s in stuck:
            tr.write_line(f"    COULD NOT BE REMOVED: {s}")
    tr.write_line("(the run fails: every test must take down what it started, "
                  "failing or not)")
