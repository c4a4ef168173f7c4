"""The interactive calls: Cohere, Jina, vLLM, TEI, Voyage and OpenAI-compatible clients work against them unchanged.
The shapes themselves (what each client sends and expects back) live in `api.shapes`."""

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from pydantic import BaseModel

from api.deps import SettingsDep, StoreDep, TenantDep
from api.shapes import (
    Answer,
    Call,
    RerankBody,
    RerankResponse,
    ScoreCall,
    ScoreResponse,
    TeiError,
    TeiRank,
    VoyageError,
    VoyageResponse,
    render,
    shape_of,
)
from schemas.errors import InvalidRequest, JobFailed, JobNotFinished, TooLarge
from schemas.jobs import ErrorResponse, JobCreate, JobStatus
from schemas.settings import Settings

router = APIRouter(tags=["rerank"])

_error_shapes: dict[str, Any] = {
    "content": {
        "application/json": {
            "schema": {
                "anyOf": [
                    {"$ref": "#/components/schemas/ErrorResponse"},
                    {"$ref": "#/components/schemas/TeiError"},
                    {"$ref": "#/components/schemas/VoyageError"},
                ]
            }
        }
    }
}
_errors: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 413, 422, 429, 502, 503, 504)
}
_shaped_errors: dict[int | str, dict[str, Any]] = {
    code: {"description": "The error, in the shape of the call", **_error_shapes}
    for code in (400, 401, 413, 422, 429, 502, 503, 504)
}
# The error shapes are referenced above; listing them once as a response adds them to the schema's components.
_shaped_errors["default"] = {"model": TeiError | VoyageError, "description": "TEI and Voyage error shapes"}


async def note_shape(request: Request) -> None:
    """Record the call's shape before anything can fail, so that every error is answered in it."""
    try:
        body = await request.json()
    except ValueError:
        body = None
    request.state.shape = shape_of(request.url.path, body, request.headers)


async def answer(call: Call, store: StoreDep, settings: Settings, tenant: str, return_documents: bool) -> Answer:
    """Run a call as an interactive job and wait for it: its answer, or the error it met."""
    requests = call.requests(return_documents)
    pairs = sum(len(r.documents) for r in requests)
    if pairs > settings.max_documents_per_rerank:
        raise TooLarge(
            f"a rerank call takes at most {settings.max_documents_per_rerank} documents; this one has "
            f"{pairs}: submit a bulk job (/v1/jobs or /v1/batches) for more"
        )
    job = await store.submit(
        JobCreate(requests=requests, priority=9), tenant, interactive=True, max_prompt_tokens=call.max_prompt_tokens
    )
    timeout = getattr(call, "timeout", None) or settings.interactive_timeout_s
    job = await store.wait(job.id, tenant, timeout)
    if job.status is JobStatus.failed and job.error is not None:
        if job.error.code == "invalid_input":
            raise InvalidRequest(job.error.message)
        raise JobFailed(f"scoring failed: {job.error.message}", job_id=job.id)
    if job.status is JobStatus.cancelled:
        raise JobNotFinished(f"job {job.id} was cancelled")
    results = (await store.results(job.id, tenant)).data
    return Answer(job_id=job.id, model=settings.model, results=results, tokens=job.tokens)


async def _rerank(
    call: Call, store: StoreDep, settings: Settings, tenant: str, return_documents: bool
) -> BaseModel | list[Any]:
    done = await answer(call, store, settings, tenant, return_documents)
    return render(call.shape, done, call.render_options())


_Body = Annotated[RerankBody, Body()]
_RerankAnswer = RerankResponse | VoyageResponse | list[TeiRank]
_rerank_route = {
    "responses": _shaped_errors,
    "response_model": _RerankAnswer,
    "dependencies": [Depends(note_shape)],
    "response_model_exclude_none": True,
}
_score_route = {
    "responses": _errors,
    "response_model": ScoreResponse,
    "dependencies": [Depends(note_shape)],
    "response_model_exclude_none": True,
}


@router.post("/v1/rerank", **_rerank_route)  # type: ignore[arg-type]
@router.post("/rerank", **_rerank_route)  # type: ignore[arg-type]
async def rerank_v1(call: _Body, store: StoreDep, settings: SettingsDep, tenant: TenantDep) -> Any:
    """Rerank documents for one query and answer in this response: the Cohere v1, Jina and vLLM shape, the Voyage
    shape when the body has `top_k`, the TEI shape (a bare array, best first) when it has `texts`. `/rerank` is the
    root path TEI and vLLM clients call."""
    return await _rerank(call, store, settings, tenant, return_documents=True)


@router.post("/v2/rerank", **_rerank_route)  # type: ignore[arg-type]
async def rerank_v2(call: _Body, store: StoreDep, settings: SettingsDep, tenant: TenantDep) -> Any:
    """Rerank, Cohere v2 shape: documents are returned only when `return_documents` is true."""
    return await _rerank(call, store, settings, tenant, return_documents=False)


@router.post("/v1/score", **_score_route)  # type: ignore[arg-type]
@router.post("/score", include_in_schema=False, **_score_route)  # type: ignore[arg-type]
async def score(call: ScoreCall, store: StoreDep, settings: SettingsDep, tenant: TenantDep) -> Any:
    """vLLM's score call (also on /score): `text_1`/`text_2` (or `queries`/`documents`), one query against many
    documents or paired one to one; scores in pair order."""
    return await _rerank(call, store, settings, tenant, return_documents=False)
