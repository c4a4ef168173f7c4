"""The API: validates requests, records jobs in Redis and enqueues their chunks. Never imports torch or vLLM."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from celery import Celery
from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from api import errors
from api.batch_store import BatchStore
from api.deps import get_tenant
from api.file_store import FileStore
from api.job_store import JobStore
from api.limits import BodySizeLimit
from api.routes import batches, files, health, info, jobs, metrics, playground, rerank, webhooks
from schemas.settings import Settings, get_settings
from store import redis_memory
from store.connect import async_redis_client, close_async
from store.idempotency import Idempotency
from store.queueing import celery_config

logger = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    client = async_redis_client(settings.redis_url, health_check_interval=30, socket_timeout=10)
    # Waits block a connection on BLPOP for up to the request's timeout: a client of their own, without a socket
    # timeout (redis-py 6+ sets 5 s by default, which cut every wait longer than that into a 503 "unreachable");
    # `JobStore.wait` bounds each wait itself.
    waiter = async_redis_client(settings.redis_url, health_check_interval=30, socket_timeout=None)
    sender = Celery("rerankfarm-api")
    sender.conf.update(celery_config(settings))
    app.state.store = JobStore(client, sender, settings, waiter)
    app.state.files = FileStore(client, settings)
    app.state.batches = BatchStore(client, app.state.store, app.state.files, settings)
    app.state.idempotency = Idempotency(client, settings.idempotency_ttl_s, settings.idempotency_lock_s)
    try:  # Redis not up yet: logged, and /readyz checks the policy once it answers
        await redis_memory.check_at_start_async(client, settings.redis_allow_eviction, "api")
    except redis_memory.EvictingRedis as exc:
        logger.error("%s", exc)
        await close_async(client)
        await close_async(waiter)
        raise
    if settings.auth == "off":
        logger.warning(
            "AUTHENTICATION IS OFF (RERANK_AUTH=off): anyone who can reach this API can submit work and read "
            "every job. Use it only on a trusted machine."
        )
    logger.info("api ready: redis=%s auth=%s", settings.redacted_redis_url(), settings.auth)
    try:
        yield
    finally:
        await close_async(client)
        await close_async(waiter)
        sender.close()


def protected_docs_router(app: FastAPI) -> APIRouter:
    """/openapi.json and /docs for callers with a valid key only."""
    router = APIRouter(include_in_schema=False, dependencies=[Depends(get_tenant)])

    @router.get("/openapi.json")
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @router.get("/docs")
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="rerank farm")

    return router


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    public_docs = settings.docs_public or settings.auth == "off"
    app = FastAPI(
        title="rerank farm",
        version="0.1.0",
        summary="Bulk and interactive reranking with Qwen3-Reranker on GPU workers.",
        lifespan=lifespan,
        docs_url="/docs" if public_docs else None,
        openapi_url="/openapi.json" if public_docs else None,
        redoc_url=None,
    )
    app.state.settings = settings
    if not public_docs:
        app.include_router(protected_docs_router(app))
    app.add_middleware(
        BodySizeLimit, max_bytes=settings.max_body_bytes, per_path={"/v1/files": settings.max_file_bytes}
    )
    app.include_router(rerank.router)
    app.include_router(jobs.router)
    app.include_router(files.router)
    app.include_router(batches.router)
    app.include_router(webhooks.router)
    app.include_router(health.router)
    app.include_router(info.router)
    app.include_router(playground.router)
    app.include_router(metrics.router)
    errors.install(app)
    return app
