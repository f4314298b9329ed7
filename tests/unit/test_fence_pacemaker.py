"""replfs-fence-pacemaker, the cluster.conf fence agent that hands fencing
to Pacemaker: it asks stonith_admin to fence the node replfs names and
answers with stonith_admin's verdict.  Pacemaker's fencer needs a running
cluster, so stonith_admin is replaced here by a script that records its
arguments and answers as told (the contract between the two commands)."""
from __future__ import annotations

import os
import subprocess

import pytest

AGENT = os.path.join(os.path.dirname(__file__), "..", "..", "replfs", "ha", "pacemaker",
                     "replfs-fence-pacemaker")


@pytest.fixture
def fake_pacemaker(tmp_path):
    log = tmp_path / "calls"
    stonith = tmp_path / "bin" / "stonith_admin"
    stonith.parent.mkdir()
    stonith.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit ${{STONITH_RC:-0}}\n')
    stonith.chmod(0o755)
    return tmp_path / "bin", log


def run(env, stdin=""):
    return subprocess.run([AGENT], input=stdin, capture_output=True, text=True, timeout=30,
                          env=env)


@pytest.mark.parametrize("rc", [0, 1, 194])
def test_asks_pacemaker_and_answers_with_its_verdict(fake_pacemaker, rc):
    bindir, log = fake_pacemaker
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", REPLFS_FENCE_NODE="beta",
               STONITH_RC=str(rc))
    cp = run(env)
    assert cp.returncode == rc, cp.stderr
    assert log.read_text().split() == ["--fence", "beta", "--timeout", "50"]
    assert ("Pacemaker fenced beta" in cp.stderr) == (rc == 0)


def test_node_from_standard_input_and_timeout(fake_pacemaker):
    bindir, log = fake_pacemaker
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}",
               REPLFS_FENCE_PACEMAKER_TIMEOUT="20")
    env.pop("REPLFS_FENCE_NODE", None)
    cp = run(env, "action=off\nnodename=alpha\n")
    assert cp.returncode == 0 and log.read_text().split() == ["--fence", "alpha", "--timeout",
                                                              "20"]


def test_refuses_without_a_node_or_without_pacemaker(tmp_path):
    env = dict(os.environ)
    env.pop("REPLFS_FENCE_NODE", None)
    assert run(env).returncode == 2
    env = dict(os.environ, PATH=str(tmp_path), REPLFS_FENCE_NODE="beta")
    cp = subprocess.run(["/bin/sh", AGENT], capture_output=True, text=True, env=env)
    assert cp.returncode == 5 and "stonith_admin not found" in cp.stderr


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_prints_usage_and_fences_nothing(fake_pacemaker, flag):
    bindir, log = fake_pacemaker
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", REPLFS_FENCE_NODE="beta")
    cp = subprocess.run([AGENT, flag], capture_output=True, text=True, timeout=30, env=env)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.startswith("usage: replfs-fence-pacemaker") and "REPLFS_FENCE_NODE" in cp.stdout
    assert not log.exists()


@pytest.mark.parametrize("args", [["--node", "beta"], ["beta"], ["-x"]])
def test_unknown_arguments_are_refused_before_fencing(fake_pacemaker, args):
    bindir, log = fake_pacemaker
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", REPLFS_FENCE_NODE="beta")
    cp = subprocess.run([AGENT] + args, capture_output=True, text=True, timeout=30, env=env)
    assert cp.returncode == 2 and "unexpected argument" in cp.stderr, cp.stderr
    assert "Traceback" not in cp.stderr and not log.exists()


def test_a_terminal_on_standard_input_is_not_waited_for(fake_pacemaker):
    """Run by hand without REPLFS_FENCE_NODE, it must not sit waiting for
    fence-agent lines typed on the terminal."""
    bindir, log = fake_pacemaker
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    env.pop("REPLFS_FENCE_NODE", None)
    master, slave = os.openpty()
    try:
        cp = subprocess.run([AGENT], stdin=slave, capture_output=True, text=True, timeout=10,
                            env=env)
    finally:
        os.close(slave)
        os.close(master)
    assert cp.returncode == 2 and "standard input is a terminal" in cp.stderr, cp.stderr
    assert not log.exists()
