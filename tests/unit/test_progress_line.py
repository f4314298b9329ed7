"""The /proc/drbd progress lines, as DRBD 8.4 prints them."""
from replfs.blockrepl.core.progress import progress_line


def test_below_4_gib_in_k_above_in_m():
    small = progress_line(10240, 7444, 2.0, 0.0)
    assert "sync'ed: 27.3% (7444/10240)K" in small
    big = progress_line(8 << 20, 4 << 20, 2.0, 0.0)
    assert "sync'ed: 50.0% (4096/8192)M" in big


def test_verify_and_want():
    line = progress_line(1000, 250, 1.0, 0.0, verify=True)
    assert line.startswith("[") and "verified: 75.0% (250/1000)K" in line
    assert "want:" not in line
    target = progress_line(1000, 250, 1.0, 0.0, want_kib_s=30720)
    assert target.endswith("speed: 750 (750) want: 30,720 K/sec")
