"""The API: validates requests, records jobs in Redis and enqueues their chunks. Never imports torch or vLLM."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from celery import Celery
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.job_store import JobStore
from api.routes import health, info, jobs, playground, rerank
from schemas.errors import RerankError
from schemas.jobs import error_body
from schemas.queueing import celery_config
from schemas.settings import Settings, get_settings

logger = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    client = aioredis.from_url(settings.redis_url, health_check_interval=30, socket_timeout=10)
    # Waits block a connection on BLPOP for up to the request's timeout: a client of their own, no socket timeout.
    waiter = aioredis.from_url(settings.redis_url, health_check_interval=30)
    sender = Celery("rerankfarm-api")
    sender.conf.update(celery_config(settings))
    app.state.store = JobStore(client, sender, settings, waiter)
    logger.info("api ready: redis=%s", settings.redacted_redis_url())
    try:
        yield
    finally:
        await client.aclose()
        await waiter.aclose()
        sender.close()


def _validation_message(exc: RequestValidationError) -> tuple[int, str, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "invalid_json", "the request body is not valid JSON"
    parts = []
    for e in errors[:5]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "invalid_request", "; ".join(parts) + more


async def _rerank_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RerankError)
    return JSONResponse(error_body(exc.code, exc.message, **exc.details), status_code=exc.status)


async def _invalid(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    status, code, message = _validation_message(exc)
    return JSONResponse(error_body(code, message), status_code=status)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    """Errors raised by the framework itself (unparsable body, unknown path, wrong method) in the farm's shape."""
    assert isinstance(exc, StarletteHTTPException)
    code = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)


async def _redis_down(_: Request, exc: Exception) -> JSONResponse:
    logger.warning("redis unavailable: %r", exc)
    return JSONResponse(
        error_body("unavailable", "the job store is unreachable; retry later"),
        status_code=503,
        headers={"Retry-After": "5"},
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(
        title="rerank farm",
        version="0.1.0",
        summary="Bulk and interactive reranking with Qwen3-Reranker on GPU workers.",
        lifespan=lifespan,
    )
    app.state.settings = settings or get_settings()
    app.include_router(rerank.router)
    app.include_router(jobs.router)
    app.include_router(health.router)
    app.include_router(info.router)
    app.include_router(playground.router)
    app.add_exception_handler(RerankError, _rerank_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RedisConnectionError, _redis_down)
    app.add_exception_handler(RedisTimeoutError, _redis_down)
    return app
