"""Celery configuration shared by the API (which only sends) and the workers (which consume), the lanes chunk
messages travel in, and the lease that live workers keep on the messages they hold.

The lease. kombu's Redis transport records every message a worker takes in the `unacked` hash and its delivery time
in the `unacked_index` sorted set; each worker's sweep (`restore_visible`, every `unacked_restore_interval`) puts
back on its queue any message whose time is older than `visibility_timeout`. The farm uses that timeout as a short
lease (`RERANK_VISIBILITY_TIMEOUT_S`, 20 s) and every live worker moves its messages' times forward every lease / 4
(`ZADD XX`: a message acked or restored meanwhile is not brought back). A worker that dies stops renewing, so its
chunks are queued again within the lease plus one sweep; a live worker's chunk keeps its lease however long it runs.
The same renewal vouches for the chunks in the farm's own ledger (`store.chunk_ledger`), which finds the chunks
that kombu loses (a pop before its unacked record, a late ack, a failover) and sends them again.

Lanes. kombu keeps one Redis list per queue and priority step; `lane_for` names it. Each chunk message carries its
lane and a sequence number in it (`schemas.chunks.ChunkRef`), which the ledger uses to tell a chunk still waiting
in its list from one that left it.
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
from schemas.keys import QUEUE_BULK, QUEUE_INTERACTIVE, TASK_SCORE_CHUNK
from schemas.settings import Settings

logger = logging.getLogger(__name__)

# Celery on Redis: priority 0 is served first. Jobs say 0 (lowest) .. 9 (highest), so the step is 9 - priority.
PRIORITY_STEPS = list(range(10))


# The batcher's level for interactive chunks: above every bulk priority (0..9).
INTERACTIVE_PRIORITY = 10


def bulk_queue_keys() -> list[str]:
    """The Redis lists kombu keeps for the bulk queue, one per priority step (step 0 has no suffix)."""
    return [QUEUE_BULK] + [f"{QUEUE_BULK}:{step}" for step in PRIORITY_STEPS[1:]]


def celery_priority(job_priority: int) -> int:
    return 9 - job_priority


def lane_for(queue: str, step: int) -> str:
    """The Redis list kombu pushes a message of this queue and priority step to."""
    return queue if step == 0 else f"{queue}:{step}"


def lane_of(kind: str, job_priority: int) -> str:
    """The lane of a job's chunks: interactive chunks have one queue of their own, bulk chunks a step per priority."""
    return QUEUE_INTERACTIVE if kind == "interactive" else lane_for(QUEUE_BULK, celery_priority(job_priority))


def resend_lane(lane: str) -> str:
    """Where a chunk sent again goes: a bulk chunk to the bulk queue's first step, served before every other, so
    that it does not wait behind the backlog a second time; an interactive chunk to its own queue."""
    return lane.partition(":")[0]


def batcher_priority(kind: str, job_priority: int) -> int:
    return INTERACTIVE_PRIORITY if kind == "interactive" else job_priority


def publish(app: Celery, refs: list[ChunkRef]) -> None:
    """Send chunk messages, each to its lane, in the order given (the order of their sequence numbers)."""
    with app.producer_or_acquire() as producer:
        for ref in refs:
            queue, _, step = ref.lane.partition(":")
            app.send_task(
                TASK_SCORE_CHUNK,
                args=[ref.model_dump()],
                queue=queue,
                priority=int(step or 0),
                producer=producer,
            )


# kombu's names (its defaults, spelled out because the lease writes to the index).
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
UNACKED_MUTEX_KEY = "unacked_mutex"
SWEEP_INTERVAL_S = 5
LEASE_RENEWALS = 4  # renewals per lease length: a live worker can miss three in a row and keep its messages


def celery_config(settings: Settings) -> dict[str, Any]:
    from store.connect import broker

    broker_url, broker_options = broker(settings.redis_url)
    transport = {
        **broker_options,
        "visibility_timeout": settings.visibility_timeout_s,
        "unacked_key": UNACKED_KEY,
        "unacked_index_key": UNACKED_INDEX_KEY,
        "unacked_mutex_key": UNACKED_MUTEX_KEY,
        # A worker killed during its sweep holds the sweep's mutex until it expires (kombu: 300 s).
        "unacked_mutex_expire": 10,
        # Sweep for messages of dead workers every 5 s (kombu's default is about every 100 s), so a chunk comes
        # back within the lease + 5 s.
        "unacked_restore_interval": SWEEP_INTERVAL_S,
        "unacked_restore_throttle": 1,
        "queue_order_strategy": "priority",
        "priority_steps": PRIORITY_STEPS,
        "sep": ":",
    }
    return {
        "broker_url": broker_url,
        "rerank_redis_url": settings.redis_url,  # the farm's own clients (the lease) connect with this
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # Results and progress live in our own Redis keys; Celery's result backend is not used.
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        # At-least-once: a chunk is acked after its scores are stored, and comes back if its worker dies.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": QUEUE_BULK,
        "task_routes": {TASK_SCORE_CHUNK: {"queue": QUEUE_BULK}},
        "task_create_missing_queues": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
    }


def worker_argv(hostname: str, queues: list[str], concurrency: int, loglevel: str, task_events: bool) -> list[str]:
    """`celery worker` arguments of every farm worker, scoring or webhooks: the `threads` pool (prefork children are
    daemonic and cannot start vLLM's engine process; `solo` holds acks until a task returns), queues consumed in
    the order given, no mingle or gossip (the farm's workers share nothing through them)."""
    argv = ["worker", "--pool", "threads", "--concurrency", str(concurrency), "--hostname", hostname]
    argv += ["--queues", ",".join(queues), "--loglevel", loglevel, "--without-mingle", "--without-gossip"]
    return argv + (["--task-events"] if task_events else [])


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
        from store.connect import redis_client

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
        from store.chunk_ledger import Ledger

        ledger = Ledger(client)
        while not stop.wait(period):
            try:
                held = {tag: ref for tag, ref in held_messages().items() if tag not in stale}
                renew(client, list(held))
                ledger.renew(ref for ref in held.values() if ref is not None)
            except redis.RedisError as exc:  # Redis away: the messages wait there, and are renewed when it is back
                logger.warning("lease renewal failed: %r", exc)


def keep_leases(app: Celery) -> None:
    """Run LeaseRenewal in the app's workers (scoring and webhooks alike: both consume with the short lease)."""
    app.steps["consumer"].add(LeaseRenewal)
