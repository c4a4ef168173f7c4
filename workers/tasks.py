"""Scoring one chunk of a job (`score`), and the Celery task that runs it for bulk chunks. Interactive chunks run
the same `score` from `workers.interactive`'s consumer. Thin: the work is in scoring, the engine and the job's moves
(`store.job_state.JobHandle`). A message names its chunk (`ChunkRef`); the chunk's input is read from Redis as the
chunk is taken."""

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
from schemas.chunks import INTERACTIVE_PRIORITY, ChunkRef
from schemas.errors import InvalidInput
from schemas.jobs import JobStatus
from schemas.keys import TASK_SCORE_CHUNK
from store.job_state import JobHandle
from store.redis_memory import is_out_of_memory
from workers import runtime, scoring
from workers.celery_app import app
from workers.engines.base import Cancelled, Scoring

logger = logging.getLogger(__name__)

CANCEL_POLL_S = 0.5  # how often a waiting task asks whether its job was cancelled (one HGET per chunk in flight)


@app.task(name=TASK_SCORE_CHUNK, bind=True)
def score_chunk(self: Task, chunk: dict[str, Any]) -> str:
    try:
        return score(chunk, self.request.hostname or "unknown")
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        # Redis stayed away longer than the store's retries: give the message back rather than ack a lost chunk.
        # If Redis is still down, the message stays unacked there and the sweep restores it; the ledger holds the
        # chunk open either way.
        logger.warning("chunk of job %s given back: Redis unavailable (%r)", chunk.get("job_id"), exc)
        raise Reject(exc, requeue=True) from exc


def _wait(submission: Scoring, is_cancelled: Callable[[], bool], timeout: float) -> list[float]:
    """The submission's scores. Meanwhile this (task) thread asks Redis every CANCEL_POLL_S whether the job was
    cancelled, and cancels the submission if so: the engine's thread only reads a flag and never waits on Redis."""
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


def score(message: dict[str, Any], hostname: str) -> str:
    """Take the chunk a message names, score it and record it; returns the outcome. A failed engine call sends the
    chunk again (after a backoff) while its sends allow, else fails the job. Raises redis-py's errors when Redis
    stayed away (the caller gives the message back). A Redis that stays full (refusing the take or the record for
    RERANK_STORE_FULL_WAIT_S) fails the job with `store_full`. Any other error is a bug: the job fails with
    `internal_error` and the traceback is logged, rather than the chunk going round through re-sends."""
    ref = ChunkRef.model_validate(message)
    try:
        return _score(ref, hostname)
    except (redis.ConnectionError, redis.TimeoutError):
        raise
    except Exception as exc:
        rt = runtime.get()
        if is_out_of_memory(exc):  # Redis stayed full for RERANK_STORE_FULL_WAIT_S: the job ends, with the reason
            reason = f"chunk {ref.index}: Redis is full: {exc}"
            logger.error("job %s failed, Redis full for %g s: %s", ref.job_id, rt.settings.store_full_wait_s, reason)
            rt.run(JobHandle(ref.job_id, ref.tenant).fail("store_full", reason))
            return "failed"
        logger.exception("job %s chunk %d: scoring failed", ref.job_id, ref.index)
        rt.run(JobHandle(ref.job_id, ref.tenant).fail("internal_error", f"chunk {ref.index}: scoring failed: {exc!r}"))
        return "failed"


