"""Batches (OpenAI's Batch API, Voyage's batch) as a thin layer over jobs: a batch is one job.

Creating a batch reads its input file line by line: each line is a call (`url`, or the batch's endpoint, and its
`body`) parsed by the same shape classes as the interactive routes (`api.shapes`), turned into the job's
requests; any bad line fails the batch at validation, with the lines at fault listed, before anything is queued.
What each line needs to render its answer (custom_id, shape, options, how many requests it became) is kept in a
Redis list beside the batch. A batch's status is its job's; its output file is not stored but written as it is read,
from the job's results and those line records, one line per input line, in input order.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio
import redis.asyncio as aioredis
from pydantic import ValidationError
from pydantic_core import to_jsonable_python

from api.file_store import FileStore
from api.job_store import JobStore
from api.pagination import newest_first
from api.shapes import CALLS, SHAPE_TAGS, Answer, Shape, render, shape_of
from schemas import keys
from schemas.batches import (
    BATCH_ENDPOINTS,
    Batch,
    BatchCreate,
    BatchError,
    BatchErrors,
    BatchStatus,
    FileObject,
    OutputLine,
    OutputResponse,
    PairProgress,
    RequestCounts,
    endpoint_path,
)
from schemas.errors import BatchNotFound, FileNotFound, JobNotFinished, JobNotFound, describe_validation
from schemas.jobs import Job, JobCreate, JobStatus, RequestResults, RerankRequest
from schemas.settings import Settings
from store.codec import decode_hash
from store.idempotency import Claim
from store.job_state import EXPIRED

logger = logging.getLogger(__name__)

MAX_LINE_ERRORS = 100  # validation stops listing bad lines after this many
LINES_PER_READ = 1000  # line records read per Redis round trip while output is written
OUTPUT_SUFFIX = "-output"


def _epoch(stamp: datetime | None) -> int | None:
    return int(stamp.timestamp()) if stamp is not None else None


def batch_id_of(job_id: str) -> str:
    """A batch's id, from its job's."""
    return "batch_" + job_id.removeprefix("job_")


def output_file_id(batch_id: str) -> str:
    return f"file-{batch_id.removeprefix('batch_')}{OUTPUT_SUFFIX}"


def batch_of_output(file_id: str) -> str | None:
    """The batch whose output file this is, or None for an uploaded file."""
    if not file_id.endswith(OUTPUT_SUFFIX):
        return None
    return "batch_" + file_id.removeprefix("file-").removesuffix(OUTPUT_SUFFIX)


@dataclass
class Plan:
    """An input file, read: the job's requests, a record per line, or the lines at fault."""

    requests: list[RerankRequest] = field(default_factory=list)
    model: str | None = None  # the one model the lines name (None: the farm's default)
    lines: list[str] = field(default_factory=list)  # JSON [custom_id, shape, render options, requests]
    errors: list[BatchError] = field(default_factory=list)


def read_plan(lines: Iterable[bytes], endpoint: str, defaults: dict[str, Any]) -> Plan:
    """Parse every line of a batch input file (OpenAI `{custom_id, method, url, body}`; Voyage `{custom_id, body}`)."""
    plan = Plan()
    seen: set[str] = set()

    def fail(n: int, code: str, message: str, param: str | None = None) -> None:
        plan.errors.append(BatchError(code=code, message=message, param=param, line=n))

    for n, raw in enumerate(lines, 1):
        if len(plan.errors) >= MAX_LINE_ERRORS:
            break
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            fail(n, "invalid_json", "the line is not valid JSON")
            continue
        if not isinstance(line, dict) or not isinstance(line.get("body"), dict):
            fail(n, "invalid_request", "a line is an object with `custom_id` and a `body` object", "body")
            continue
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id.strip() or len(custom_id) > 512:
            fail(n, "invalid_request", "`custom_id` must be a non-empty string of up to 512 characters", "custom_id")
            continue
        if custom_id in seen:
            fail(n, "duplicate_custom_id", f"custom_id {custom_id!r} appears on an earlier line", "custom_id")
            continue
        seen.add(custom_id)
        if str(line.get("method", "POST")).upper() != "POST":
            fail(n, "invalid_request", "`method` must be POST", "method")
            continue
        url = endpoint_path(str(line.get("url") or endpoint))
        if url not in BATCH_ENDPOINTS:
            fail(n, "invalid_url", f"`url` must be one of {', '.join(BATCH_ENDPOINTS)}", "url")
            continue
        body = {**defaults, **line["body"]}
        shape = shape_of(url, body)
        try:
            call = CALLS[shape].model_validate(body)
            requests = call.requests(url != "/v2/rerank")  # Cohere v2 returns documents only when asked
        except ValidationError as exc:
            fail(n, "invalid_request", describe_validation(exc.errors(), skip=SHAPE_TAGS), "body")
            continue
        if call.max_prompt_tokens is not None:
            fail(n, "invalid_request", "truncate_prompt_tokens is not served in batches: use max_tokens_per_doc")
            continue
        model = call.model
        if model and plan.model and model != plan.model:
            fail(n, "model_mismatch", f"a batch uses one model: this line names {model!r}, earlier ones {plan.model!r}")
            continue
        plan.model = plan.model or model
        plan.requests.extend(requests)
        plan.lines.append(json.dumps([custom_id, shape.value, call.render_options(), len(requests)]))
    if not plan.lines and not plan.errors:
        plan.errors.append(BatchError(code="empty_file", message="the input file holds no lines"))
    return plan


