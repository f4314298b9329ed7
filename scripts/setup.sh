#!/usr/bin/env bash
# Installs everything replfs needs on a fresh Debian machine (run as root):
# system packages, then a virtualenv at .venv with the project in it.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

# nftables and iproute2: the network-namespace fault tests
# (tests/integration/test_netns_faults.py) cut links with nft inside the
# namespaces they make.  libfaketime (faketime): the clock-skew fault test
# (tests/integration/test_netns_clock_skew.py) gives one node's daemon a
# wall clock of its own.
# nfs-ganesha, nfs-ganesha-vfs, rpcbind: the NFS export (replfsadm nfs);
# libnfs-utils (nfs-cp, nfs-cat, nfs-ls): the NFS client of its tests.
# resource-agents (ocf-tester, the heartbeat agents), pacemaker-cli-utils
# (crm_resource): the OCF agents in replfs/ha/ocf and their tests.
APT_PACKAGES="fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv e2fsprogs fio nftables iproute2 faketime nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils resource-agents pacemaker-cli-utils"

missing=""
for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup: installing system packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # python3-dev/python3-venv may not match a non-Debian Python; they are
    # best-effort, the rest is required.
    apt-get install -y -qq $missing >/dev/null || apt-get install -y -qq fuse3 libfuse3-dev pkg-config gcc e2fsprogs fio nftables iproute2 faketime nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils resource-agents pacemaker-cli-utils >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating virtualenv .venv"
    "$PY" -m venv .venv
fi
stamp=.venv/.replfs-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ]; then
    echo "setup: installing replfs and its dependencies into .venv"
    .venv/bin/pip install -q --upgrade pip setuptools wheel
    .venv/bin/pip install -q -e '.[test,bench]'
    touch "$stamp"
fi

# mount(8) reaches the `replfs` mount program through mount.fuse3, which
# looks it up on PATH; put the project's commands where root's PATH finds
# them (the venv's own bin directory stays the source of truth).
if [ "$(id -u)" = 0 ] && [ -d /usr/local/sbin ]; then
    for t in replfs mkfs.replfs fsck.replfs replfsadm replfsd replfs-fence-peer; do
        [ -e ".venv/bin/$t" ] && ln -sf "$PWD/.venv/bin/$t" "/usr/local/sbin/$t"
    done
fi

# The OCF resource agents, where Pacemaker looks for provider "replfs"
# (ocf:replfs:replfs, ocf:replfs:replfs-fs, ...).
if [ "$(id -u)" = 0 ]; then
    mkdir -p /usr/lib/ocf/resource.d/replfs
    for a in replfs/ha/ocf/*; do
        ln -sf "$PWD/$a" "/usr/lib/ocf/resource.d/replfs/$(basename "$a")"
    done
fi

# The fence agent that hands fencing to Pacemaker (cluster.conf fence_agent).
if [ "$(id -u)" = 0 ] && [ -d /usr/local/sbin ]; then
    ln -sf "$PWD/replfs/ha/pacemaker/replfs-fence-pacemaker" /usr/local/sbin/replfs-fence-pacemaker
fi

# The preload library NFS-Ganesha needs to give replfs mounts a stable
# filesystem id (replfs/nfs/fsid_preload.c; built once, again when changed).
.venv/bin/python -c "from replfs.nfs import ganesha; ganesha.shim_path()"