def _score(ref: ChunkRef, hostname: str) -> str:
    rt = runtime.get()
    job, job_id = JobHandle(ref.job_id, ref.tenant), ref.job_id
    logger.info("job %s chunk %d taken", job_id, ref.index, extra=_event("chunk.taken", ref))
    outcome, chunk, _ = rt.with_room(rt.run, job.take(ref.index, hostname, ref.lane, ref.seq))
    if ref.priority < INTERACTIVE_PRIORITY:  # a bulk chunk left its lane: feed the lane from the backlog
        _feed(rt)
    if chunk is None:
        if outcome == "duplicate":  # a second message for a chunk recorded already: counted once
            logger.info("job %s chunk %d skipped: duplicate (recorded already)", job_id, ref.index,
                        extra=_event("chunk.done", ref, "duplicate"))  # fmt: skip
        else:
            logger.info("job %s chunk %d skipped: job is %s", job_id, ref.index, outcome,
                        extra=_event("chunk.done", ref, outcome))  # fmt: skip
        return "skipped"
    started_at = time.perf_counter()
    try:
        prepared = scoring.prepare(rt.prompts, chunk)
    except InvalidInput as exc:  # input the limits reject fails again: no retry
        logger.warning("job %s chunk %d: input rejected: %s", job_id, ref.index, exc.message)
        rt.run(job.fail("invalid_input", f"chunk {ref.index}: {exc.message}"))
        return "failed"
    tokenized_at = time.perf_counter()
    submission = rt.engine.submit(prepared.prompts, ref.priority)
    try:
        # Bounded, so that a stuck engine gives the chunk up (and sends it again) instead of holding it for ever.
        scores = _wait(submission, lambda: _ended(rt.run(job.status())), rt.settings.chunk_timeout_s)
    except Cancelled:
        status = rt.run(job.status())
        logger.info("job %s chunk %d dropped: job is %s", job_id, ref.index, status.value if status else "gone",
                    extra=_event("chunk.done", ref, "dropped"))  # fmt: skip
        return "cancelled"
    except (Exception, FutureTimeout) as exc:
        return _send_again_or_fail(ref, exc)
    scored_at = time.perf_counter()
    result = scoring.aggregate(prepared, scores)
    timings_ms = (round((tokenized_at - started_at) * 1000), round((scored_at - tokenized_at) * 1000))
    move = job.record_chunk(ref.index, result.model_dump_json(), len(result.scores), hostname, result.tokens,
                            rt.settings.result_ttl_s, *timings_ms)  # fmt: skip
    outcome = rt.with_room(rt.run, move).outcome
    if outcome in ("recorded", "finished"):
        metrics.PAIRS_SERVED.labels(rt.settings.served_name, ref.tenant).inc(prepared.pairs)
    seconds = time.perf_counter() - started_at
    logger.info(
        "job %s chunk %d: %d pairs, %d tokens in %.3fs (%s)",
        job_id,
        ref.index,
        prepared.pairs,
        result.tokens,
        seconds,
        outcome,
        extra=_event("chunk.done", ref, outcome, pairs=prepared.pairs, seconds=round(seconds, 3)),
    )
    return outcome


def _event(name: str, ref: ChunkRef, outcome: str | None = None, **more: Any) -> dict[str, Any]:
    """A chunk event's fields on its log line (RERANK_LOG_FORMAT=json writes them): `chunk.taken`; `chunk.done` with
    its outcome: `recorded` or `finished` (with `pairs` and `seconds`), `duplicate` (recorded already), the status
    of a job that ended before the take (`cancelled`, `failed`, `succeeded`, `gone`), or `dropped` (cancelled while
    it was scored)."""
    fields: dict[str, Any] = {"event": name, "job": ref.job_id, "chunk": ref.index, **more}
    if outcome is not None:
        fields["outcome"] = outcome
    return fields


def _ended(status: JobStatus | None) -> bool:
    """True when the job is gone, cancelled, failed or already done: its remaining chunks need no scoring."""
    return status is None or status.final


def _feed(rt: runtime.Runtime) -> None:
    try:
        rt.dispatcher.feed(rt.settings.served_name)
    except Exception as exc:  # the chunk is scored all the same; the next take or recovery look feeds the lane
        logger.warning("feeding the lanes failed: %r", exc)


def _send_again_or_fail(ref: ChunkRef, exc: BaseException) -> str:
    """An engine call failed: after a backoff, the chunk is sent again, or its job fails once it was sent
    RERANK_CHUNK_MAX_RETRIES + 1 times (`store.dispatch`)."""
    rt = runtime.get()
    if ref.send <= rt.settings.chunk_max_retries:
        logger.warning("job %s chunk %d: engine failed (%r), sending it again", ref.job_id, ref.index, exc)
        time.sleep(min(2 ** (ref.send - 1), 30))
    outcome = rt.dispatcher.send_again(ref, "engine_error", f"engine failed: {exc!r}")
    return {"sent": "sent again", "exhausted": "failed"}.get(outcome, outcome)  # or recorded, raced, gone meanwhile
