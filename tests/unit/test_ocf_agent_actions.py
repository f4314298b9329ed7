"""The OCF agents' own logic (replfs/ha/ocf/), against a stand-in for
replfsadm and crm_attribute: the usage action, the notify action of
ocf:replfs:replfs under the environment Pacemaker gives a notification, and
the one deadline an action's replfsadm calls share.  The stand-in answers
status from a state file, records every verb it is given, and can be made
slow, so each case is exact and takes seconds at most; the same actions
against real daemons are in tests/integration/test_ocf_agents.py."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

AGENTS = os.path.join(os.path.dirname(__file__), "..", "..", "replfs", "ha", "ocf")

FAKE_ADM = f"""#!{sys.executable}
import json, os, sys, time
args = sys.argv[1:]
while args and args[0] in ("-c", "--node", "--rundir"):
    args = args[2:]
d = os.environ["FAKE_DIR"]
with open(os.path.join(d, "calls"), "a") as f:
    f.write(" ".join(args) + "\\n")
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
path = os.path.join(d, "state.json")
st = json.load(open(path))
verb = args[0]
if verb == "status":
    if st["role"] == "Unconfigured":
        print("r0: not defined on this node's replfsd (Unconfigured)")
        sys.exit(0)
    print(f"r0 role:{{st['role']}}\\n  disk:{{st['disk']}}\\n"
          f"  beta connection:{{st['cstate']}} role:Secondary\\n    peer-disk:UpToDate")
    if st.get("event"):
        print(f"  last event: {{st['event']}}")
    sys.exit(0)
if verb == "adjust":
    st["cstate"] = "Connected"
elif verb == "secondary":
    st["role"] = "Secondary"
elif verb == "primary":
    st["role"] = "Primary"
elif verb == "down":
    st["role"] = "Unconfigured"
