"""The replication link's authentication answer: what each side sends in
its ``Auth`` packet, and what it expects back.

Each side opens with a fresh random nonce in its ``Hello``.  The answer to
a nonce is an HMAC-SHA256, keyed by the shared secret, over the nonce *and*
who answers whom for which resource.  Binding the answer to its sender
matters: were it over the nonce alone, a man in the middle with two
connections open to the same node could hand that node's own answer back
to it (a reflection) and pass for its peer.  With the names in it, an
answer made by node A for node B's nonce never verifies as one from B.

Pure: no I/O; the driver (blockrepl/driver/resource.py) sends and checks.
"""
from __future__ import annotations

import hashlib
import hmac

_LABEL = b"replfs-auth-1\0"


def answer(secret: bytes, nonce: bytes, sender: str, receiver: str, resource: str) -> bytes:
    """The Auth MAC ``sender`` sends in answer to ``receiver``'s ``nonce``."""
    msg = b"\0".join((_LABEL, bytes(nonce), sender.encode(), receiver.encode(),
                      resource.encode()))
    return hmac.new(secret, msg, hashlib.sha256).digest()


def verify(secret: bytes, my_nonce: bytes, mac: bytes, me: str, peer: str,
           resource: str) -> bool:
    """Whether ``mac`` is ``peer``'s answer to ``my_nonce`` (constant time)."""
    return hmac.compare_digest(bytes(mac), answer(secret, my_nonce, peer, me, resource))
