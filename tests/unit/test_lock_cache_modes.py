from replfs.locking.cache import _strongest_compatible
from replfs.locking.dlm.modes import Mode, compatible


def test_downconvert_target_is_the_strongest_mode_that_lets_the_other_in():
    assert _strongest_compatible(Mode.PR, Mode.EX) == Mode.PR
    assert _strongest_compatible(Mode.EX, Mode.EX) == Mode.NL
    assert _strongest_compatible(Mode.CR, Mode.EX) == Mode.PW
    assert _strongest_compatible(Mode.PW, Mode.PR) == Mode.CR
    for held in Mode:
        for blocked in Mode:
            t = _strongest_compatible(blocked, held)
            assert compatible(t, blocked) and compatible(blocked, t)
