"""The lease that live workers keep on the messages they hold.

kombu's Redis transport records every message a worker takes in the `unacked` hash and its delivery time in the
`unacked_index` sorted set; each worker's sweep (`restore_visible`, every `unacked_restore_interval`) puts back on
its queue any message whose time is older than `visibility_timeout`. The farm uses that timeout as a short lease
(`RERANK_VISIBILITY_TIMEOUT_S`, 20 s; `store.queueing.celery_config`) and every live worker moves its messages'
times forward every lease / 4 (`ZADD XX`: a message acked or restored meanwhile is not brought back). A worker that
dies stops renewing, so its chunks are queued again within the lease plus one sweep; a live worker's chunk keeps its
lease however long it runs. The same renewal vouches for the chunks in the farm's own ledger
(`store.chunk_ledger`), which finds the chunks that kombu loses (a pop before its unacked record, a late ack, a
failover) and sends them again.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from celery import Celery, bootsteps
from celery.worker import state

from schemas.chunks import ChunkRef
from schemas.keys import TASK_SCORE_CHUNK
from store.chunk_ledger import Ledger
from store.connect import redis_client
from store.queueing import UNACKED_INDEX_KEY

logger = logging.getLogger(__name__)

LEASE_RENEWALS = 4  # renewals per lease length: a live worker can miss three in a row and keep its messages


# Messages this process holds outside Celery's task pool (workers.interactive's consumer): delivery tag -> the
# message's chunk reference (None until it is read).
held_elsewhere: dict[str, ChunkRef | None] = {}


def held_messages() -> dict[str, ChunkRef | None]:
    """Every message this worker process holds unacked, reserved or running (Celery's worker state keeps them in
    `requests`), and those held outside the pool: delivery tag -> its chunk reference (None for other tasks)."""
    held: dict[str, ChunkRef | None] = dict(held_elsewhere)
    for request in list(state.requests.values()):
        tag = getattr(request.message, "delivery_tag", None)
        if not tag:
            continue
        ref = None
        if request.name == TASK_SCORE_CHUNK and request.args:
            try:
                ref = ChunkRef.model_validate(request.args[0])
            except ValueError:
                ref = None
        held[str(tag)] = ref
    return held


def held_delivery_tags() -> list[str]:
    return list(held_messages())


def renew(client: redis.Redis, tags: list[str], now: float | None = None) -> int:
    """Move the messages' delivery times to now; only those still unacked (XX). Returns how many were renewed."""
    if not tags:
        return 0
    stamp = time.time() if now is None else now
    return int(client.zadd(UNACKED_INDEX_KEY, dict.fromkeys(tags, stamp), xx=True, ch=True) or 0)


class LeaseRenewal(bootsteps.StartStopStep):
    """A consumer step: a thread that renews the lease of every message this worker holds, every lease / 4."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, parent: Any) -> None:
        options = parent.app.conf.broker_transport_options
        period = options["visibility_timeout"] / LEASE_RENEWALS
        client = redis_client(parent.app.conf.rerank_redis_url, socket_timeout=period)
        # The consumer starts again after a lost connection. Messages delivered over the old one can no longer be
        # acked (Celery says so), and one only prefetched may never run: renewing them would keep them from Redis's
        # visibility restore forever. Their leases are left to run out, and they are delivered again.
        stale = frozenset(held_delivery_tags())
        # A fresh event per start: a thread of an earlier start still leaving must not be woken back into its loop.
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(client, period, self._stop, stale), name="lease", daemon=True
        )
        self._thread.start()

    def stop(self, parent: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    shutdown = stop

    @staticmethod
    def _run(client: redis.Redis, period: float, stop: threading.Event, stale: frozenset[str]) -> None:
        ledger = Ledger(client)
        while not stop.wait(period):
            try:
                held = {tag: ref for tag, ref in held_messages().items() if tag not in stale}
                renew(client, list(held))
                ledger.renew(ref for ref in held.values() if ref is not None)
            except redis.RedisError as exc:  # Redis away: the messages wait there, and are renewed when it is back
                logger.warning("lease renewal failed: %r", exc)


def keep_leases(app: Celery) -> None:
    """Run LeaseRenewal in the app's workers (they consume with the short lease)."""
    app.steps["consumer"].add(LeaseRenewal)
