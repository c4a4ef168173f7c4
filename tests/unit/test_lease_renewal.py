"""The lease thread: which messages it renews, and the chunks it vouches for in the ledger. Messages held since
before the consumer (re)started came over a lost connection: renewing them would keep them from Redis's visibility
restore forever."""

from __future__ import annotations

import threading
import time

import fakeredis

from schemas import keys
from schemas.chunks import ChunkRef
from store.queueing import UNACKED_INDEX_KEY
from workers import lease
from workers.lease import LeaseRenewal


def _ref(index: int, seq: int) -> ChunkRef:
    return ChunkRef(job_id="job_1", index=index, priority=5, lane="rerank.bulk:4", seq=seq)


def test_renews_what_it_holds_but_not_what_came_over_a_lost_connection(monkeypatch) -> None:
    client = fakeredis.FakeRedis()
    client.zadd(UNACKED_INDEX_KEY, {"old": 1.0, "new": 1.0, "acked-meanwhile": 1.0})
    client.zrem(UNACKED_INDEX_KEY, "acked-meanwhile")
    client.zadd(keys.CHUNKS_OPEN, {"job_1:0": 1.0, "job_1:1": 1.0})
    monkeypatch.setattr(lease, "held_elsewhere", {"old": _ref(0, 3)})
    stale = frozenset(lease.held_delivery_tags())  # what start() takes as stale: held before this start
    lease.held_elsewhere.update({"new": _ref(1, 8), "acked-meanwhile": _ref(2, 9), "unread": None})
    stop = threading.Event()
    thread = threading.Thread(target=LeaseRenewal._run, args=(client, 0.01, stop, stale), daemon=True)
    thread.start()
    time.sleep(0.2)
    stop.set()
    thread.join(2)
    scores = dict(client.zrange(UNACKED_INDEX_KEY, 0, -1, withscores=True))
    assert scores[b"new"] > time.time() - 5  # renewed
    assert scores[b"old"] == 1.0  # left to run out, then delivered again
    assert b"acked-meanwhile" not in scores  # never added back
    open_chunks = dict(client.zrange(keys.CHUNKS_OPEN, 0, -1, withscores=True))
    assert open_chunks[b"job_1:1"] > time.time() - 5  # its live holder vouches for it
    assert open_chunks[b"job_1:0"] == 1.0  # not the stale one: the ledger may send it again
    assert b"job_1:2" not in open_chunks  # recorded meanwhile: not brought back
    assert client.hget(keys.lane_key("rerank.bulk:4"), "taken") == b"9"  # its lane moved past every held one
