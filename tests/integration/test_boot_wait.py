"""The boot-time wait for the peer: a node that went down as a Primary
without its peer waits degr-wfc-timeout, not wfc-timeout (wait-connect,
wait-con-int, up --wait), as DRBD's init script does; 'yes' stops the wait."""
import os
import time

import replfs.cli.main as cli
from replfs.ipc.client import SyncClient, socket_path
from replfs.localpair import LocalPair


def test_a_degraded_primary_that_crashed_waits_degr_wfc_timeout(tmp_path, monkeypatch):
    pair = LocalPair(tmp_path, extra_res="\tstartup { wfc-timeout 30; degr-wfc-timeout 1; }")
    a = pair.alpha
    try:
        a.adm("create-md", "r0")
        a.start()
        a.adm("up", "r0")                       # beta never comes
        a.adm("primary", "--force", "r0")       # a Primary without its peer...
        with SyncClient(socket_path(a.rundir)) as c:
            c.call("open", res="r0", write=True)
            c.call("write", b"x" * 4096, res="r0", off=0)
        a.kill9()                               # ...goes down
        a.start()
        a.adm("up", "r0")

        t0 = time.monotonic()
        cp = a.adm("wait-connect", "r0", check=False)
        waited = time.monotonic() - t0
        assert cp.returncode == 5, cp.stderr
        assert "timed out waiting for the connection (cstate WFConnection, " \
               "degr-wfc-timeout 1s)" in cp.stderr
        assert waited < 10, waited              # not wfc-timeout's 30 s

        # The command line wins over the config; degr never exceeds wfc.
        cp = a.adm("wait-connect", "--wfc-timeout", "2", "--degr-wfc-timeout", "5", "r0",
                   check=False)
        assert cp.returncode == 5 and "degr-wfc-timeout 2s" in cp.stderr
        assert "degr-wfc-timeout (5s) is longer than wfc-timeout (2s); using 2s" in cp.stderr

        # The boot wait: dots, the timeout reported, and booting goes on (exit 0).
        t0 = time.monotonic()
        cp = a.adm("wait-con-int", check=False)
        assert cp.returncode == 0, cp.stderr
        assert "timed out waiting for the connection" in cp.stderr
        assert time.monotonic() - t0 < 10

        # After the quiet seconds it says what it waits for and why, and
        # 'yes' on standard input stops a wait that would last for ever.
        monkeypatch.setattr(cli, "QUIET_SECONDS", 0)
        rfd, wfd = os.pipe()
        os.write(wfd, b"yes\n")
        out, err = [], []
        with os.fdopen(rfd) as stdin:
            t0 = time.monotonic()
            rc = cli.main(["-c", a.conf, "--node", "alpha", "--rundir", a.rundir,
                           "--degr-wfc-timeout", "0", "--wfc-timeout", "0", "wait-con-int"],
                          out=out.append, err=err.append, stdin=stdin)
        os.close(wfd)
        assert rc == 0, err
        assert time.monotonic() - t0 < 5
        text = "\n".join(out)
        assert "r0: for ever [degr-wfc-timeout] -- it went down as a Primary without " \
               "its peer" in text
        assert "To stop waiting, enter 'yes'" in text
        assert err == ["r0: stopped waiting for the connection"]
        # the daemon dropped the wait of the client that left
        assert a.status()["cstate"] == "WFConnection"

        # `up --wait` brings it up and waits the same way.
        a.adm("down", "r0")
        cp = a.adm("up", "--wait", "r0", check=False)
        assert cp.returncode == 0 and "degr-wfc-timeout 1s" in cp.stderr
    finally:
        pair.teardown()
