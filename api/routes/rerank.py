"""The interactive rerank call: Cohere, Jina and vLLM clients work against it unchanged."""

from typing import Any

from fastapi import APIRouter

from api.deps import SettingsDep, StoreDep, TenantDep
from schemas.errors import InvalidRequest, JobFailed, JobNotFinished, TooLarge
from schemas.jobs import ErrorResponse, JobCreate, JobStatus
from schemas.rerank import RerankCall, RerankMeta, RerankResponse, RerankUsage, TokenCounts

router = APIRouter(tags=["rerank"])
_errors: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 413, 422, 429, 502, 503, 504)
}


async def _rerank(
    call: RerankCall, store: StoreDep, settings: SettingsDep, tenant: str, return_documents: bool
) -> RerankResponse:
    if len(call.documents) > settings.max_documents_per_rerank:
        raise TooLarge(
            f"a rerank call takes at most {settings.max_documents_per_rerank} documents; this one has "
            f"{len(call.documents)}: submit a bulk job (/v1/jobs) for more"
        )
    request = call.as_request(return_documents if call.return_documents is None else call.return_documents)
    job = await store.submit(
        JobCreate(requests=[request], priority=9),
        tenant,
        interactive=True,
        max_prompt_tokens=call.truncate_prompt_tokens,
    )
    job = await store.wait(job.id, tenant, call.timeout or settings.interactive_timeout_s)
    if job.status is JobStatus.failed and job.error is not None:
        if job.error.code == "invalid_input":
            raise InvalidRequest(job.error.message)
        raise JobFailed(f"scoring failed: {job.error.message}", job_id=job.id)
    if job.status is JobStatus.cancelled:
        raise JobNotFinished(f"job {job.id} was cancelled")
    results = (await store.results(job.id, tenant)).data[0].results
    return RerankResponse(
        id=job.id,
        model=settings.model,
        results=results,
        usage=RerankUsage(prompt_tokens=job.tokens, total_tokens=job.tokens),
        meta=RerankMeta(tokens=TokenCounts(input_tokens=job.tokens)),
    )


@router.post("/v1/rerank", responses=_errors, response_model_exclude_none=True)
async def rerank_v1(call: RerankCall, store: StoreDep, settings: SettingsDep, tenant: TenantDep) -> RerankResponse:
    """Rerank documents for one query and answer in this response (Jina, vLLM, Cohere v1 shape)."""
    return await _rerank(call, store, settings, tenant, return_documents=True)


@router.post("/rerank", responses=_errors, response_model_exclude_none=True, include_in_schema=False)
async def rerank_bare(call: RerankCall, store: StoreDep, settings: SettingsDep, tenant: TenantDep) -> RerankResponse:
    """Same as /v1/rerank (vLLM's path)."""
    return await _rerank(call, store, settings, tenant, return_documents=True)


@router.post("/v2/rerank", responses=_errors, response_model_exclude_none=True)
async def rerank_v2(call: RerankCall, store: StoreDep, settings: SettingsDep, tenant: TenantDep) -> RerankResponse:
    """Rerank, Cohere v2 shape: documents are returned only when `return_documents` is true."""
    return await _rerank(call, store, settings, tenant, return_documents=False)
