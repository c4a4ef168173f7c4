"""One small error hierarchy; the API renders every one as `{"error": {"code", "message"}}` with its status."""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence
from typing import Any


class RerankError(Exception):
    code = "internal_error"
    status = 500

    headers: dict[str, str] = {}  # noqa: RUF012  # read-only class default; instances set their own

    def __init__(self, message: str, headers: dict[str, str] | None = None, **details: str) -> None:
        super().__init__(message)
        self.message = message
        self.details = details  # extra fields of the error body, e.g. the job id of a timed-out request
        if headers:
            self.headers = headers

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class InvalidRequest(RerankError):
    code = "invalid_request"
    status = 422


class TooLarge(RerankError):
    code = "too_large"
    status = 413


class JobNotFound(RerankError):
    code = "job_not_found"
    status = 404

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r} (it may have expired)")


class ModelNotFound(RerankError):
    """A request named a model this farm does not serve (404, as OpenAI-compatible servers answer)."""

    code = "model_not_found"
    status = 404

    def __init__(self, model: str, served: Sequence[str]) -> None:
        names = ", ".join(served) or "none"
        super().__init__(f"model {model[:100]!r} is not served here; served models: {names}")


class FileNotFound(RerankError):
    code = "file_not_found"
    status = 404

    def __init__(self, file_id: str) -> None:
        super().__init__(f"no file with id {file_id!r} (it may have expired or been deleted)")


class BatchNotFound(RerankError):
    code = "batch_not_found"
    status = 404

    def __init__(self, batch_id: str) -> None:
        super().__init__(f"no batch with id {batch_id!r} (it may have expired)")


class JobNotFinished(RerankError):
    code = "job_not_finished"
    status = 409


class Unauthorized(RerankError):
    code = "unauthorized"
    status = 401
    headers = {"WWW-Authenticate": "Bearer"}  # noqa: RUF012


class Overloaded(RerankError):
    """Past a limit that frees itself with time; the answer says when to retry."""

    code = "overloaded"
    status = 429


class WaitTimeout(RerankError):
    code = "timeout"
    status = 504


class CallerGone(RerankError):
    """The caller hung up before its answer was ready (nginx's 499): nobody reads this answer, only logs and metrics
    see it."""

    code = "client_closed_request"
    status = 499


class JobFailed(RerankError):
    code = "job_failed"
    status = 502


class Unavailable(RerankError):
    code = "unavailable"
    status = 503


class EngineLoadError(RerankError):
    """The model could not be loaded; the message says what to do."""

    code = "engine_load_failed"
    status = 503

    @classmethod
    def model_unloadable(cls, model: str, exc: BaseException) -> EngineLoadError:
        first_line = (str(exc).splitlines() or [""])[0]
        return cls(
            f"could not load model {model!r} ({exc.__class__.__name__}: {first_line}). "
            "If this machine cannot reach the Hugging Face Hub, download the model where it can "
            "(`hf download Qwen/Qwen3-Reranker-0.6B --local-dir DIR`) and set RERANK_MODEL=DIR; "
            "check that RERANK_MODEL names a model id or a directory with config.json and tokenizer files."
        )


class StoreFull(RerankError):
    """Redis is too full to take this work now (near `maxmemory`, or it refused a write): retry later."""

    code = "store_full"
    status = 503


class IdempotencyInProgress(RerankError):
    """A request with the same Idempotency-Key is still being handled: retry it shortly for its answer."""

    code = "idempotency_in_progress"
    status = 409


class IdempotencyKeyReused(RerankError):
    """The Idempotency-Key was used before with another request body."""

    code = "idempotency_key_reused"
    status = 422


class InvalidInput(RerankError):
    """Input the engine rejects; the job fails without retries."""

    code = "invalid_input"
    status = 422


def describe_validation(errors: Sequence[Mapping[str, Any]], skip: Container[object] = ()) -> str:
    """Pydantic's errors in one line: `where: what` for the first five (request bodies and batch lines alike)."""
    parts = []
    for e in errors[:5]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x not in skip)
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


class AuthOff(RerankError):
    """A per-tenant setting asked of a farm that runs without authentication (one tenant, farm-wide settings)."""

    code = "auth_off"
    status = 409
