"""Running the admin's handler scripts (``handlers { ... }`` in replfs.conf).

DRBD calls out to scripts at certain events; replfs does the same, with
the same names and the same environment variables, so existing scripts
(notify.sh, crm-fence-peer.sh, outdate-peer scripts) keep working:

    DRBD_RESOURCE, DRBD_MINOR, DRBD_PEER_ADDRESS, DRBD_PEER_AF,
    DRBD_PEERS (the peer's name), DRBD_LL_DISK, DRBD_CONF,
    plus REPLFS_RESOURCE, REPLFS_NODE, REPLFS_PEER.

Handlers replfs calls: split-brain, local-io-error (with on-io-error
call-local-io-error), fence-peer (with fencing resource-only or
resource-and-stonith), before-resync-target, after-resync-target.
Each runs as ``/bin/sh -c COMMAND`` with a time limit; its exit code is
logged the way DRBD logs it and returned.
"""
from __future__ import annotations

import logging
import os
import subprocess

import trio

from ..conf.model import Host, Resource as ResourceConf

log = logging.getLogger("replfs.blockrepl")

HANDLER_TIMEOUT = 60.0


def handler_env(conf: ResourceConf, me: Host, peer: Host, node: str,
                conf_path: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "DRBD_RESOURCE": conf.name,
        "DRBD_MINOR": str(me.minor),
        "DRBD_PEER_ADDRESS": peer.address,
        "DRBD_PEER_AF": "ipv6" if ":" in peer.address else "ipv4",
        "DRBD_PEERS": peer.name,
        "DRBD_LL_DISK": me.disk,
        "REPLFS_RESOURCE": conf.name,
        "REPLFS_NODE": node,
        "REPLFS_PEER": peer.name,
    })
    if conf_path:
        env["DRBD_CONF"] = conf_path
    return env


async def run_handler(name: str, command: str, env: dict[str, str], *,
                      resource: str, timeout: float = HANDLER_TIMEOUT) -> int | None:
    """Run one handler; its exit code, or None if it could not run in time."""
    log.info("%s: helper command: /bin/sh -c '%s' (%s)", resource, command, name)
    try:
        with trio.move_on_after(timeout):
            proc = await trio.run_process(["/bin/sh", "-c", command], env=env, check=False,
                                          stdin=subprocess.DEVNULL, capture_stdout=True,
                                          capture_stderr=True)
            code = proc.returncode
            log.info("%s: helper command: /bin/sh -c '%s' (%s) exit code %d (0x%x)",
                     resource, command, name, code, (code & 0xFF) << 8)
            for line in (proc.stdout + proc.stderr).decode(errors="replace").splitlines()[:20]:
                log.info("%s: %s: %s", resource, name, line)
            return code
        log.error("%s: helper command %s did not finish within %d s", resource, name, timeout)
    except OSError as e:
        log.error("%s: helper command %s could not run: %s", resource, name, e)
    return None