class BatchStore:
    def __init__(self, client: aioredis.Redis, jobs: JobStore, files: FileStore, settings: Settings) -> None:
        self.redis = client
        self.jobs = jobs
        self.files = files
        self.settings = settings

    async def create(self, body: BatchCreate, tenant: str, claim: Claim | None = None) -> Batch:
        """Validate the input file and queue its job; a file with bad lines gives a failed batch naming them."""
        lines = await self.files.lines(body.input_file_id, tenant)  # 404 unless the tenant's own
        plan = await anyio.to_thread.run_sync(read_plan, lines, body.endpoint, body.request_params or {})
        now = int(time.time())
        record: dict[Any, Any] = {
            "tenant": tenant,
            "endpoint": body.endpoint,
            "input_file_id": body.input_file_id,
            "completion_window": body.completion_window,
            "metadata": json.dumps(body.metadata),
            "created_at": now,
            "expires_at": now + body.window_s,
            "lines": len(plan.lines),
        }
        if plan.errors:
            batch_id = f"batch_{uuid.uuid4().hex}"
            record["errors"] = BatchErrors(data=plan.errors).model_dump_json()
            record["failed_at"] = now
            logger.info("batch %s failed validation: %d bad lines", batch_id, len(plan.errors))
        else:
            create = JobCreate(
                model=plan.model, requests=plan.requests, metadata=body.metadata, deadline_s=body.window_s
            )  # the window is the job's deadline: past it the job ends expired, as every job with a deadline
            job = await self.jobs.submit(create, tenant, claim=claim)
            plan.requests = []  # the job has them now
            batch_id = batch_id_of(job.id)
            record["job_id"] = job.id
            ttl = self.settings.result_ttl_s
            async with self.redis.pipeline(transaction=False) as pipe:
                for start in range(0, len(plan.lines), LINES_PER_READ):
                    pipe.rpush(keys.batch_lines_key(batch_id), *plan.lines[start : start + LINES_PER_READ])
                pipe.expire(keys.batch_lines_key(batch_id), ttl)
                await pipe.execute()
            logger.info("batch %s: %d lines queued as job %s", batch_id, len(plan.lines), job.id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.batch_key(batch_id), mapping=record)
            pipe.expire(keys.batch_key(batch_id), self.settings.result_ttl_s)
            pipe.zadd(keys.tenant_batches_key(tenant), {batch_id: now})
            await pipe.execute()
        return await self.get(batch_id, tenant)

    async def _record(self, batch_id: str, tenant: str) -> dict[str, str]:
        raw = decode_hash(await self.redis.hgetall(keys.batch_key(batch_id))) if batch_id.startswith("batch_") else {}
        if not raw or raw["tenant"] != tenant:
            raise BatchNotFound(batch_id)
        return raw

    async def get(self, batch_id: str, tenant: str) -> Batch:
        return (await self._read(batch_id, tenant))[0]

    async def _read(self, batch_id: str, tenant: str) -> tuple[Batch, Job | None]:
        """The batch, and its job (None for a batch that failed validation)."""
        record = await self._record(batch_id, tenant)
        lines = int(record["lines"])
        batch = Batch(
            id=batch_id,
            endpoint=record["endpoint"],
            input_file_id=record["input_file_id"],
            completion_window=record["completion_window"],
            status="failed",
            created_at=int(record["created_at"]),
            expires_at=int(record["expires_at"]),
            request_counts=RequestCounts(total=lines, completed=0, failed=0),
            metadata=json.loads(record["metadata"]),
            job_id=record.get("job_id"),
        )
        if "errors" in record:  # failed validation: no job
            batch.errors = BatchErrors.model_validate_json(record["errors"])
            batch.failed_at = int(record["failed_at"])
            return batch, None
        try:
            job = await self.jobs.get(record["job_id"], tenant)
        except JobNotFound:
            raise BatchNotFound(batch_id) from None
        return self._with_job(batch, job, record), job

    @staticmethod
    def _with_job(batch: Batch, job: Job, record: dict[str, str]) -> Batch:
        lines = batch.request_counts.total
        batch.in_progress_at = batch.created_at
        batch.progress = PairProgress(completed=job.progress.completed, total=job.progress.total)
        finished = _epoch(job.finished_at)
        status: BatchStatus = "in_progress"
        if job.status is JobStatus.succeeded:
            status, batch.completed_at, batch.finalizing_at = "completed", finished, finished
            batch.output_file_id = output_file_id(batch.id)
            batch.request_counts = RequestCounts(total=lines, completed=lines, failed=0)
        elif job.status is JobStatus.failed and job.error is not None and job.error.code == EXPIRED:
            status, batch.expired_at = "expired", finished  # its completion window (the job's deadline) passed
        elif job.status is JobStatus.failed:
            status, batch.failed_at = "failed", finished
            batch.request_counts = RequestCounts(total=lines, completed=0, failed=lines)
            if job.error is not None:
                batch.errors = BatchErrors(data=[BatchError(code=job.error.code, message=job.error.message)])
        elif job.status is JobStatus.cancelled:
            status, batch.cancelling_at, batch.cancelled_at = "cancelled", finished, finished
        batch.status = status
        return batch

    async def cancel(self, batch_id: str, tenant: str) -> Batch:
        record = await self._record(batch_id, tenant)
        if "job_id" in record:
            await self.jobs.cancel(record["job_id"], tenant)
            logger.info("batch %s cancelled", batch_id)
        return await self.get(batch_id, tenant)

    async def recent(self, tenant: str, limit: int, after: str | None) -> tuple[list[Batch], bool]:
        index = keys.tenant_batches_key(tenant)
        return await newest_first(self.redis, index, limit, after, lambda i: self.get(i, tenant), BatchNotFound)

    async def _completed(self, file_id: str, tenant: str) -> tuple[Batch, Job]:
        """The batch whose output file this is and its job, once it has completed (404 for no such batch, 409
        before)."""
        batch_id = batch_of_output(file_id)
        if batch_id is None:
            raise FileNotFound(file_id)
        try:
            batch, job = await self._read(batch_id, tenant)
        except BatchNotFound:
            raise FileNotFound(file_id) from None
        if batch.status != "completed" or job is None:
            raise JobNotFinished(f"batch {batch_id} is {batch.status}: its output exists once it has completed")
        return batch, job

    async def output_file(self, file_id: str, tenant: str) -> FileObject:
        batch, _ = await self._completed(file_id, tenant)
        return FileObject(
            id=file_id,
            bytes=None,
            created_at=batch.completed_at or batch.created_at,
            filename=f"{batch.id}_output.jsonl",
            purpose="batch_output",
        )

    async def output(self, file_id: str, tenant: str) -> AsyncIterator[str]:
        """The output file's lines: `{id, custom_id, response: {status_code, request_id, body}, error}`, the body in
        the shape of the line's call, written as the job's results are read."""
        batch, job = await self._completed(file_id, tenant)
        batch_id, job_id = batch.id, job.id
        entries = (await self.jobs.stream_results(job_id, tenant)).__aiter__()
        model = job.model or self.settings.default_served

        async def lines() -> AsyncIterator[str]:
            n = 0
            for start in range(0, batch.request_counts.total, LINES_PER_READ):
                block = await self.redis.lrange(keys.batch_lines_key(batch_id), start, start + LINES_PER_READ - 1)
                if not block:
                    raise JobNotFound(job_id)  # expired while read
                for raw in block:
                    custom_id, shape, options, count = json.loads(raw)
                    results: list[RequestResults] = [await anext(entries) for _ in range(count)]
                    tokens = sum(r.tokens or 0 for r in results)
                    answer = Answer(job_id=job_id, model=model, results=results, tokens=tokens)
                    body = to_jsonable_python(render(Shape(shape), answer, options), exclude_none=True)
                    n += 1
                    line = OutputLine(
                        id=f"batch_req_{batch_id.removeprefix('batch_')}_{n}",
                        custom_id=custom_id,
                        response=OutputResponse(status_code=200, request_id=f"{job_id}_{n}", body=body),
                    )
                    yield line.model_dump_json() + "\n"

        return lines()
