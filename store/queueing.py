"""Celery configuration shared by the API (which only sends) and the workers (which consume), and the lanes chunk
messages travel in. Configuration only: the lease that live workers keep on their messages runs in the workers
(`workers.lease`).

Lanes. kombu keeps one Redis list per queue and priority step; `step_lane` names it. Each chunk message carries its
lane and a sequence number in it (`schemas.chunks.ChunkRef`), which the ledger uses to tell a chunk still waiting
in its list from one that left it. A worker takes from a queue's steps in order (BRPOP over the lists, step 0
first): bulk chunks go to the step of their job's priority; interactive chunks to the step of their tenant's share
(`interactive_steps`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from schemas.chunks import QUEUE_STEPS, ChunkRef
from schemas.jobs import JobKind
from schemas.keys import TASK_SCORE_CHUNK, bulk_queue, interactive_queue
from schemas.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

# Celery on Redis: priority 0 is served first. Jobs say 0 (lowest) .. 9 (highest), so the step is 9 - priority (the
# farm's scale is `schemas.chunks`'s; this is its one translation for the broker).
PRIORITY_STEPS = list(range(QUEUE_STEPS))


def bulk_queue_keys(model: str) -> list[str]:
    """The Redis lists kombu keeps for a model's bulk queue, one per priority step (step 0 has no suffix)."""
    return [step_lane(bulk_queue(model), step) for step in PRIORITY_STEPS]


def interactive_queue_keys(model: str) -> list[str]:
    """The Redis lists kombu keeps for a model's interactive queue, one per step of `interactive_steps`."""
    return [step_lane(interactive_queue(model), step) for step in PRIORITY_STEPS]


def celery_priority(job_priority: int) -> int:
    return 9 - job_priority


def step_lane(queue: str, step: int) -> str:
    """The Redis list kombu pushes a message of this queue and priority step to."""
    return queue if step == 0 else f"{queue}:{step}"


def job_lane(kind: JobKind, job_priority: int, model: str) -> str:
    """The lane of a job's chunks, in its model's queues: interactive chunks have one queue of their own, bulk
    chunks a step per priority."""
    if kind == JobKind.interactive:
        return interactive_queue(model)
    return step_lane(bulk_queue(model), celery_priority(job_priority))


def interactive_steps(chunks: int, chunk_size: int, ahead: int, share: int) -> list[int]:
    """Each chunk's step in the model's interactive queue: fair queueing between tenants on the broker's own steps.
    Chunk k of a call goes to step (ahead + k x chunk_size) // share, at most the last: `ahead` is the pairs of its
    tenant's interactive calls in flight when it was admitted (`store.interactive`), and `share` the pairs a worker
    takes in one wave (RERANK_INTERACTIVE_CHUNK_SIZE x RERANK_INTERACTIVE_SLOTS). So a call of a tenant with little
    in flight is taken before the calls of a tenant with much in flight, however long their queue: a tenant's
    20-document call waits for at most a wave of a flooding tenant's chunks, not for the whole flood. Each tenant's
    own calls keep their order (steps only rise with `ahead`), and so do a call's chunks. The step also sets the
    chunk's priority in the engine (`schemas.chunks.chunk_priority`): a worker holding a wave of a flooding tenant's
    chunks scores another tenant's step-0 chunk in its next pass, not after that wave."""
    last = PRIORITY_STEPS[-1]
    return [min(last, (ahead + k * chunk_size) // share) for k in range(chunks)]


def resend_lane(lane: str) -> str:
    """Where a chunk sent again goes: a bulk chunk to the bulk queue's first step, served before every other, so
    that it does not wait behind the backlog a second time; an interactive chunk to its own queue."""
    return lane.partition(":")[0]


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
