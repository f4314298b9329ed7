"""The resync-rate controller (core/resync_rate.py, pure): DRBD 8.4's
fixed rate, c-plan-ahead planning toward c-fill-target / c-delay-target,
the c-max-rate ceiling and the c-min-rate throttle under application I/O.

A tiny model drives it: a sender that sends a chunk whenever the
controller allows, and a link that acknowledges at most ``link`` bytes
per second, first in first out."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from replfs.blockrepl.core.resync_rate import STEP, RateConfig, RateController

K = 1024
M = K * K


def run(cfg: RateConfig, *, link: float, secs: float, chunk: int = 256 * K,
        busy=lambda t: False, dt: float = 0.025, start: float = 0.0):
    c = RateController(cfg, start)
    t = start
    queue = 0
    sent_at = []            # (time, total sent)
    while t < start + secs:
        while c.may_send(t, busy(t)):
            c.sent(chunk)
            queue += chunk
        done = int(min(queue, link * dt))
        queue -= done
        c.acked(done)
        t += dt
        sent_at.append((t, c.sent_total))
    return c, sent_at


def rate_between(sent_at, t0, t1):
    a = next(s for t, s in sent_at if t >= t0)
    b = next(s for t, s in sent_at if t >= t1)
    return (b - a) / (t1 - t0)


rates = st.integers(min_value=64, max_value=200_000).map(lambda k: k * K)
chunks = st.sampled_from([4 * K, 64 * K, 256 * K])


@settings(max_examples=60, deadline=None)
@given(rate=rates, chunk=chunks, secs=st.floats(1.0, 20.0),
       start=st.floats(0.0, 1e6))
def test_fixed_rate_is_kept_on_average(rate, chunk, secs, start):
    cfg = RateConfig(resync_rate=rate, plan_ahead=0)
    c, _ = run(cfg, link=1e12, secs=secs, chunk=chunk, start=start)
    # every turn allows rate * STEP; one chunk of overdraft at most
    turns = secs / STEP + 1
    assert c.sent_total <= rate * STEP * turns + chunk
    assert c.sent_total >= rate * STEP * (turns - 2) - chunk


@settings(max_examples=60, deadline=None)
@given(max_rate=rates, plan=st.integers(1, 300), fill=st.integers(0, 1 << 20),
       delay=st.integers(1, 100), link=st.floats(1e5, 1e10), start_rate=rates,
       chunk=chunks)
def test_dynamic_never_exceeds_c_max_rate(max_rate, plan, fill, delay, link, start_rate,
                                          chunk):
    cfg = RateConfig(resync_rate=start_rate, plan_ahead=plan / 10, fill_target=fill * 512,
                     delay_target=delay / 10, max_rate=max_rate, min_rate=0)
    secs = 8.0
    c, _ = run(cfg, link=link, secs=secs, chunk=chunk)
    assert c.sent_total <= max_rate * STEP * (secs / STEP + 1) + chunk
    assert c.rate() <= max_rate + 1e-6


@settings(max_examples=60, deadline=None)
@given(rate=rates, min_rate=rates, dynamic=st.booleans(), chunk=chunks)
def test_application_io_throttles_down_to_c_min_rate(rate, min_rate, dynamic, chunk):
    cfg = RateConfig(resync_rate=rate, plan_ahead=2.0 if dynamic else 0,
                     max_rate=max(rate, min_rate) * 4, min_rate=min_rate)
    secs = 6.0
    c, sent_at = run(cfg, link=1e12, secs=secs, chunk=chunk, busy=lambda t: True)
    assert c.sent_total <= min_rate * STEP * (secs / STEP + 1) + chunk
    assert c.throttled or c.rate() <= min_rate * (1 + 1e-9)
    if not dynamic:
        # not below: what the fixed rate and the throttle both allow
        floor = min(rate, min_rate)
        assert c.sent_total >= floor * STEP * (secs / STEP - 2) - chunk


def test_c_min_rate_zero_means_no_throttle():
    cfg = RateConfig(resync_rate=10 * M, plan_ahead=0, min_rate=0)
    busy, _ = run(cfg, link=1e12, secs=5, busy=lambda t: True)
    idle, _ = run(cfg, link=1e12, secs=5)
    assert busy.sent_total == idle.sent_total


def test_throttle_ends_with_the_application_io():
    cfg = RateConfig(resync_rate=20 * M, plan_ahead=0, min_rate=1 * M)
    c, sent_at = run(cfg, link=1e12, secs=10, busy=lambda t: t < 5)
    assert rate_between(sent_at, 1, 4) < 1.5 * M
    assert rate_between(sent_at, 6, 9) > 15 * M


def test_dynamic_starts_from_resync_rate_and_keeps_to_c_max_rate_on_a_fast_link():
    cfg = RateConfig(resync_rate=250 * M, plan_ahead=2.0, fill_target=50 * K,
                     max_rate=100 * M, min_rate=0)
    c, sent_at = run(cfg, link=1e12, secs=20)
    assert rate_between(sent_at, 0.05, 1) > 0.9 * 100 * M
    assert rate_between(sent_at, 15, 20) > 0.85 * 100 * M


def test_dynamic_ramp_from_a_low_start_is_gradual():
    # DRBD's integrator: from a small resync-rate, each turn adds about
    # c-fill-target / c-plan-ahead-steps more
    cfg = RateConfig(resync_rate=250 * K, plan_ahead=2.0, fill_target=50 * K,
                     max_rate=100 * M, min_rate=0)
    c, sent_at = run(cfg, link=1e12, secs=20, chunk=4 * K)
    early, late = rate_between(sent_at, 1, 3), rate_between(sent_at, 15, 20)
    assert early < late < 100 * M


@settings(max_examples=25, deadline=None)
@given(link_mib=st.integers(2, 60), fill_kib=st.sampled_from([256, 1024, 4096]))
def test_dynamic_settles_at_the_link_rate_with_the_fill_target_in_flight(link_mib, fill_kib):
    link = link_mib * M
    cfg = RateConfig(resync_rate=250 * K, plan_ahead=2.0, fill_target=fill_kib * K,
                     max_rate=1000 * M, min_rate=0)
    c, sent_at = run(cfg, link=link, secs=40, chunk=64 * K)
    late = rate_between(sent_at, 30, 40)
    assert 0.85 * link <= late <= 1.15 * link
    # what stays queued is the fill target, not an ever-growing backlog
    assert c.in_flight <= fill_kib * K + link * STEP + 2 * 64 * K


def test_delay_target_keeps_that_much_time_in_flight():
    link = 20 * M
    cfg = RateConfig(resync_rate=250 * K, plan_ahead=2.0, fill_target=0, delay_target=0.5,
                     max_rate=1000 * M, min_rate=0)
    c, sent_at = run(cfg, link=link, secs=40, chunk=64 * K)
    assert 0.85 * link <= rate_between(sent_at, 30, 40) <= 1.15 * link
    assert 0.5 * link * 0.5 <= c.in_flight <= 1.5 * link * 0.5


def test_an_idle_spell_is_not_saved_up():
    cfg = RateConfig(resync_rate=1 * M, plan_ahead=0)
    c = RateController(cfg, 0.0)
    assert c.may_send(0.0, False)
    c.sent(64 * K)
    # an hour later: one turn's worth, not an hour's
    assert c.may_send(3600.0, False)
    c.sent(int(1 * M * STEP) + 1)
    assert not c.may_send(3600.0, False)
    assert c.next_turn > 3600.0
