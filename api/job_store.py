"""The API's view of jobs in Redis: submit (validate, record, enqueue chunks), read, assemble results, cancel."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import redis.asyncio as aioredis
from celery import Celery

from api.models import ModelCatalog
from schemas import keys, metrics
from schemas.chunks import ChunkRef, chunk_count, chunk_priority, split_into_chunks
from schemas.errors import (
    InvalidRequest,
    JobNotFinished,
    JobNotFound,
    Overloaded,
    StoreFull,
    TooLarge,
    Unavailable,
    WaitTimeout,
)
from schemas.jobs import Job, JobCreate, JobKind, JobResults, JobStatus, QueuePosition, RequestResults
from schemas.settings import Settings
from schemas.webhooks import WebhookEvent, WebhookState, destination
from store import backlog, dispatch, job_state, moves, redis_memory, webhook_queue, webhook_secrets
from store.chunk_ledger import Ledger
from store.codec import as_str, now_iso
from store.idempotency import Claim
from store.interactive import InteractiveLimits
from store.job_state import JobHandle, JobInput, JobRecord, JobView
from store.queueing import bulk_queue_keys, interactive_queue_keys, interactive_steps, job_lane, step_lane
from store.results import open_results
from webhooks.ssrf import UnsafeURL, resolve_checked

logger = logging.getLogger(__name__)

REPLICAS_CHECK_S = 5.0  # how often submit asks the Redis primary how many replicas it has
WAIT_GRACE_S = 5.0  # a wait's BLPOP that has not answered this long after its own timeout is given up

JOB_ID = re.compile(r"^job_[0-9a-f]{32}$")


class JobStore:
    def __init__(self, client: aioredis.Redis, celery: Celery, settings: Settings, waiter: aioredis.Redis) -> None:
        self.redis = client
        self.waiter = waiter
        self.celery = celery
        self.settings = settings
        self.run = moves.AsyncRunner(client)
        self.models = ModelCatalog(client, settings)
        self.ledger = Ledger(client)
        self.backlog = backlog.Backlog(client)
        self.interactive = InteractiveLimits(
            client, settings.interactive_max_pairs_per_tenant, settings.interactive_max_pairs
        )
        self._replica_count = 0
        self._replicas_checked = -REPLICAS_CHECK_S

    def check_limits(self, body: JobCreate) -> None:
        s = self.settings
        if len(body.requests) > s.max_requests_per_job:
            raise TooLarge(f"a job holds at most {s.max_requests_per_job} requests; this one has {len(body.requests)}")
        if body.total_pairs > s.max_pairs_per_job:
            raise TooLarge(f"a job holds at most {s.max_pairs_per_job} pairs; this one has {body.total_pairs}")
        for n, request in enumerate(body.requests):
            if len(request.documents) > s.max_documents_per_request:
                raise TooLarge(
                    f"requests[{n}] has {len(request.documents)} documents; the limit is {s.max_documents_per_request}"
                )
            if len(request.query) > s.max_query_chars or len(request.instruction or "") > s.max_query_chars:
                raise TooLarge(f"requests[{n}]: query and instruction are limited to {s.max_query_chars} characters")
            for d, text in enumerate(request.texts()):
                if len(text) > s.max_document_chars:
                    raise TooLarge(
                        f"requests[{n}].documents[{d}] has {len(text)} characters; the limit is {s.max_document_chars}"
                    )
            if request.top_n is not None and request.top_n > len(request.documents):
                raise InvalidRequest(
                    f"requests[{n}].top_n={request.top_n} exceeds its {len(request.documents)} documents"
                )

    async def admit(self, tenant: str, chunks: int, interactive: bool, model: str) -> None:
        """Push back (429 with Retry-After) before touching the queue: per-tenant rate limit, per-tenant jobs in
        flight, and, for bulk work, the depth of the model's bulk queue."""
        s = self.settings
        now = time.time()
        if s.rate_limit_per_minute:
            key = keys.tenant_rate_key(tenant, int(now // 60))
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, 120)
                count, _ = await pipe.execute()
            if count > s.rate_limit_per_minute:
                metrics.REQUESTS_REFUSED.labels("rate_limit").inc()
                raise Overloaded(
                    f"rate limit: {s.rate_limit_per_minute} submissions per minute",
                    headers={"Retry-After": str(60 - int(now) % 60)},
                )
        inflight_key = keys.tenant_inflight_key(tenant)
        if await self.redis.scard(inflight_key) >= s.max_jobs_in_flight_per_tenant:
            for raw in await self.redis.smembers(inflight_key):  # forget jobs that expired while in flight
                if not await self.redis.exists(keys.job_key(as_str(raw))):
                    await self.redis.srem(inflight_key, raw)
            if await self.redis.scard(inflight_key) >= s.max_jobs_in_flight_per_tenant:
                metrics.REQUESTS_REFUSED.labels("jobs_in_flight").inc()
                raise Overloaded(
                    f"{s.max_jobs_in_flight_per_tenant} jobs are already queued or running for this "
                    "tenant; wait for some to finish",
                    headers={"Retry-After": "10"},
                )
        if not interactive:
            waiting = await self.run(backlog.waiting(model))
            depth = waiting.chunks + sum(await self._lengths(bulk_queue_keys(model)))
            if depth + chunks > s.max_queue_depth:
                metrics.REQUESTS_REFUSED.labels("queue_depth").inc()
                raise Overloaded(
                    f"model {model}'s queue holds {depth} chunks, near its limit of {s.max_queue_depth}; retry later",
                    headers={"Retry-After": "30"},
                )

    async def check_webhook(self, url: str, tenant: str) -> None:
        """A job's webhook needs a secret to sign it with, and a URL the farm may reach."""
        stored = await self.redis.hget(keys.WEBHOOK_SECRETS, tenant)
        if not webhook_secrets.signing_secrets(self.settings, stored):
            raise InvalidRequest(webhook_secrets.missing_reason(self.settings, tenant))
        try:
            await anyio.to_thread.run_sync(resolve_checked, url, self.settings.webhook_allowlist)
        except UnsafeURL as exc:
            raise InvalidRequest(f"webhook.url: {exc}") from None

    async def submit(
        self,
        body: JobCreate,
        tenant: str,
        interactive: bool = False,
        max_prompt_tokens: int | None = None,
        claim: Claim | None = None,
        ahead: int = 0,
    ) -> Job:
        """Record the job and enqueue its chunks. A bulk job's chunks join its model's backlog, from which the
        model's lanes are fed in fair order (`store.backlog`). Interactive jobs go to their own queue, ahead of
        bulk work, placed in it by `ahead`, their tenant's interactive pairs in flight
        (`store.queueing.interactive_steps`), and push their final status to a list that `wait` blocks on. A job
        that would push Redis past its memory headroom is refused (`StoreFull`). An Idempotency-Key's `claim` is
        recorded in the creating transaction."""
        self.check_limits(body)
        model = await self.models.resolve(body.model)
        if body.webhook is not None:
            await self.check_webhook(body.webhook.url, tenant)
        job_id = f"job_{uuid.uuid4().hex}"
        total = body.total_pairs
        chunk_size = self.settings.interactive_chunk_size if interactive else self.settings.chunk_size
        chunks = chunk_count(total, chunk_size)
        await self.admit(tenant, chunks, interactive, model)
        record = JobRecord(
            id=job_id,
            tenant=tenant,
            model=model,
            kind=JobKind.interactive if interactive else JobKind.bulk,
            priority=body.priority,
            created_at=now_iso(),
            total=total,
            chunks_total=chunks,
            chunk_size=chunk_size,
            request_count=len(body.requests),
            notify=int(interactive),
            metadata=json.dumps(body.metadata),
        )
        if body.deadline_s is not None:
            record.deadline_at = (datetime.now(UTC) + timedelta(seconds=body.deadline_s)).isoformat()
        if body.webhook is not None:
            record.webhook_url = body.webhook.url
            record.webhook_dest = destination(body.webhook.url)
            record.webhook_events = json.dumps(body.webhook.events or [e.value for e in WebhookEvent])
        job_input = JobInput.of(body.requests)
        record.keep_input = int(job_input.echo)  # echoed texts are read from the chunks' inputs, kept for such jobs
        lane = job_lane(record.kind, body.priority, model)
        level = chunk_priority(record.kind, body.priority)
        lanes: list[str] = []
        levels: list[int] = []
        if interactive:  # each chunk's step by its tenant's share
            steps = interactive_steps(chunks, chunk_size, ahead, chunk_size * self.settings.interactive_slots)
            lanes = [step_lane(keys.interactive_queue(model), step) for step in steps]
            levels = [chunk_priority(record.kind, body.priority, step) for step in steps]
        chunk_list = list(split_into_chunks(job_id, body.requests, chunk_size, level, max_prompt_tokens, tenant))
        new_job = job_state.NewJob.of(record, job_input, chunk_list)
        del chunk_list
        needed = redis_memory.job_bytes(new_job.input_bytes, total, chunks)
        redis_memory.admit(await redis_memory.aread_memory(self.redis), self.settings.redis_memory_headroom, needed)
        ttl = self.settings.result_ttl_s
        async with self.redis.pipeline(transaction=True) as pipe:
            job_state.create(pipe, new_job, ttl)
            opened_at = len(pipe)  # where the ledger's reply (chunk 0's sequence number) will be
            if interactive:  # straight to the interactive queue
                await self.ledger.open_chunks(pipe, job_id, lanes, lane, ttl)
            else:  # into the model's backlog, fed to its lanes in fair order (`store.backlog`)
                await self.backlog.enqueue(pipe, model, job_id, tenant, body.priority, chunks, total)
            pipe.zadd(keys.recent_jobs_key(tenant), {job_id: time.time()})
            pipe.zremrangebyrank(keys.recent_jobs_key(tenant), 0, -keys.RECENT_JOBS_KEPT - 1)
            if claim is not None:
                claim.record(pipe, job_id)
            replies = await pipe.execute()
        refs = []
        if interactive:
            seqs = [int(seq) for seq in replies[opened_at]]
            refs = [
                ChunkRef(job_id=job_id, index=i, tenant=tenant, priority=levels[i], lane=lanes[i], seq=seqs[i])
                for i in new_job.chunk_inputs
            ]
        del new_job
        try:
            await self.replicated(job_id)
            await dispatch.asend(self.celery, refs)
        except Exception as exc:
            logger.error("job %s: enqueue failed: %r", job_id, exc)
            # The one path to a final state: the job leaves its tenant's in-flight set, a waiter and a webhook
            # hear of it. (Chunks sent before the failure find the job failed and are skipped.) The move is taken
            # by a full Redis too (`store.job_state`'s final moves).
            with contextlib.suppress(Exception):
                await self.run(JobHandle(job_id, tenant).fail("enqueue_failed", "the queue was unreachable"))
            if redis_memory.is_out_of_memory(exc):
                raise StoreFull(
                    "the job store is full: Redis refused the job's messages; retry later",
                    headers={"Retry-After": str(redis_memory.STORE_FULL_RETRY_AFTER_S)},
                ) from exc
            raise Unavailable("the job queue is unreachable; retry later") from exc
        if not interactive:
            await self.feed(model)
        metrics.JOBS_SUBMITTED.labels(record.kind, model).inc()
        logger.info(
            "job %s queued: model=%s requests=%d pairs=%d chunks=%d priority=%d",
            job_id,
            model,
            len(body.requests),
            total,
            chunks,
            body.priority,
        )
        return record.to_job()

    async def feed(self, model: str) -> None:
        """Top the model's lanes up from its backlog (`store.dispatch.afeed`). The job is safe in the backlog
        already: a feed that fails here is left to the workers' own (each take, and every recovery look)."""
        try:
            await dispatch.afeed(self.run, self.celery, self.settings, model)
        except Exception as exc:
            logger.warning("feeding model %s's lanes failed (its workers feed them too): %r", model, exc)

    async def replicated(self, job_id: str) -> None:
        """Where the Redis primary has replicas, wait (WAIT) until one has the job's writes, so that a failover
        cannot forget a job answered 202. Raises Unavailable when none confirms within the wait."""
        wait_ms = self.settings.redis_replica_wait_ms
        if not wait_ms or not await self._replicas():
            return
        acked = int(await self.redis.execute_command("WAIT", 1, wait_ms))
        if acked < 1 and await self._replicas(fresh=True):  # (none now: a failover promoted the only one)
            metrics.REQUESTS_REFUSED.labels("not_replicated").inc()
            raise Unavailable(f"job {job_id} did not reach a Redis replica within {wait_ms} ms")

    async def _replicas(self, fresh: bool = False) -> int:
        """The primary's connected replicas, asked at most every REPLICAS_CHECK_S (or now, when `fresh`)."""
        now = time.monotonic()
        if fresh or now - self._replicas_checked > REPLICAS_CHECK_S:
            info = await self.redis.info("replication")
            self._replica_count = int(info.get("connected_slaves", 0))
            self._replicas_checked = now
        return self._replica_count

    async def _view(self, job_id: str, tenant: str) -> JobView:
        """The job; JobNotFound for unknown ids and for another tenant's jobs alike."""
        if not JOB_ID.match(job_id):
            raise JobNotFound(job_id)
        view = await self.run(JobHandle(job_id, tenant).read())
        if view is None or view.record.tenant != tenant:
            raise JobNotFound(job_id)
        return view

    async def get(self, job_id: str, tenant: str) -> Job:
        """The job; a pending webhook shows when its paused destination is tried again."""
        view = await self._view(job_id, tenant)
        if job_state.past_deadline(view.record):  # the workers' recovery look expires it too: whoever comes first
            expired = await self.run(JobHandle(job_id, tenant).expire())
            view = expired.job or view
        job = view.to_job()
        record = view.record
        if record.kind == JobKind.bulk and not record.final and record.fed < record.chunks_total:
            at = await self.run(backlog.position(record.model, job_id, tenant, record.priority))
            if at.pairs_waiting:
                job.queue = QueuePosition(**dataclasses.asdict(at))
        if job.webhook is not None and record.webhook_state == WebhookState.pending:
            field = webhook_queue.breaker_field(tenant, record.webhook_dest or record.webhook_url)
            until = webhook_queue.paused_until(await self.redis.hget(keys.WEBHOOK_BREAKER, field))
            if until is not None:
                job.webhook.paused_until = datetime.fromtimestamp(until, UTC).isoformat()
        return job

    async def recent(self, limit: int, tenant: str) -> list[Job]:
        """The newest jobs first; expired ones are dropped from the index as they are met."""
        jobs = []
        for raw_id in await self.redis.zrevrange(keys.recent_jobs_key(tenant), 0, limit * 2):
            job_id = as_str(raw_id)
            try:
                jobs.append(await self.get(job_id, tenant))
            except JobNotFound:
                await self.redis.zrem(keys.recent_jobs_key(tenant), job_id)
            if len(jobs) == limit:
                break
        return jobs

    async def redeliver(self, job_id: str, tenant: str) -> Job:
        """Schedule the job's last webhook event again (same webhook-id, so receivers can de-duplicate)."""
        record = (await self._view(job_id, tenant)).record
        if not record.webhook_url:
            raise InvalidRequest(f"job {job_id} has no webhook")
        if not record.webhook_event:
            raise JobNotFinished(f"job {job_id} is {record.status}: its webhook event is sent when it ends")
        view = await self.run(JobHandle(job_id, tenant).redeliver())
        if view is None:  # expired since it was read
            raise JobNotFound(job_id)
        logger.info("job %s: webhook %s scheduled for redelivery", job_id, record.webhook_event)
        return view.to_job()

    async def _readable(self, job_id: str, tenant: str) -> JobRecord:
        """A job whose results can be read: succeeded, or expired (what was scored before its deadline)."""
        record = (await self._view(job_id, tenant)).record
        if record.status != JobStatus.succeeded and not self._expired(record):
            reason = f": {record.error_message}" if record.error_message else ""
            raise JobNotFinished(
                f"job {job_id} is {record.status}{reason}; results exist once it has succeeded (or, in part, once "
                "it has expired)"
            )
        return record

    @staticmethod
    def _expired(record: JobRecord) -> bool:
        return record.error_code == job_state.EXPIRED and record.chunk_size > 0

    async def stream_results(self, job_id: str, tenant: str) -> AsyncIterator[RequestResults]:
        """The job's results request by request (`store.results`): the API holds the input summary and a few
        chunks, never the job's whole results; an expired job's hold the pairs scored before its deadline. Raises
        (before the first result) as `results` does."""
        record = await self._readable(job_id, tenant)
        return await open_results(self.redis, record, partial=self._expired(record))

    async def results(self, job_id: str, tenant: str) -> JobResults:
        """The whole job's results in one object (interactive calls): `stream_results`, gathered."""
        return JobResults(id=job_id, data=[entry async for entry in await self.stream_results(job_id, tenant)])

    async def wait(self, job_id: str, tenant: str, timeout: float) -> Job:
        """Block (BLPOP on the job's done-list, no polling) until the job is final; WaitTimeout after `timeout`. The
        waiter's connection has no socket timeout (a BLPOP is silent until it ends): a connection that dies without
        a word is given up WAIT_GRACE_S after the BLPOP's own end."""
        try:
            async with asyncio.timeout(timeout + WAIT_GRACE_S):
                popped = await self.waiter.blpop([keys.job_done_key(job_id)], timeout=timeout)
        except TimeoutError:
            popped = None
        job = await self.get(job_id, tenant)
        if popped is None and not job.status.final:
            raise WaitTimeout(
                f"job {job_id} did not finish within {timeout:g}s; it goes on: poll /v1/jobs/{job_id}",
                job_id=job_id,
            )
        return job

    async def cancel(self, job_id: str, tenant: str, code: str = "", reason: str = "") -> Job:
        """Cancel a job that is not final yet: its chunks are dropped wherever they wait (queue, batcher, engine).
        `code` and `reason` say why when the farm, not the job's owner, cancels it."""
        await self._view(job_id, tenant)
        finished = await self.run(JobHandle(job_id, tenant).cancel(code, reason))
        if finished.job is None:  # expired since it was read
            raise JobNotFound(job_id)
        return finished.job.to_job()

    async def delete(self, job_id: str, tenant: str) -> None:
        """Free a finished job's record, inputs and results at once (its caller has them); 409 while it runs."""
        await self._view(job_id, tenant)
        outcome = await self.run(JobHandle(job_id, tenant).delete())
        if outcome is None:  # expired since it was read
            raise JobNotFound(job_id)
        if outcome != "deleted":
            raise JobNotFinished(f"job {job_id} is {outcome}: cancel it first, or delete it once it has ended")
        logger.info("job %s deleted", job_id)

    async def _lengths(self, names: list[str]) -> list[int]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.llen(name)
            return [int(n) for n in await pipe.execute()]

    async def queue_depths(self) -> dict[tuple[str, str], int]:
        """Messages waiting per (queue, model) for every served model (a queue's priority steps add up)."""
        queues: list[tuple[str, str, list[str]]] = []
        for model in await self.models.served():
            queues.append((keys.interactive_queue(model.name), model.name, interactive_queue_keys(model.name)))
            queues.append((keys.bulk_queue(model.name), model.name, bulk_queue_keys(model.name)))
        lengths = iter(await self._lengths([name for _, _, names in queues for name in names]))
        return {(queue, model): sum(next(lengths) for _ in names) for queue, model, names in queues}

    async def backlogs(self) -> dict[str, backlog.Waiting]:
        """What waits in each served model's backlog (`store.backlog`)."""
        return {model.name: await self.run(backlog.waiting(model.name)) for model in await self.models.served()}

    async def live_workers(self) -> list[dict[str, Any]]:
        found = []
        async for key in self.redis.scan_iter(match=keys.WORKER_KEY_PATTERN, count=100):
            value = await self.redis.get(key)
            if value is not None:
                found.append(json.loads(value))
        return found
