"""DlmClient keeps a BAST that overtook its lock's registration, but not
for ever: one for a lock already unlocked here would otherwise stay."""
from __future__ import annotations

import trio

from replfs.locking.client import DlmClient


class FakeIpc:
    def __init__(self):
        self.send, self.events = trio.open_memory_channel(10)


async def test_early_bast_is_kept_for_a_while_then_dropped(nursery, autojump_clock):
    ipc = FakeIpc()
    client = DlmClient(ipc, nursery)
    nursery.start_soon(client._events)
    await ipc.send.send(({"event": "bast", "handle": 7, "blocked": "EX"}, b""))
    await trio.sleep(1)
    assert 7 in client._early_basts          # a lock() may still register 7
    await trio.sleep(40)
    await ipc.send.send(({"event": "bast", "handle": 9, "blocked": "PR"}, b""))
    await trio.sleep(1)
    assert 7 not in client._early_basts and 9 in client._early_basts


async def test_connection_loss_marks_the_client_fenced(nursery, autojump_clock):
    ipc = FakeIpc()
    client = DlmClient(ipc, nursery)
    nursery.start_soon(client._events)
    await ipc.send.send(({"event": "fenced", "why": "quorum lost"}, b""))
    await trio.sleep(1)
    assert client.fenced == "quorum lost"
    ipc2 = FakeIpc()
    client2 = DlmClient(ipc2, nursery)
    nursery.start_soon(client2._events)
    await ipc2.send.aclose()
    await trio.sleep(1)
    assert client2.fenced == "the connection to replfsd is lost"
