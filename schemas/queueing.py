"""Celery configuration shared by the API (which only sends) and the workers (which consume), and the lease that
live workers keep on the messages they hold.

The lease. kombu's Redis transport records every message a worker takes in the `unacked` hash and its delivery time
in the `unacked_index` sorted set; each worker's sweep (`restore_visible`, every `unacked_restore_interval`) puts
back on its queue any message whose time is older than `visibility_timeout`. The farm uses that timeout as a short
lease (`RERANK_VISIBILITY_TIMEOUT_S`, 20 s) and every live worker moves its messages' times forward every lease / 4
(`ZADD XX`: a message acked or restored meanwhile is not brought back). A worker that dies stops renewing, so its
chunks are queued again within the lease plus one sweep; a live worker's chunk keeps its lease however long it runs.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from celery import Celery, bootsteps
from celery.worker import state

from schemas.keys import QUEUE_BULK, TASK_SCORE_CHUNK
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


# kombu's names (its defaults, spelled out because the lease writes to the index).
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
UNACKED_MUTEX_KEY = "unacked_mutex"
SWEEP_INTERVAL_S = 5
LEASE_RENEWALS = 4  # renewals per lease length: a live worker can miss three in a row and keep its messages


def celery_config(settings: Settings) -> dict[str, Any]:
    transport = {
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
        "broker_url": settings.redis_url,
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


# Delivery tags of messages this process holds outside Celery's task pool (workers.interactive's consumer).
held_elsewhere: set[str] = set()


def held_delivery_tags() -> list[str]:
    """The delivery tags of every message this worker process holds unacked: reserved, running, or waiting for a
    retry's countdown (Celery's worker state keeps them all in `requests`), and those held outside the pool."""
    tags = list(held_elsewhere)
    for request in list(state.requests.values()):
        tag = getattr(request.message, "delivery_tag", None)
        if tag:
            tags.append(str(tag))
    return tags


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
        client = redis.Redis.from_url(parent.app.conf.broker_url, socket_timeout=period)
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
        while not stop.wait(period):
            try:
                renew(client, [tag for tag in held_delivery_tags() if tag not in stale])
            except redis.RedisError as exc:  # Redis away: the messages wait there, and are renewed when it is back
                logger.warning("lease renewal failed: %r", exc)


def keep_leases(app: Celery) -> None:
    """Run LeaseRenewal in the app's workers (scoring and webhooks alike: both consume with the short lease)."""
    app.steps["consumer"].add(LeaseRenewal)
