import json
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Query, Response
from fastapi.responses import StreamingResponse

from api.deps import IdempotencyDep, IdempotencyKey, StoreDep, TenantDep, replayed
from schemas.jobs import ErrorResponse, Job, JobCreate, JobDeleted, JobList, JobResults, RequestResults

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
_errors: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503)
}


@router.post("", status_code=202, responses={**_errors, 200: {"model": Job, "description": "A replayed submission"}})
async def create_job(
    body: JobCreate,
    store: StoreDep,
    tenant: TenantDep,
    response: Response,
    idempotency: IdempotencyDep,
    idempotency_key: IdempotencyKey = None,
) -> Job:
    """Submit a bulk rerank job: many queries, each with its documents. Answers at once with the queued job (202),
    or, for a retry with the same `Idempotency-Key`, with the job the first request created (200)."""
    job, again = await idempotency.once(
        tenant,
        "jobs",
        idempotency_key,
        body.model_dump_json(),
        create=lambda claim: store.submit(body, tenant, claim=claim),
        replay=lambda job_id: store.get(job_id, tenant),
        resource_id=lambda job: job.id,
    )
    if again:
        replayed(response)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job


@router.get("", responses=_errors)
async def list_jobs(store: StoreDep, tenant: TenantDep, limit: int = Query(20, ge=1, le=100)) -> JobList:
    """The most recent jobs, newest first."""
    return JobList(data=await store.recent(limit, tenant))


@router.get("/{job_id}", responses=_errors)
async def get_job(job_id: str, store: StoreDep, tenant: TenantDep) -> Job:
    """A job's status and progress in pairs."""
    return await store.get(job_id, tenant)


@router.get(
    "/{job_id}/results",
    response_model=JobResults,
    responses={**_errors, 409: {"model": ErrorResponse}, 200: {"content": {"application/x-ndjson": {}}}},
)
async def get_results(
    job_id: str,
    store: StoreDep,
    tenant: TenantDep,
    format: Literal["json", "jsonl"] = Query("json", description="`jsonl`: one request's results per line."),
) -> Response:
    """Ranked results, one entry per request in submission order; 409 until the job has succeeded. Streamed from
    Redis as they are assembled (any size of job); fields that were not asked for (`id`, `document`, `window`) are
    left out."""
    entries = await store.stream_results(job_id, tenant)
    if format == "jsonl":
        return StreamingResponse(_jsonl(entries), media_type="application/x-ndjson")
    return StreamingResponse(_json(job_id, entries), media_type="application/json")


async def _jsonl(entries: AsyncIterator[RequestResults]) -> AsyncIterator[str]:
    async for entry in entries:
        yield entry.model_dump_json(exclude_none=True) + "\n"


async def _json(job_id: str, entries: AsyncIterator[RequestResults]) -> AsyncIterator[str]:
    """JobResults, written as it is read: `{"id", "object", "data": [...]}`."""
    yield f'{{"id":{json.dumps(job_id)},"object":"list","data":['
    separator = ""
    async for entry in entries:
        yield separator + entry.model_dump_json(exclude_none=True)
        separator = ","
    yield "]}"


@router.delete("/{job_id}", responses={**_errors, 409: {"model": ErrorResponse}})
async def delete_job(job_id: str, store: StoreDep, tenant: TenantDep) -> JobDeleted:
    """Free a finished job's record, inputs and results in Redis at once (for callers that have downloaded its
    results); 409 while it is queued or running. A webhook event not yet delivered is dropped with it."""
    await store.delete(job_id, tenant)
    return JobDeleted(id=job_id)


@router.post("/{job_id}/cancel", responses=_errors)
async def cancel_job(job_id: str, store: StoreDep, tenant: TenantDep) -> Job:
    """Cancel a job: chunks not yet scored are not scored. Cancelling a finished job changes nothing."""
    return await store.cancel(job_id, tenant)


@router.post("/{job_id}/webhook/redeliver", status_code=202, responses={**_errors, 409: {"model": ErrorResponse}})
async def redeliver_webhook(job_id: str, store: StoreDep, tenant: TenantDep) -> Job:
    """Send the job's last webhook event again (same webhook-id); 409 while the job has not ended."""
    return await store.redeliver(job_id, tenant)
