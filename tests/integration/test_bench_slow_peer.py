"""bench.block's slow-peer rows measure what they claim: the delaying
proxy really sits on the replication link (protocol C's 4 KiB write
takes at least the round trip it adds), and protocol A, which does not
wait for the peer, comes out faster there."""
from __future__ import annotations

import argparse

from bench import block


def test_slow_peer_rows_see_the_delay_and_protocol_a_is_faster(tmp_path):
    args = argparse.Namespace(slow_peer_ms=5.0, slow_peer_seq_mib=4, slow_peer_rounds=1,
                              small=80, sync=100)
    d = block.bench_slow_peer(str(tmp_path), args)
    rtt_us = 2 * args.slow_peer_ms * 1000
    assert d["C"]["write4k_p50_us"] >= rtt_us, d["C"]
    assert d["A"]["write4k_p50_us"] < rtt_us, d["A"]
    # a flush waits for the peer under protocol C only
    assert d["C"]["sync4k_iops"] < d["A"]["sync4k_iops"], (d["A"], d["C"])
