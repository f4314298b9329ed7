"""`startup { wfc-timeout N; }` is what `replfsadm wait-connect` waits,
as drbdadm passes it on (it used to be accepted and ignored)."""
import time

from replfs.localpair import LocalPair


def test_wait_connect_uses_the_configured_wfc_timeout(tmp_path):
    pair = LocalPair(tmp_path, extra_res="\tstartup { wfc-timeout 2; }")
    a = pair.alpha
    try:
        a.adm("create-md", "r0")
        a.start()
        a.adm("up", "r0")                   # beta never comes
        t0 = time.monotonic()
        cp = a.adm("wait-connect", "r0", check=False)
        waited = time.monotonic() - t0
        assert cp.returncode != 0 and "timed out waiting for the connection" in cp.stderr
        assert 1.5 < waited < 10, waited
        # an explicit -t still wins
        t0 = time.monotonic()
        cp = a.adm("wait-connect", "-t", "1", "r0", check=False)
        assert cp.returncode != 0 and time.monotonic() - t0 < 1.9
    finally:
        pair.teardown()
