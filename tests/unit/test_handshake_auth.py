"""The replication link's Auth answer (blockrepl/proto/handshake.py)."""
import secrets

from replfs.blockrepl.proto import handshake as H

KEY = b"s3cr3t"


def test_the_peers_answer_verifies():
    nonce = secrets.token_bytes(16)
    mac = H.answer(KEY, nonce, "beta", "alpha", "r0")        # beta answers alpha
    assert H.verify(KEY, nonce, mac, "alpha", "beta", "r0")   # alpha checks


def test_a_reflected_answer_does_not_verify():
    """A man in the middle asks alpha itself to answer alpha's own nonce
    (on a second connection, posing as beta) and hands that back."""
    nonce = secrets.token_bytes(16)
    reflected = H.answer(KEY, nonce, "alpha", "beta", "r0")  # made by alpha
    assert not H.verify(KEY, nonce, reflected, "alpha", "beta", "r0")


def test_the_wrong_secret_nonce_or_resource_does_not_verify():
    nonce = secrets.token_bytes(16)
    mac = H.answer(KEY, nonce, "beta", "alpha", "r0")
    assert not H.verify(b"other", nonce, mac, "alpha", "beta", "r0")
    assert not H.verify(KEY, secrets.token_bytes(16), mac, "alpha", "beta", "r0")
    assert not H.verify(KEY, nonce, mac, "alpha", "beta", "r1")
