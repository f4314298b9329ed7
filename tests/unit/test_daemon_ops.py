"""Every request a replfs client sends is declared in an ``ops`` table of
replfsd: the daemon's own, the mirror's (replfs/daemon/mirror.py) or a
component's -- the daemon dispatches through those tables only, so a
request named nowhere would be "unknown request" at run time."""
import pathlib
import re

from replfs.daemon.components import default_components
from replfs.daemon.server import Daemon

ROOT = pathlib.Path(__file__).resolve().parents[2]
SENT = [
    re.compile(r'\.a?call\(\s*"([a-z][a-z-]*)"'),          # clients
    re.compile(r'_simple\(\s*"([a-z][a-z-]*)"'),            # replfsadm verbs
    re.compile(r'_?daemon_call\(\s*ctx,\s*"([a-z][a-z-]*)"'),
]


def sent_ops() -> set[str]:
    found = set()
    for folder in ("replfs", "fs", "locking", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for rx in SENT:
                found.update(rx.findall(text))
    return found


def test_every_request_sent_is_declared(tmp_path):
    d = Daemon("alpha", str(tmp_path))
    d.components = default_components()
    declared = set(d.ops) | set(d.mirror.ops)
    for comp in d.components:
        declared |= set(comp.ops)
    sent = sent_ops()
    assert {"up", "primary", "write", "wait-sync", "dlm-lock", "pause-sync"} <= sent
    assert not sent - declared, f"requests nobody declares: {sorted(sent - declared)}"


def test_the_mirror_declares_its_requests_once_by_name(tmp_path):
    d = Daemon("alpha", str(tmp_path))
    ops = d.mirror.ops
    assert ops["invalidate-remote"] == d.mirror.op_invalidate_remote
    assert ops["wait-connect"] == d.mirror.op_wait_connect
    assert not set(ops) & set(d.ops)
