#!/usr/bin/env bash
# `make bench-peer`'s set-up: installs GlusterFS from Debian's packages
# (glusterfs-server for glusterd and the bricks, glusterfs-client for the
# FUSE client, mount -t glusterfs), so that bench/peer.py can compare
# replfs with a GlusterFS replica-2 volume on this machine.  Run as root;
# safe to run again.  Exits non-zero, saying why, when GlusterFS cannot be
# installed: the comparison is then not made (never silently).
set -euo pipefail

PACKAGES="glusterfs-server glusterfs-client"

if [ "$(id -u)" != 0 ]; then
    echo "setup-bench-peer: must run as root (apt-get, glusterd, mount)" >&2
    exit 1
fi

missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup-bench-peer: installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get update -qq; then
        echo "setup-bench-peer: apt-get update failed: GlusterFS cannot be installed" >&2
        exit 1
    fi
    # policy-rc.d-less containers: the packages' service start may fail
    # harmlessly; bench/peer.py starts glusterd itself.
    if ! apt-get install -y -qq $missing >/tmp/setup-bench-peer.$$.log 2>&1; then
        tail -20 /tmp/setup-bench-peer.$$.log >&2
        rm -f /tmp/setup-bench-peer.$$.log
        echo "setup-bench-peer: apt-get install$missing failed: GlusterFS cannot be installed" >&2
        exit 1
    fi
    rm -f /tmp/setup-bench-peer.$$.log
fi

for t in glusterd gluster mount.glusterfs; do
    if ! command -v "$t" >/dev/null 2>&1 && [ ! -x "/sbin/$t" ] && [ ! -x "/usr/sbin/$t" ]; then
        echo "setup-bench-peer: $t is missing after installing $PACKAGES" >&2
        exit 1
    fi
done
echo "setup-bench-peer: GlusterFS $(dpkg-query -W -f='${Version}' glusterfs-server) ready"
