"""replfsadm resize's options, in-process (no daemon needed)."""
from replfs.cli.main import main, parse


def run(argv):
    out, err = [], []
    rc = main(argv, out=out.append, err=err.append)
    return rc, "\n".join(out), "\n".join(err)


def test_resize_options_parse_in_both_placements():
    for argv in (["resize", "--assume-clean", "--size=2G", "r0"],
                 ["--", "--assume-clean", "--size", "2G", "resize", "r0"]):
        _g, verb, res, opts = parse(argv)
        assert (verb, res, opts) == ("resize", "r0", {"assume_clean": True, "size": "2G"})


def test_a_bad_size_is_a_usage_error_and_other_verbs_refuse_the_options():
    rc, _out, err = run(["resize", "--size=12Q", "r0"])
    assert rc == 1 and "--size" in err and "12Q" in err
    rc, _out, err = run(["verify", "--assume-clean", "r0"])
    assert rc == 1 and "does not take --assume-clean" in err


def test_resize_help_names_its_options():
    rc, out, _err = run(["resize", "--help"])
    assert rc == 0 and "--assume-clean" in out and "--size" in out
