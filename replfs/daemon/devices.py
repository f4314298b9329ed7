"""Device files: the user-visible /dev/drbdN of each attached resource.

For every attached resource with a ``device`` path, replfsd keeps one
helper process (``python -m replfs.devfile --resource ...``) that mounts a
single-file FUSE filesystem over that path.  The helper serves reads and
writes through this daemon's socket, so the resource's protocol applies,
and it asks the daemon to open the resource when a user opens the file:
a Secondary refuses that with EMEDIUMTYPE ("Wrong medium type"), as DRBD
8 does, and `secondary` is refused while the file is held open.

If replfsd dies, the helper loses its connection, unmounts and exits.
Set REPLFS_NO_DEVFILE=1 in replfsd's environment to export no device
files (machines without FUSE; the mirror works without them).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import trio

log = logging.getLogger("replfs.daemon")


class DeviceFiles:
    def __init__(self, rundir: str):
        self.rundir = rundir
        self._procs: dict[str, trio.Process] = {}

    def running(self, resource: str) -> bool:
        proc = self._procs.get(resource)
        return proc is not None and proc.returncode is None

    async def start(self, nursery: trio.Nursery, resource: str, path: str) -> None:
        if self.running(resource):
            return
        if not path or os.environ.get("REPLFS_NO_DEVFILE"):
            return
        cmd = [sys.executable, "-m", "replfs.devexport", "--resource", resource,
               "--rundir", self.rundir, "--path", path]
        logf = open(os.path.join(self.rundir, f"devfile-{resource}.log"), "ab")
        try:
            proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, stderr=logf,
                                                    start_new_session=True)
        finally:
            logf.close()
        self._procs[resource] = proc
        # Wait for "READY" (mounted) or for the helper to fail.
        buf = b""
        with trio.move_on_after(15):
            while b"\n" not in buf:
                chunk = await proc.stdout.receive_some(4096)
                if not chunk:
                    break
                buf += chunk
        if not buf.startswith(b"READY"):
            log.error("%s: device file %s did not come up (see devfile-%s.log)",
                      resource, path, resource)
            await self.stop(resource)
            return
        log.info("%s: device file %s exported", resource, path)
        nursery.start_soon(self._drain, resource, proc)

    async def _drain(self, resource: str, proc: trio.Process) -> None:
        try:
            while await proc.stdout.receive_some(4096):
                pass
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def stop(self, resource: str) -> None:
        proc = self._procs.pop(resource, None)
        if proc is None:
            return
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            if proc.stdout is not None:
                await proc.stdout.aclose()

    async def stop_all(self) -> None:
        for name in list(self._procs):
            await self.stop(name)
