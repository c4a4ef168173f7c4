"""The interactive calls: Cohere, Jina, vLLM, TEI, Voyage and OpenAI-compatible clients work against them unchanged.
The shapes themselves (what each client sends and expects back) live in `api.shapes`."""

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request, Response
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
from schemas.errors import CallerGone, InvalidRequest, JobFailed, JobNotFinished, TooLarge, WaitTimeout
from schemas.jobs import ErrorResponse, Job, JobCreate, JobStatus
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
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 502, 503, 504)
}
_shaped_errors: dict[int | str, dict[str, Any]] = {
    code: {"description": "The error, in the shape of the call", **_error_shapes}
    for code in (400, 401, 404, 413, 422, 429, 502, 503, 504)
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


HANGUP_POLL_S = 0.2  # how often a waiting call looks whether its caller is still connected


async def _hung_up(request: Request) -> None:
    """Returns once the caller has closed its connection."""
    while not await request.is_disconnected():
        await asyncio.sleep(HANGUP_POLL_S)


async def wait_for_caller(request: Request, store: StoreDep, job_id: str, tenant: str, timeout: float) -> Job:
    """The job once it is final. When the wait runs out, or the caller hangs up first, nobody will read the answer:
    the job is cancelled, so its pairs leave the queue, the batcher and the engine instead of taking engine time
    (as TEI and vLLM drop a request whose client has gone)."""
    waiting = asyncio.ensure_future(store.wait(job_id, tenant, timeout))
    watching = asyncio.ensure_future(_hung_up(request))
    try:
        done, _ = await asyncio.wait({waiting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
        watching.cancel()
        await asyncio.gather(waiting, watching, return_exceptions=True)  # their outcomes are read from `done`
    if waiting in done:
        try:
            return waiting.result()
        except WaitTimeout:
            await store.cancel(job_id, tenant, "timeout", f"the call's wait of {timeout:g}s ran out")
            raise WaitTimeout(
                f"job {job_id} did not finish within {timeout:g}s and was cancelled", job_id=job_id
            ) from None
    await store.cancel(job_id, tenant, CallerGone.code, "the caller hung up before its answer was ready")
    raise CallerGone(f"the caller of job {job_id} hung up", job_id=job_id)


async def answer(
    request: Request, call: Call, store: StoreDep, settings: Settings, tenant: str, return_documents: bool
) -> Answer:
    """Run a call as an interactive job and wait for it: its answer, or the error it met."""
    requests = call.requests(return_documents)
    pairs = sum(len(r.documents) for r in requests)
    if pairs > settings.max_documents_per_rerank:
        raise TooLarge(
            f"a rerank call takes at most {settings.max_documents_per_rerank} documents; this one has "
            f"{pairs}: submit a bulk job (/v1/jobs or /v1/batches) for more"
        )
    model = await store.models.resolve(call.model)
    body = JobCreate(model=model, requests=requests, priority=9)
    timeout = getattr(call, "timeout", None) or settings.interactive_timeout_s
    async with store.interactive.slot(model, tenant, pairs, timeout) as ahead:  # 429 past the interactive limits
        job = await store.submit(body, tenant, interactive=True, max_prompt_tokens=call.max_prompt_tokens, ahead=ahead)
        job = await wait_for_caller(request, store, job.id, tenant, timeout)
    if job.status is JobStatus.failed and job.error is not None:
        if job.error.code == "invalid_input":
            raise InvalidRequest(job.error.message)
        raise JobFailed(f"scoring failed: {job.error.message}", job_id=job.id)
    if job.status is JobStatus.cancelled:
        raise JobNotFinished(f"job {job.id} was cancelled")
    results = (await store.results(job.id, tenant)).data
    return Answer(job_id=job.id, model=job.model or model, results=results, tokens=job.tokens, timings=job.timings)


def timing_headers(answer: Answer, total_s: float) -> dict[str, str]:
    """TEI's timing headers, in milliseconds: the whole call, the queue (submission to the first chunk taken), and
    the slowest chunk's tokenization and inference; and the prompt tokens scored."""
    headers = {"x-total-time": str(round(total_s * 1000)), "x-compute-tokens": str(answer.tokens)}
    if answer.timings is not None:
        headers["x-queue-time"] = str(answer.timings.queue_ms)
        headers["x-tokenization-time"] = str(answer.timings.tokenization_ms)
        headers["x-inference-time"] = str(answer.timings.inference_ms)
    return headers


async def _rerank(
    request: Request,
    response: Response,
    call: Call,
    store: StoreDep,
    settings: Settings,
    tenant: str,
    return_documents: bool,
) -> BaseModel | list[Any]:
    arrived = time.perf_counter()
    done = await answer(request, call, store, settings, tenant, return_documents)
    response.headers.update(timing_headers(done, time.perf_counter() - arrived))
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
async def rerank_v1(
    request: Request, response: Response, call: _Body, store: StoreDep, settings: SettingsDep, tenant: TenantDep
) -> Any:
    """Rerank documents for one query and answer in this response: the Cohere v1, Jina and vLLM shape, the Voyage
    shape when the body has `top_k`, the TEI shape (a bare array, best first) when it has `texts`. `/rerank` is the
    root path TEI and vLLM clients call."""
    return await _rerank(request, response, call, store, settings, tenant, return_documents=True)


@router.post("/v2/rerank", **_rerank_route)  # type: ignore[arg-type]
async def rerank_v2(
    request: Request, response: Response, call: _Body, store: StoreDep, settings: SettingsDep, tenant: TenantDep
) -> Any:
    """Rerank, Cohere v2 shape: documents are returned only when `return_documents` is true."""
    return await _rerank(request, response, call, store, settings, tenant, return_documents=False)


@router.post("/v1/score", **_score_route)  # type: ignore[arg-type]
@router.post("/score", include_in_schema=False, **_score_route)  # type: ignore[arg-type]
async def score(
    request: Request, response: Response, call: ScoreCall, store: StoreDep, settings: SettingsDep, tenant: TenantDep
) -> Any:
    """vLLM's score call (also on /score): `text_1`/`text_2` (or `queries`/`documents`), one query against many
    documents or paired one to one; scores in pair order."""
    return await _rerank(request, response, call, store, settings, tenant, return_documents=False)
