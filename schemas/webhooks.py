"""The webhook contract: what a job's webhook asks for, what GET /v1/jobs/{id} shows of it, and the event payload.
Where webhooks may go and how they are delivered: the `webhooks` package."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field


class WebhookEvent(StrEnum):
    succeeded = "job.succeeded"
    failed = "job.failed"
    cancelled = "job.cancelled"


class WebhookSpec(BaseModel):
    url: str = Field(max_length=2048, description="http(s) URL that receives a POST when the job ends.")
    events: list[Literal["job.succeeded", "job.failed", "job.cancelled"]] | None = Field(
        None, min_length=1, description="Events to send; all three when omitted."
    )


def destination(url: str) -> str:
    """Where a webhook goes, as the delivery caps and the circuit breaker count it: `host[:port]`, lower case."""
    return urlsplit(url).netloc.rsplit("@", 1)[-1].lower()


class WebhookAttempt(BaseModel):
    attempt: int
    at: str
    status_code: int | None = None
    error: str | None = None
    duration_ms: float | None = None


class WebhookState(StrEnum):
    pending = "pending"  # waiting for its next attempt
    delivered = "delivered"
    failed = "failed"  # every attempt of the schedule failed
    gone = "gone"  # the receiver answered 410 Gone: no more attempts


class WebhookStatus(BaseModel):
    """What GET /v1/jobs/{id} shows of a job's webhook."""

    url: str
    events: list[str]
    state: str | None = Field(None, description="pending, delivered, failed or gone; null before the job ends.")
    event: str | None = Field(None, description="The event being (or last) delivered.")
    attempts: list[WebhookAttempt] = Field(default_factory=list)
    paused_until: str | None = Field(
        None,
        description="Set while the destination is paused after failing RERANK_WEBHOOK_BREAKER_FAILURES times in a "
        "row: attempts due before then are recorded as not sent.",
    )


def event_payload(event: str, job: dict[str, Any], results_url: str, results: Any | None, at: str) -> dict[str, Any]:
    """The Standard Webhooks payload: {type, timestamp, data}."""
    data: dict[str, Any] = {
        "id": job["id"],
        "status": job["status"],
        "progress": job["progress"],
        "request_count": job["request_count"],
        "metadata": job.get("metadata"),
        "error": job.get("error"),
        "results_url": results_url,
    }
    if results is not None:
        data["results"] = results
    return {"type": event, "timestamp": at, "data": data}
