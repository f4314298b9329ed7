"""replfsadm argument handling, in-process (no daemon needed)."""
import os
import re

import pytest

from replfs.cli.main import VERBS, main, parse
from replfs.errors import ReplfsError

MAN = os.path.join(os.path.dirname(__file__), "..", "..", "man", "replfsadm.8")


def run(argv):
    out, err = [], []
    rc = main(argv, out=out.append, err=err.append)
    return rc, "\n".join(out), "\n".join(err)


def test_drbd8_and_modern_option_placements_parse_the_same():
    for argv in (["--", "--overwrite-data-of-peer", "primary", "r0"],
                 ["--", "-o", "primary", "r0"],
                 ["primary", "r0", "-o"],
                 ["primary", "--force", "r0"]):
        g, verb, res, opts = parse(argv)
        assert (verb, res, opts) == ("primary", "r0", {"force": True}), argv
    g, verb, res, opts = parse(["--", "--discard-my-data", "connect", "r1"])
    assert (verb, res, opts) == ("connect", "r1", {"discard_my_data": True})


def test_usage_errors_exit_1_with_a_message():
    rc, out, err = run(["frobnicate", "r0"])
    assert rc == 1 and "Unknown command 'frobnicate'" in err
    rc, out, err = run(["primary"])
    assert rc == 1 and "USAGE: replfsadm primary" in err
    rc, out, err = run(["connect", "--force", "r0"])
    assert rc == 1 and "does not take --force" in err
    rc, out, err = run(["--bogus", "up", "r0"])
    assert rc == 1 and "unknown option '--bogus'" in err
    with pytest.raises(ReplfsError):
        parse(["up", "r0", "extra"])


def test_help_lists_every_verb():
    rc, out, err = run(["--help"])
    assert rc == 0
    for name in VERBS:
        assert f"  {name}" in out


def test_missing_config_is_a_config_error(tmp_path):
    rc, out, err = run(["-c", str(tmp_path / "none.conf"), "up", "r0"])
    assert rc == 10 and "Can not open" in err


def test_man_page_documents_exactly_the_verbs():
    text = open(MAN).read().replace("\\-", "-")
    section = text.split(".SH VERBS")[1].split(".SH ")[0]
    documented = set(re.findall(r"^\.TP\n\.B ([a-z][a-z0-9-]*)", section, re.M))
    assert documented == set(VERBS)


def test_closed_pipe_gives_no_traceback(tmp_path):
    """`replfsadm dump all | head -1`: the reader goes away; replfsadm ends
    quietly (141, as a tool killed by SIGPIPE) with nothing on stderr."""
    import subprocess
    import sys
    conf = tmp_path / "r.conf"
    with open(conf, "w") as f:
        for i in range(1500):        # more output than a pipe holds
            f.write(f"resource r{i} {{ protocol C; "
                    f"on alpha {{ device /dev/null{i} minor {i}; disk /tmp/xd{i}; "
                    f"address 127.0.0.1:{10000 + i}; meta-disk internal; }} "
                    f"on beta {{ device /dev/null{i} minor {i}; disk /tmp/yd{i}; "
                    f"address 127.0.0.2:{10000 + i}; meta-disk internal; }} }}\n")
    cmd = (f"{sys.executable} -m replfs.cli.main -c {conf} --node alpha dump all | head -1; "
           f"exit ${{PIPESTATUS[0]}}")
    cp = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert cp.returncode == 141, (cp.returncode, cp.stderr)
    assert "Traceback" not in cp.stderr and cp.stderr == "", cp.stderr


def test_proc_lists_down_resources_as_unconfigured(tmp_path):
    conf = tmp_path / "r.conf"
    conf.write_text("resource r0 { protocol C; on alpha { device /dev/null0 minor 0; "
                    "disk /tmp/a0; address 127.0.0.1:7789; meta-disk internal; } "
                    "on beta { device /dev/null0 minor 0; disk /tmp/b0; "
                    "address 127.0.0.2:7789; meta-disk internal; } }\n"
                    "resource r5 { protocol C; on alpha { device /dev/null5 minor 5; "
                    "disk /tmp/a5; address 127.0.0.1:7790; meta-disk internal; } "
                    "on beta { device /dev/null5 minor 5; disk /tmp/b5; "
                    "address 127.0.0.2:7790; meta-disk internal; } }\n")
    rc, out, err = run(["-c", str(conf), "--node", "alpha", "--rundir",
                        str(tmp_path / "no-daemon"), "proc"])
    assert rc == 0, err
    assert out.splitlines()[1:] == [" 0: cs:Unconfigured", " 5: cs:Unconfigured"], out
