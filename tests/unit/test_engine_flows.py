"""The mirror engine's flow scheduler (blockrepl/engine/flows.py): what
the engine's rules rely on when a flow is cancelled."""
from replfs.blockrepl.engine.flows import FlowSet, Wait


def _flowset():
    errors = []
    return FlowSet(lambda: 0.0, lambda flow, exc: errors.append(exc)), errors


def test_a_flow_cancelled_with_its_io_in_flight_is_closed_when_the_io_completes():
    """Its finally blocks (releasing the one-meta-data-write-at-a-time lock,
    a range lock) must not run while the I/O can still land."""
    fs, errors = _flowset()
    held = {"lock": False}
    token = fs.token()

    def writer():
        held["lock"] = True
        try:
            yield token          # the I/O in flight
        finally:
            held["lock"] = False
    flow = fs.start(writer(), group="session")
    fs.run()
    assert held["lock"] and flow.waiting == token
    fs.cancel_group("session")
    fs.run()
    assert held["lock"], "released while the I/O was still in flight"
    assert not flow.done
    fs.complete(token, 0)
    fs.run()
    assert not held["lock"] and flow.done
    assert not errors


def test_a_flow_cancelled_while_waiting_on_a_condition_is_closed_at_once():
    fs, errors = _flowset()
    closed = []

    def waiter():
        try:
            yield Wait(lambda: False)
        finally:
            closed.append(True)
    flow = fs.start(waiter(), group=1)
    fs.run()
    fs.cancel(flow)
    assert closed == [True] and flow.done
    assert not errors


def test_a_cancelled_flow_never_sees_its_io_result():
    """(closed at the yield: the code after it does not run)"""
    fs, _ = _flowset()
    token = fs.token()
    after = []

    def reader():
        result = yield token
        after.append(result)
    flow = fs.start(reader(), group=1)
    fs.run()
    fs.cancel(flow)
    fs.complete(token, b"data")
    fs.run()
    assert after == [] and flow.done
    assert fs.outstanding() == 0
