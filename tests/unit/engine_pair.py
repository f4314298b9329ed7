"""Shared set-up of the hand-driven two-engine tests: two mirror engines
whose ``Pair`` (each test's own: what it does with packets and disk
requests differs) is brought to Connected with alpha Primary."""
from replfs.blockrepl.core.bitmap import Bitmap
from replfs.blockrepl.core.states import ConnState


def bring_up(pair, nblocks: int) -> None:
    """Attach, connect and promote alpha on ``pair`` (with ``a``, ``b``,
    ``feed`` and ``settle``; each node with ``e``, ``sb``, ``session``)."""
    for n in (pair.a, pair.b):
        pair.feed(n, n.e.attach("attach", n.sb, Bitmap(nblocks), []))
        pair.feed(n, n.e.connect())
    for n in (pair.a, pair.b):
        n.session, actions = n.e.connected()
        pair.feed(n, actions)
    pair.settle()
    pair.feed(pair.a, pair.a.e.primary("p"))
    pair.settle()
    assert pair.a.e.cstate is ConnState.Connected
