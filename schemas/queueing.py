"""Celery configuration shared by the API (which only sends) and the workers (which consume)."""

from __future__ import annotations

from typing import Any

from schemas.keys import QUEUE_BULK, TASK_SCORE_CHUNK
from schemas.settings import Settings

# Celery on Redis: priority 0 is served first. Jobs say 0 (lowest) .. 9 (highest), so the step is 9 - priority.
PRIORITY_STEPS = list(range(10))


# The batcher's level for interactive chunks: above every bulk priority (0..9).
INTERACTIVE_PRIORITY = 10


def bulk_queue_keys() -> list[str]:
    """The Redis lists kombu keeps for the bulk queue, one per priority step (step 0 has no suffix)."""
    return [QUEUE_BULK] + [f"{QUEUE_BULK}:{step}" for step in PRIORITY_STEPS[1:]]


def celery_priority(job_priority: int) -> int:
    return 9 - job_priority


def celery_config(settings: Settings) -> dict[str, Any]:
    transport = {
        "visibility_timeout": settings.visibility_timeout_s,
        # Sweep for messages of dead workers every 5 s (kombu's default is about every 100 s), so a chunk comes
        # back within the visibility timeout + 5 s.
        "unacked_restore_interval": 5,
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
