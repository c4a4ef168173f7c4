"""Answering an interactive call (vLLM's `serving.py`): it runs as an interactive job, the call waits for it while its
caller is connected, and the finished job is rendered in the call's shape. The routes are `api.routes.rerank`; the
shapes, `api.shapes`."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import Request, Response
from pydantic import BaseModel

from api.job_store import JobStore
from api.shapes import Answer, Call, render
from schemas.errors import CallerGone, InvalidInput, InvalidRequest, JobFailed, JobNotFinished, TooLarge, WaitTimeout
from schemas.jobs import Job, JobCreate, JobStatus
from schemas.settings import Settings

HANGUP_POLL_S = 0.2  # how often a waiting call looks whether its caller is still connected


async def _hung_up(request: Request) -> None:
    """Returns once the caller has closed its connection."""
    while not await request.is_disconnected():
        await asyncio.sleep(HANGUP_POLL_S)


async def wait_for_caller(request: Request, store: JobStore, job_id: str, tenant: str, timeout: float) -> Job:
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
            await store.cancel(job_id, tenant, WaitTimeout.code, f"the call's wait of {timeout:g}s ran out")
            raise WaitTimeout(
                f"job {job_id} did not finish within {timeout:g}s and was cancelled", job_id=job_id
            ) from None
    await store.cancel(job_id, tenant, CallerGone.code, "the caller hung up before its answer was ready")
    raise CallerGone(f"the caller of job {job_id} hung up", job_id=job_id)


async def answer(
    request: Request, call: Call, store: JobStore, settings: Settings, tenant: str, return_documents: bool
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
        if job.error.code == InvalidInput.code:  # the caller's input, refused by a worker: the caller's fault
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


async def rerank(
    request: Request,
    response: Response,
    call: Call,
    store: JobStore,
    settings: Settings,
    tenant: str,
    return_documents: bool,
) -> BaseModel | list[Any]:
    """The call's answer in its shape, with TEI's timing headers on `response`."""
    arrived = time.perf_counter()
    done = await answer(request, call, store, settings, tenant, return_documents)
    response.headers.update(timing_headers(done, time.perf_counter() - arrived))
    return render(call.shape, done, call.render_options())
