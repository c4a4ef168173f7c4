"""Batches, as the OpenAI SDK (and Voyage's batch API) create and follow them; each batch is one farm job."""

from typing import Any

from fastapi import APIRouter, Query, Response

from api.batch_store import batch_id_of
from api.deps import BatchesDep, IdempotencyDep, IdempotencyKey, TenantDep, replayed
from schemas.batches import Batch, BatchCreate, BatchList
from schemas.jobs import ErrorResponse

router = APIRouter(prefix="/v1/batches", tags=["batches"])
_errors: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503)
}


@router.post("", responses=_errors)
async def create_batch(
    body: BatchCreate,
    batches: BatchesDep,
    tenant: TenantDep,
    response: Response,
    idempotency: IdempotencyDep,
    idempotency_key: IdempotencyKey = None,
) -> Batch:
    """Run every line of an uploaded JSONL file (`{custom_id, method, url, body}`; `url` may be left to
    `endpoint`) as one job. A file with bad lines gives a `failed` batch whose `errors` name them. A retry with the
    same `Idempotency-Key` answers the batch the first request created."""
    batch, again = await idempotency.once(
        tenant,
        "batches",
        idempotency_key,
        body.model_dump_json(),
        create=lambda claim: batches.create(body, tenant, claim),
        replay=lambda batch_id: batches.get(batch_id, tenant),
        resource_id=lambda batch: batch.id,
        resource_of=batch_id_of,
    )
    if again:
        replayed(response)
    return batch


@router.get("", responses=_errors)
async def list_batches(
    batches: BatchesDep,
    tenant: TenantDep,
    limit: int = Query(20, ge=1, le=100),
    after: str | None = Query(None, description="A batch id: list the batches created before it."),
) -> BatchList:
    """The tenant's batches, newest first, a page at a time."""
    data, more = await batches.recent(tenant, limit, after)
    return BatchList.of(data, more)


@router.get("/{batch_id}", responses=_errors)
async def get_batch(batch_id: str, batches: BatchesDep, tenant: TenantDep) -> Batch:
    """The batch's status, request counts and, once completed, its `output_file_id`."""
    return await batches.get(batch_id, tenant)


@router.post("/{batch_id}/cancel", responses=_errors)
async def cancel_batch(batch_id: str, batches: BatchesDep, tenant: TenantDep) -> Batch:
    """Cancel the batch's job: lines not yet scored are not scored."""
    return await batches.cancel(batch_id, tenant)
