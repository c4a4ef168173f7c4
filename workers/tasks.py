"""Scoring one chunk of a job (`score`), and the Celery task that runs it for bulk chunks. Interactive chunks run
the same `score` from `workers.interactive`'s consumer. Thin: the work is in scoring, the batcher and the job store."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import redis
from celery import Task
from celery.exceptions import Reject

from schemas import metrics
from schemas.chunks import Chunk
from schemas.keys import TASK_SCORE_CHUNK
from workers import runtime, scoring
from workers.batcher import Cancelled, Submission
from workers.celery_app import app

logger = logging.getLogger(__name__)

CANCEL_POLL_S = 0.5  # how often a waiting task asks whether its job was cancelled (one HGET per chunk in flight)


class Retry(Exception):
    """The engine call failed and the chunk has attempts left: run it again after `countdown` seconds."""

    def __init__(self, exc: BaseException, countdown: float) -> None:
        super().__init__(repr(exc))
        self.exc, self.countdown = exc, countdown


@app.task(name=TASK_SCORE_CHUNK, bind=True, max_retries=None)
def score_chunk(self: Task, chunk: dict[str, Any]) -> str:
    try:
        return score(chunk, self.request.hostname or "unknown", self.request.retries)
    except Retry as retry:
        raise self.retry(exc=retry.exc, countdown=retry.countdown) from retry.exc
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        # Redis stayed away longer than the store's retries: give the message back rather than ack a lost chunk.
        # If Redis is still down, the message stays unacked there and the sweep restores it.
        logger.warning("chunk of job %s given back: Redis unavailable (%r)", chunk.get("job_id"), exc)
        raise Reject(exc, requeue=True) from exc


def _wait(submission: Submission, is_cancelled: Callable[[], bool], timeout: float) -> list[float]:
    """The submission's scores. Meanwhile this (task) thread asks Redis every CANCEL_POLL_S whether the job was
    cancelled, and cancels the submission if so: the batcher's feeders only read a flag and never wait on Redis."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return submission.future.result(timeout=min(CANCEL_POLL_S, max(0.0, deadline - time.monotonic())))
        except FutureTimeout:
            if time.monotonic() >= deadline:
                raise
        try:
            if is_cancelled():
                submission.cancel()
        except redis.RedisError as exc:  # a blip: score on, ask again next time
            logger.warning("cancellation check failed: %r", exc)


def score(chunk: dict[str, Any], hostname: str, retries: int) -> str:
    """Score one chunk and record it; returns the outcome. Raises Retry when the engine failed and attempts are left,
    and redis-py's errors when Redis stayed away (the caller gives the message back)."""
    rt = runtime.get()
    c = Chunk.model_validate(chunk)
    store, job_id = rt.store, c.job_id
    logger.info("job %s chunk %d taken", job_id, c.index)
    if store.should_skip(job_id):
        logger.info("job %s chunk %d skipped: job is %s", job_id, c.index, store.status(job_id) or "gone")
        return "skipped"
    if store.mark_running(job_id):
        logger.info("job %s running", job_id)
    started = time.perf_counter()
    try:
        prepared = scoring.prepare(rt.prompts, c)
    except Exception as exc:  # input the tokenizer rejects will fail again: no retry
        logger.warning("job %s chunk %d: input rejected: %r", job_id, c.index, exc)
        message = getattr(exc, "message", None) or f"the tokenizer rejected the input ({exc!r})"
        if store.fail(job_id, "invalid_input", f"chunk {c.index}: {message}", c.tenant):
            metrics.JOBS_FINISHED.labels("failed").inc()
        return "failed"
    submission = rt.batcher.submit(prepared.prompts, c.priority)
    try:
        # Bounded, so that a stuck engine gives the chunk up (and retries it) instead of holding it for ever.
        scores = _wait(submission, lambda: store.should_skip(job_id), rt.settings.chunk_timeout_s)
    except Cancelled:
        logger.info("job %s chunk %d dropped: job is %s", job_id, c.index, store.status(job_id))
        return "cancelled"
    except (Exception, FutureTimeout) as exc:
        if retries < rt.settings.chunk_max_retries:
            logger.warning("job %s chunk %d: engine failed (%r), retry %d", job_id, c.index, exc, retries + 1)
            raise Retry(exc, countdown=min(2**retries, 30)) from exc
        message = f"chunk {c.index} failed after {retries + 1} attempts: {exc!r}"
        if store.fail(job_id, "engine_error", message, c.tenant):
            metrics.JOBS_FINISHED.labels("failed").inc()
        logger.error("job %s failed: chunk %d: %r", job_id, c.index, exc)
        return "failed"
    result = scoring.aggregate(prepared, scores)
    outcome = store.record_chunk(job_id, c.index, result, hostname, c.tenant)
    logger.info(
        "job %s chunk %d: %d pairs, %d tokens in %.3fs (%s)",
        job_id,
        c.index,
        prepared.pairs,
        result.tokens,
        time.perf_counter() - started,
        outcome,
    )
    if outcome == "finished":
        metrics.JOBS_FINISHED.labels("succeeded").inc()
        latency = store.latency(job_id)
        if latency is not None:
            metrics.JOB_LATENCY.labels(latency[0]).observe(latency[1])
        logger.info("job %s succeeded", job_id)
    return outcome
