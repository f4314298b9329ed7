"""Components the node daemon hosts beside the replicated resources.

A component is an object with:

* ``ops``: a dict from request name (as sent on the admin socket) to an
  async handler ``handler(req: dict, body: bytes, conn: ClientConn)`` that
  returns a reply dict, or ``(reply dict, body bytes)``, or raises
  ReplfsError / BlockDeviceError like the daemon's own handlers;
* ``async run(daemon, *, task_status)``: started in the daemon's nursery
  before the socket serves requests; calls ``task_status.started()`` once
  ready and runs until cancelled;
  ``conn`` (replfs.daemon.server.ClientConn) is the requesting client:
  ``conn.push(event, body, **fields)`` sends it an unsolicited event frame
  and ``conn.on_close`` takes async callbacks run when it disconnects
  (drop its locks there);
* ``async shutdown()``: called at daemon shutdown, after every resource
  is down;
* optionally ``async stop_users()``: called at daemon shutdown before the
  resources go down (the mounts let go of them there).

``default_components()`` lists what a production replfsd hosts; it
imports lazily so the block mirror works even if a component fails to
import (the failure is logged).
"""
from __future__ import annotations

import importlib
import logging

log = logging.getLogger("replfs.daemon")

# (module, factory) pairs; the factory takes no arguments.
DEFAULT = [
    ("replfs.locking.service", "ClusterService"),
    ("replfs.daemon.mounts", "MountService"),
]


def default_components() -> list:
    comps = []
    for module, factory in DEFAULT:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue  # not built yet
            raise
        comps.append(getattr(mod, factory)())
    return comps
