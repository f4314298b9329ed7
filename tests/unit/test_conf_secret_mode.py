"""A replfs.conf holding a shared-secret that group or others can read is
warned about once per replfsadm command, on stderr, and the command goes on
(the same check and words as for the cluster key)."""
import os

from replfs.cli.main import main

RES = """resource r0 {{
	net {{ {secret} }}
	on alpha {{ device /dev/replfs0 minor 0; disk {tmp}/a; address 127.0.0.1:7789; meta-disk internal; }}
	on beta {{ device /dev/replfs0 minor 0; disk {tmp}/b; address 127.0.0.2:7789; meta-disk internal; }}
}}
"""


def run(conf, *verb):
    out, err = [], []
    rc = main(["-c", str(conf), "--node", "alpha", *verb], out=out.append, err=err.append)
    return rc, out, [e for e in err if "readable" in e]


def test_readable_secret_is_warned_about_once(tmp_path):
    conf = tmp_path / "replfs.conf"
    conf.write_text(RES.format(secret='shared-secret "s3cret";', tmp=tmp_path))
    os.chmod(conf, 0o644)
    rc, out, warnings = run(conf, "dump", "r0")
    assert rc == 0 and any("s3cret" in line for line in out)     # the command went on
    assert warnings == [f"warning: {conf}: it holds a shared-secret and is readable by group "
                        f"or others (mode 0644); anyone who reads it can pose as a peer: "
                        f"chmod 600 {conf}"]
    os.chmod(conf, 0o640)
    assert len(run(conf, "role", "r0")[2]) == 1                 # group alone counts too
    os.chmod(conf, 0o600)
    assert run(conf, "dump", "r0")[2] == []


def test_no_secret_no_warning(tmp_path):
    conf = tmp_path / "replfs.conf"
    conf.write_text(RES.format(secret="protocol C;", tmp=tmp_path))
    os.chmod(conf, 0o644)
    assert run(conf, "dump")[2] == []


def test_the_file_that_holds_the_secret_is_named(tmp_path):
    (tmp_path / "r0.res").write_text(RES.format(secret="shared-secret s3cret;", tmp=tmp_path))
    conf = tmp_path / "replfs.conf"
    conf.write_text(f'include "{tmp_path}/*.res";\n')
    os.chmod(conf, 0o644)
    os.chmod(tmp_path / "r0.res", 0o604)
    rc, _, warnings = run(conf, "dump")
    assert rc == 0 and len(warnings) == 1
    assert f"{tmp_path / 'r0.res'}: it holds a shared-secret" in warnings[0]
    assert "(mode 0604)" in warnings[0]
    os.chmod(tmp_path / "r0.res", 0o600)
    assert run(conf, "dump")[2] == []        # the including file holds no secret
