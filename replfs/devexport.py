"""The device file of a replicated resource (the daemon's helper process).

``python -m replfs.devexport --resource r0 --rundir DIR --path /dev/drbd0``
mounts the single-file FUSE export from replfs.devfile over ``path`` and
serves it through replfsd's socket.  Unlike an export of a plain file,
every open(2) of the device file asks the daemon for a handle: a
Secondary refuses it with EMEDIUMTYPE ("Wrong medium type"), as DRBD 8
does, and while a handle is held the daemon refuses `secondary` ("Device
is held open by someone").  The process unmounts and exits on SIGTERM or
when its connection to replfsd ends.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys

import trio

from replfs import fuse

from replfs.blockdev import BlockDeviceError
from replfs.errors import ReplfsError
from replfs.ipc.client import AsyncClient, DaemonBlockDevice, socket_path

from .devfile import DeviceFileOps, serve_device_file

log = logging.getLogger("replfs.devexport")


class ResourceDeviceOps(DeviceFileOps):
    """DeviceFileOps whose opens and closes are the daemon's."""

    def __init__(self, client: AsyncClient, dev: DaemonBlockDevice, **kw):
        super().__init__(dev, **kw)
        self.client = client

    async def open(self, inode, flags, ctx):
        self._check_inode(inode)
        write = (flags & os.O_ACCMODE) != os.O_RDONLY
        try:
            reply, _ = await self.client.call("open", res=self.dev.resource, write=write)
        except BlockDeviceError as e:
            raise fuse.FUSEError(e.errno or errno.EIO) from None
        except ReplfsError:
            raise fuse.FUSEError(errno.ENXIO) from None
        return fuse.FileInfo(fh=reply["handle"], direct_io=self.direct_io, keep_cache=False)

    async def release(self, fh):
        try:
            await self.client.call("close", res=self.dev.resource, handle=fh)
        except (BlockDeviceError, ReplfsError):
            pass


async def _run(args) -> None:
    async with trio.open_nursery() as nursery:
        client = await AsyncClient.connect(socket_path(args.rundir), nursery)
        reply, _ = await client.call("status", res=args.resource)
        size = reply["resources"][0]["size"]
        dev = DaemonBlockDevice(client, args.resource, size, 0)
        ops = ResourceDeviceOps(client, dev)
        await nursery.start(lambda task_status: serve_device_file(
            dev, args.path, ops=ops, allow_other=True, task_status=task_status))
        print(f"READY {args.path} {size}", flush=True)

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

        async def stop_when_daemon_goes() -> None:
            await client.closed_event.wait()
            log.warning("%s: replfsd went away; unmounting %s", args.resource, args.path)
            nursery.cancel_scope.cancel()

        nursery.start_soon(stop_on_signal)
        nursery.start_soon(stop_when_daemon_goes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m replfs.devexport",
                                 description="Serve a resource's device file (run by replfsd).")
    ap.add_argument("--resource", required=True)
    ap.add_argument("--rundir", required=True)
    ap.add_argument("--path", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        trio.run(_run, args)
    except (OSError, ReplfsError, RuntimeError) as e:
        print(f"replfs.devexport: cannot export {args.resource} at {args.path}: {e}",
              file=sys.stderr)
        return 20
    return 0


if __name__ == "__main__":
    sys.exit(main())
