"""The lease thread: which messages it renews. Messages held since before the consumer (re)started came over a lost
connection: renewing them would keep them from Redis's visibility restore forever."""

from __future__ import annotations

import threading
import time

import fakeredis

from schemas import queueing
from schemas.queueing import UNACKED_INDEX_KEY, LeaseRenewal


def test_renews_what_it_holds_but_not_what_came_over_a_lost_connection(monkeypatch) -> None:
    client = fakeredis.FakeRedis()
    client.zadd(UNACKED_INDEX_KEY, {"old": 1.0, "new": 1.0, "acked-meanwhile": 1.0})
    client.zrem(UNACKED_INDEX_KEY, "acked-meanwhile")
    monkeypatch.setattr(queueing, "held_elsewhere", {"old"})
    stale = frozenset(queueing.held_delivery_tags())  # what start() takes as stale: held before this start
    queueing.held_elsewhere.update({"new", "acked-meanwhile"})
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
