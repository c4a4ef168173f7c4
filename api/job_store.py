"""The API's view of jobs in Redis: submit (validate, record, enqueue chunks), read, assemble results, cancel."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import anyio
import redis.asyncio as aioredis
from celery import Celery

from schemas import keys
from schemas.chunks import chunk_count, split_into_chunks
from schemas.errors import InvalidRequest, JobNotFinished, JobNotFound, TooLarge, Unavailable
from schemas.jobs import ErrorInfo, Job, JobCreate, JobResults, JobStatus, Progress, RequestResults, rank
from schemas.queueing import celery_priority
from schemas.settings import Settings

logger = logging.getLogger(__name__)

JOB_ID = re.compile(r"^job_[0-9a-f]{32}$")

# KEYS: job. ARGV: now. Only a job that is not final yet can be cancelled.
_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1])
  return 1
end
return 0
"""


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _decode(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


class JobStore:
    def __init__(self, client: aioredis.Redis, celery: Celery, settings: Settings) -> None:
        self.redis = client
        self.celery = celery
        self.settings = settings
        self._cancel = client.register_script(_CANCEL)

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

    async def submit(self, body: JobCreate) -> Job:
        self.check_limits(body)
        job_id = f"job_{uuid.uuid4().hex}"
        total = body.total_pairs
        chunks = chunk_count(total, self.settings.chunk_size)
        record: dict[Any, Any] = {
            "id": job_id,
            "status": JobStatus.queued.value,
            "priority": body.priority,
            "created_at": _now(),
            "total": total,
            "completed": 0,
            "chunks_total": chunks,
            "chunks_done": 0,
            "request_count": len(body.requests),
            "metadata": json.dumps(body.metadata),
        }
        requests_meta = [
            {
                "custom_id": r.custom_id,
                "top_n": r.top_n,
                "n": len(r.documents),
                "texts": r.texts() if r.return_documents else None,
                "ids": r.document_ids(),
            }
            for r in body.requests
        ]
        ttl = self.settings.result_ttl_s
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.job_key(job_id), mapping=record)
            pipe.expire(keys.job_key(job_id), ttl)
            pipe.set(keys.job_input_key(job_id), json.dumps({"requests": requests_meta}), ex=ttl)
            await pipe.execute()
        try:
            await anyio.to_thread.run_sync(self._enqueue, job_id, body)
        except Exception as exc:
            logger.error("job %s: enqueue failed: %r", job_id, exc)
            await self.redis.hset(
                keys.job_key(job_id),
                mapping={
                    "status": "failed",
                    "error_code": "enqueue_failed",
                    "error_message": "the queue was unreachable",
                    "finished_at": _now(),
                },
            )
            raise Unavailable("the job queue is unreachable; retry later") from exc
        logger.info(
            "job %s queued: requests=%d pairs=%d chunks=%d priority=%d",
            job_id,
            len(body.requests),
            total,
            chunks,
            body.priority,
        )
        return _job({k: str(v) for k, v in record.items()}, {})

    def _enqueue(self, job_id: str, body: JobCreate) -> None:
        priority = celery_priority(body.priority)
        with self.celery.producer_or_acquire() as producer:
            for chunk in split_into_chunks(job_id, body.requests, self.settings.chunk_size, body.priority):
                self.celery.send_task(
                    keys.TASK_SCORE_CHUNK,
                    args=[chunk.model_dump()],
                    queue=keys.QUEUE_BULK,
                    priority=priority,
                    producer=producer,
                )

    async def _record(self, job_id: str) -> dict[str, str]:
        if not JOB_ID.match(job_id):
            raise JobNotFound(job_id)
        raw = await self.redis.hgetall(keys.job_key(job_id))
        if not raw:
            raise JobNotFound(job_id)
        return _decode(raw)

    async def get(self, job_id: str) -> Job:
        r = await self._record(job_id)
        workers = _decode(await self.redis.hgetall(keys.job_workers_key(job_id)))
        return _job(r, {k: int(v) for k, v in workers.items()})

    async def results(self, job_id: str) -> JobResults:
        r = await self._record(job_id)
        status = JobStatus(r["status"])
        if status is not JobStatus.succeeded:
            reason = f": {r['error_message']}" if r.get("error_message") else ""
            raise JobNotFinished(f"job {job_id} is {status.value}{reason}; results exist once it has succeeded")
        raw_input = await self.redis.get(keys.job_input_key(job_id))
        raw_scores = await self.redis.hgetall(keys.job_scores_key(job_id))
        if raw_input is None or len(raw_scores) != int(r["chunks_total"]):
            raise JobNotFound(job_id)
        flat: list[float] = []
        for index in range(int(r["chunks_total"])):
            flat.extend(json.loads(raw_scores[str(index).encode()]))
        data = []
        offset = 0
        for meta in json.loads(raw_input)["requests"]:
            scores = flat[offset : offset + meta["n"]]
            offset += meta["n"]
            data.append(
                RequestResults(
                    custom_id=meta["custom_id"], results=rank(scores, meta["top_n"], meta["texts"], meta["ids"])
                )
            )
        return JobResults(id=job_id, data=data)

    async def cancel(self, job_id: str) -> Job:
        await self._record(job_id)
        if await self._cancel(keys=[keys.job_key(job_id)], args=[_now()]):
            logger.info("job %s cancelled", job_id)
        return await self.get(job_id)

    async def live_workers(self) -> list[dict[str, Any]]:
        found = []
        async for key in self.redis.scan_iter(match=keys.WORKER_KEY_PATTERN, count=100):
            value = await self.redis.get(key)
            if value is not None:
                found.append(json.loads(value))
        return found


def _job(r: dict[str, str], workers: dict[str, int]) -> Job:
    error = ErrorInfo(code=r["error_code"], message=r.get("error_message", "")) if r.get("error_code") else None
    return Job(
        id=r["id"],
        status=JobStatus(r["status"]),
        priority=int(r["priority"]),
        metadata=json.loads(r.get("metadata") or "null"),
        created_at=datetime.fromisoformat(r["created_at"]),
        started_at=datetime.fromisoformat(r["started_at"]) if r.get("started_at") else None,
        finished_at=datetime.fromisoformat(r["finished_at"]) if r.get("finished_at") else None,
        progress=Progress(completed=int(r["completed"]), total=int(r["total"])),
        request_count=int(r["request_count"]),
        error=error,
        workers=workers,
    )
