"""The one error table: every error the API answers, from the farm's own (`schemas.errors`, each with its status and
code) to the framework's and Redis's, rendered in the caller's shape (`api.shapes.error_payload`) and counted in
`rerank_request_failures_total`. TEI's `ErrorType` table is the model.

| raised | status | code |
|---|---|---|
| a `schemas.errors.RerankError` | its own | its own |
| a body fastapi cannot validate | 422 (400 for invalid JSON) | `invalid_request` (`invalid_json`) |
| the framework's HTTP errors (unknown path, wrong method) | theirs | `not_found`, `method_not_allowed`, ... |
| Redis unreachable, timed out or read-only | 503 | `unavailable` |
| Redis full (`noeviction` at its maxmemory) | 503 | `store_full` |
| any other error Redis answers | 500 | `internal_error` (logged) |

The body size limit (`api.limits`) and `/readyz` answer through it too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.shapes import SHAPE_TAGS, Shape, error_payload
from schemas.errors import RerankError, describe_validation
from schemas.metrics import REQUEST_FAILURES
from store import redis_memory

logger = logging.getLogger(__name__)


def _validation_message(exc: RequestValidationError) -> tuple[int, str, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "invalid_json", "the request body is not valid JSON"
    return 422, "invalid_request", describe_validation(errors, skip={"body", *SHAPE_TAGS})


def answer(
    shape: Shape | None,
    status: int,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    **details: Any,
) -> JSONResponse:
    """Every error answer, counted by its code: in the shape of the client's call (TEI, Voyage) where one is known,
    in the farm's `{"error": {code, message}}` elsewhere."""
    REQUEST_FAILURES.labels(code).inc()
    return JSONResponse(error_payload(shape, status, code, message, **details), status_code=status, headers=headers)


def of(shape: Shape | None, exc: RerankError) -> JSONResponse:
    """The answer to one of the farm's errors, for callers outside the exception handlers (ASGI middleware)."""
    return answer(shape, exc.status, exc.code, exc.message, exc.headers, **exc.details)


def _error(
    request: Request, status: int, code: str, message: str, headers: Mapping[str, str] | None = None, **details: Any
) -> JSONResponse:
    """An error answered in the shape a rerank route noted for the call (`api.routes.rerank.note_shape`)."""
    return answer(getattr(request.state, "shape", None), status, code, message, headers, **details)


async def _rerank_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RerankError)
    return _error(request, exc.status, exc.code, exc.message, exc.headers, **exc.details)


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    status, code, message = _validation_message(exc)
    return _error(request, status, code, message)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Errors raised by the framework itself (unparsable body, unknown path, wrong method) in the farm's shape."""
    assert isinstance(exc, StarletteHTTPException)
    code = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _error(request, exc.status_code, code, str(exc.detail), exc.headers)


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("redis unavailable: %r", exc)
    return _error(request, 503, "unavailable", "the job store is unreachable; retry later", {"Retry-After": "5"})


async def _redis_refused(request: Request, exc: Exception) -> JSONResponse:
    """Redis answered a command with an error. Full (`noeviction` at its maxmemory): 503 `store_full`, nothing was
    accepted, retry later. Anything else is a bug, answered 500 in the caller's shape and logged with its traceback."""
    if redis_memory.is_out_of_memory(exc):
        logger.warning("redis full: %r", exc)
        message = "the job store is full (Redis refused a write); retry later"
        retry = {"Retry-After": str(redis_memory.STORE_FULL_RETRY_AFTER_S)}
        return _error(request, 503, "store_full", message, retry)
    logger.error("redis refused a command", exc_info=exc)
    return _error(request, 500, "internal_error", "internal error (logged); retry later")


def install(app: FastAPI) -> None:
    app.add_exception_handler(RerankError, _rerank_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RedisConnectionError, _redis_down)
    app.add_exception_handler(RedisTimeoutError, _redis_down)
    app.add_exception_handler(ResponseError, _redis_refused)  # OutOfMemoryError included
    app.add_exception_handler(ReadOnlyError, _redis_down)  # a demoted primary, during a Sentinel failover