json.dump(st, open(path, "w"))
"""

FAKE_CRM_ATTRIBUTE = """#!/bin/sh
echo "$@" >> "$FAKE_DIR/crm_attribute"
"""


@pytest.fixture
def fake(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (("replfsadm", FAKE_ADM), ("crm_attribute", FAKE_CRM_ATTRIBUTE)):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    (tmp_path / "replfs.conf").write_text("# read by nothing: the stand-in ignores it\n")
    return tmp_path


def set_state(fake, **state):
    import json
    st = dict(role="Secondary", disk="UpToDate", cstate="Connected", event="")
    st.update(state)
    (fake / "state.json").write_text(json.dumps(st))


def calls(fake) -> list[str]:
    p = fake / "calls"
    return [line.split()[0] for line in p.read_text().splitlines()] if p.exists() else []


def run(fake, action, timeout_ms=60000, **env):
    e = dict(os.environ, PATH=f"{fake / 'bin'}:{os.environ['PATH']}", FAKE_DIR=str(fake),
             OCF_ROOT="/usr/lib/ocf", OCF_RESKEY_CRM_meta_timeout=str(timeout_ms),
             OCF_RESKEY_resource="r0", OCF_RESKEY_config=str(fake / "replfs.conf"),
             OCF_RESKEY_node="alpha", OCF_RESKEY_rundir=str(fake),
             OCF_RESKEY_replfsadm=str(fake / "bin" / "replfsadm"), OCF_RESOURCE_INSTANCE="p_r0:1")
    e.update(env)
    return subprocess.run([os.path.join(AGENTS, "replfs"), action], capture_output=True,
                          text=True, timeout=120, env=e)


@pytest.mark.parametrize("agent", ["replfs", "replfs-cluster", "replfs-fs", "replfs-nfs"])
def test_usage_succeeds_and_an_unknown_action_is_unimplemented(agent):
    """OCF: usage (and help) print the usage and exit OCF_SUCCESS; an action
    the agent does not know is OCF_ERR_UNIMPLEMENTED (3)."""
    path = os.path.join(AGENTS, agent)
    env = dict(os.environ, OCF_ROOT="/usr/lib/ocf")
    for action in ("usage", "help"):
        cp = subprocess.run([path, action], capture_output=True, text=True, timeout=30, env=env)
        assert cp.returncode == 0 and cp.stdout.startswith("usage: "), (action, cp)
        assert "monitor" in cp.stdout and "meta-data" in cp.stdout
    for action in ("reload-everything", ""):
        cp = subprocess.run([path, action], capture_output=True, text=True, timeout=30, env=env)
        assert cp.returncode == 3 and "usage: " in cp.stderr, (action, cp)
        assert "Traceback" not in cp.stderr


def notify_env(n_type, op, **unames):
    """What Pacemaker sets for a notification of a promotable clone (the
    *_uname lists have a trailing space, as Pacemaker gives them)."""
    env = {"OCF_RESKEY_CRM_meta_notify": "true",
           "OCF_RESKEY_CRM_meta_notify_type": n_type,
           "OCF_RESKEY_CRM_meta_notify_operation": op,
           "OCF_RESKEY_CRM_meta_promoted_max": "2", "OCF_RESKEY_CRM_meta_clone_max": "2"}
    for key in ("active", "start", "stop", "promote", "demote", "promoted", "unpromoted",
                "master", "slave", "inactive", "available", "all"):
        env[f"OCF_RESKEY_CRM_meta_notify_{key}_uname"] = unames.get(key, "") + " "
        env[f"OCF_RESKEY_CRM_meta_notify_{key}_resource"] = " "
    return env


@pytest.mark.parametrize("n_type,op,cstate,event,adjusted", [
    ("post", "promote", "StandAlone", "", True),
    ("post", "demote", "StandAlone", "", True),
    ("post", "start", "StandAlone", "connect: refused", True),
    ("post", "promote", "Connected", "", False),
    ("post", "promote", "WFConnection", "", False),
    ("post", "stop", "StandAlone", "", False),          # the peer left: nothing to reach
    ("pre", "promote", "StandAlone", "", False),
    ("post", "promote", "StandAlone", "Split-Brain detected but unresolved, dropping connection!",
     False),
])
def test_notify_reconnects_a_standalone_resource_after_a_peer_change(fake, n_type, op, cstate,
                                                                     event, adjusted):
    set_state(fake, cstate=cstate, event=event)
    cp = run(fake, "notify", **notify_env(n_type, op, **{op: "beta", "active": "alpha beta"}))
    assert cp.returncode == 0, cp.stderr
    assert ("adjust" in calls(fake)) == adjusted, (calls(fake), cp.stderr)
    if "Split" in event:
        assert "split brain" in cp.stderr.lower() and "not reconnecting" in cp.stderr
    if n_type == "pre":
        assert calls(fake) == []


@pytest.mark.parametrize("disk,score", [("UpToDate", "10000"), ("Consistent", "1000"),
                                        ("Outdated", "5")])
def test_post_notification_sets_the_promotion_score_at_once(fake, disk, score):
    """After the peer's promotion or demotion the score follows the local
    disk state without waiting for the next monitor."""
    set_state(fake, role="Primary", disk=disk)
    cp = run(fake, "notify", **notify_env("post", "demote", demote="beta"))
    assert cp.returncode == 0, cp.stderr
    args = (fake / "crm_attribute").read_text().split()
    assert args[args.index("-n") + 1] == "master-p_r0" and args[args.index("-v") + 1] == score


def test_notify_never_fails_the_resource(fake):
    """A notification for a resource that is down here, or without a type,
    is answered with success (the monitor reports real failures)."""
    set_state(fake, role="Unconfigured")
    assert run(fake, "notify", **notify_env("post", "promote", promote="beta")).returncode == 0
    assert "adjust" not in calls(fake)
    assert run(fake, "notify").returncode == 0


def test_an_action_shares_one_deadline_among_its_calls(fake):
    """stop of a Primary makes six replfsadm calls; each answering in 2 s
    takes 12 s, more than the 6 s timeout.  The calls share the action's
    deadline, so the stop fails within the timeout, saying why."""
    set_state(fake, role="Primary")
    t0 = time.monotonic()
    cp = run(fake, "stop", timeout_ms=6000, FAKE_SLEEP="2")
    took = time.monotonic() - t0
    assert cp.returncode == 1, cp.stderr
    assert took < 6, (took, calls(fake))
    assert "the action's 6000 ms" in cp.stderr, cp.stderr
    # and with time enough, the same stop goes through all of them
    set_state(fake, role="Primary")
    (fake / "calls").unlink()
    cp = run(fake, "stop", timeout_ms=60000, FAKE_SLEEP="0")
    assert cp.returncode == 0, cp.stderr
    assert calls(fake) == ["status", "status", "secondary", "status", "down", "status"]
