"""The systemd units in replfs/ha/systemd: systemd-analyze verify finds
nothing wrong, each names a man page that is in man/, runs only commands
setup puts in /usr/local/sbin, and orders after what it needs."""
from __future__ import annotations

import configparser
import glob
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
UNITS = sorted(glob.glob(os.path.join(ROOT, "replfs", "ha", "systemd", "*.service")))
COMMANDS = {"replfsd", "replfsadm"}


def unit(path: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(path)
    return cp


def test_units_are_there():
    names = {os.path.basename(u) for u in UNITS}
    assert names == {"replfsd.service", "replfs-resource@.service",
                     "replfs-cluster@.service", "replfs-nfs@.service"}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_is_clean():
    # (--man=no: the pages are in man/, not installed on this machine)
    cp = subprocess.run(["systemd-analyze", "verify", "--man=no", *UNITS],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0 and not cp.stderr.strip(), cp.stdout + cp.stderr


@pytest.mark.parametrize("path", UNITS, ids=os.path.basename)
def test_unit_documents_and_runs_our_commands(path):
    u = unit(path)
    for doc in u["Unit"]["Documentation"].split():
        m = re.fullmatch(r"man:([\w.-]+)\((\d)\)", doc)
        assert m and os.path.exists(os.path.join(ROOT, "man", f"{m[1]}.{m[2]}")), doc
    for key in ("ExecStart", "ExecStop", "ExecReload"):
        line = u["Service"].get(key)
        if line and line.startswith("/usr/local/sbin/"):
            assert line.split()[0].rsplit("/", 1)[1] in COMMANDS, line
    if os.path.basename(path) != "replfsd.service":
        assert "replfsd.service" in u["Unit"].get("After", "") + u["Unit"].get("Requires", "") \
            or "RequiresMountsFor" in u["Unit"], path


def test_nfs_unit_stops_before_its_mount_and_shares_the_pid_file_dir():
    u = unit(os.path.join(ROOT, "replfs", "ha", "systemd", "replfs-nfs@.service"))
    assert u["Unit"]["RequiresMountsFor"] == "%f"
    s = u["Service"]
    d = "/run/replfs/nfs-%i"
    assert s["PIDFile"] == f"{d}/ganesha.pid"
    for key in ("ExecStart", "ExecReload", "ExecStop"):
        assert f"--dir {d}" in s[key], key
