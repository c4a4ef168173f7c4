"""Bulk job requests and responses (the HTTP contract of /v1/jobs)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from schemas.webhooks import WebhookSpec, WebhookStatus

NonBlank = Annotated[str, StringConstraints(min_length=1, pattern=r"\S")]


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class JobKind(StrEnum):
    """Bulk jobs wait in their model's backlog and are polled for; interactive calls are answered in the call, ahead
    of every bulk chunk."""

    bulk = "bulk"
    interactive = "interactive"


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="ignore")  # rerank clients may send more fields per document

    text: NonBlank
    id: str | None = Field(None, max_length=256, description="Your id for the document, echoed in the results.")


class LongDocuments(BaseModel):
    """How documents longer than the max length are scored; shared by bulk requests and interactive calls."""

    long_documents: Literal["truncate", "windows"] = Field(
        "truncate",
        description="`truncate`: a prompt over the max length loses the end of its document. `windows`: a long "
        "document is split into overlapping windows, scored by its best window, reported in `window`.",
    )
    window_tokens: int | None = Field(
        None, ge=16, description="Document tokens per window (`windows` mode); default: as many as fit."
    )
    window_overlap: int = Field(64, ge=0, description="Tokens shared by consecutive windows (`windows` mode).")

    @model_validator(mode="after")
    def _window_fits(self) -> LongDocuments:
        if self.window_tokens is not None and self.window_overlap >= self.window_tokens:
            raise ValueError("window_overlap must be smaller than window_tokens")
        return self


class RerankRequest(LongDocuments):
    """One query and its candidate documents; a job carries many."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str | None = Field(None, max_length=256, description="Your id for this request, echoed in results.")
    query: NonBlank
    documents: list[NonBlank | DocumentIn] = Field(min_length=1)
    instruction: NonBlank | None = Field(
        None, description="Qwen3-Reranker task instruction; the model's default web-search instruction if omitted."
    )
    top_n: int | None = Field(None, ge=1, description="Keep only the n best documents; all when omitted.")
    return_documents: bool = Field(False, description="Include each document's text in the results.")
    max_tokens_per_doc: int | None = Field(None, ge=1, description="Cut each document to this many tokens first.")
    truncate: bool = Field(True, description="False: a prompt over the max length fails the job instead of being cut.")
    truncation_side: Literal["right", "left"] = Field(
        "right", description="Which end of a too long document is cut: `right` (its end) or `left` (its start)."
    )

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]

    def document_ids(self) -> list[str | None] | None:
        ids = [None if isinstance(d, str) else d.id for d in self.documents]
        return ids if any(i is not None for i in ids) else None


def check_metadata(v: dict[str, str] | None) -> dict[str, str] | None:
    """Jobs' and batches' metadata: small string pairs, returned as given."""
    if v is not None and (len(v) > 16 or any(len(k) > 64 or len(x) > 512 for k, x in v.items())):
        raise ValueError("metadata holds at most 16 pairs, keys up to 64 and values up to 512 characters")
    return v


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, max_length=256, description="The served model (or an alias of one) to score with; default: the farm's."
    )
    requests: list[RerankRequest] = Field(min_length=1)
    priority: int = Field(5, ge=0, le=9, description="0 (lowest) to 9 (highest); higher-priority chunks run first.")
    metadata: dict[str, str] | None = Field(None, description="Up to 16 string pairs, returned with the job.")
    webhook: WebhookSpec | None = Field(None, description="Called (signed, retried) when the job ends.")
    deadline_s: int | None = Field(
        None,
        ge=1,
        le=30 * 86400,
        description="Seconds from submission the job may take: past them it ends `failed` with code `expired` (its "
        "chunks still waiting are dropped, as a cancel drops them). None: no deadline.",
    )

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return check_metadata(v)

    @model_validator(mode="after")
    def _unique_custom_ids(self) -> JobCreate:
        ids = [r.custom_id for r in self.requests if r.custom_id is not None]
        if len(ids) != len(set(ids)):
            raise ValueError("custom_id values must be unique within a job")
        return self

    @property
    def total_pairs(self) -> int:
        return sum(len(r.documents) for r in self.requests)


class Progress(BaseModel):
    completed: int = Field(description="Pairs scored so far.")
    total: int = Field(description="Pairs in the job.")


class ErrorInfo(BaseModel):
    code: str
    message: str


class Timings(BaseModel):
    """Where a started job's time went, in milliseconds (what TEI reports per call, in headers)."""

    queue_ms: int = Field(description="From submission to the first chunk taken by a worker.")
    tokenization_ms: int = Field(description="The slowest chunk's tokenization (a job's chunks run in parallel).")
    inference_ms: int = Field(description="The slowest chunk's wait for its scores: the batcher and the engine.")


class QueuePosition(BaseModel):
    """Where a bulk job with pairs not yet sent to a worker stands in its model's backlog. Work of higher priority
    goes first; at its priority the workers are shared between the tenants with work waiting, by weight, and a
    tenant's part between its jobs."""

    pairs_waiting: int = Field(description="The job's own pairs not yet sent to a worker.")
    pairs_ahead: int = Field(description="Pairs of higher priority waiting (every tenant's): served first.")
    tenants_sharing: int = Field(description="Tenants with pairs waiting at the job's priority, its own included.")
    jobs_sharing: int = Field(description="Its tenant's jobs with pairs waiting at that priority, itself included.")


class Job(BaseModel):
    id: str
    object: Literal["rerank.job"] = "rerank.job"
    status: JobStatus
    kind: JobKind = JobKind.bulk
    model: str | None = Field(None, description="The served model that scores the job.")
    priority: int
    metadata: dict[str, str] | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: Progress
    queue: QueuePosition | None = Field(None, description="While some of its pairs wait in the backlog.")
    request_count: int
    tokens: int = Field(0, description="Prompt tokens scored so far.")
    error: ErrorInfo | None = None
    workers: dict[str, int] = Field(default_factory=dict, description="Pairs scored by each worker (hostname).")
    webhook: WebhookStatus | None = None
    timings: Timings | None = Field(None, description="Once a worker took its first chunk.")
    deadline_at: datetime | None = Field(None, description="When the job expires unless it has ended (`deadline_s`).")
    expires_at: datetime | None = Field(
        None,
        description="When the job and its results leave Redis (RERANK_RESULT_TTL_S after its last update; "
        "`DELETE /v1/jobs/{id}` frees a finished job at once).",
    )


class JobDeleted(BaseModel):
    id: str
    object: Literal["rerank.job.deleted"] = "rerank.job.deleted"
    deleted: bool = True


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]


class ResultDocument(BaseModel):
    text: str


class WindowInfo(BaseModel):
    """The window that gave a long document its score (`long_documents: "windows"`)."""

    index: int = Field(description="Window number, from 0.")
    count: int = Field(description="Windows the document was split into.")
    start_token: int = Field(description="First document token of the window.")
    end_token: int = Field(description="One past the last document token of the window.")


class RankedResult(BaseModel):
    index: int = Field(description="Position of the document in the request's `documents`.")
    relevance_score: float = Field(description="P(yes) of the reranker, in [0, 1].")
    id: str | None = Field(None, description="The document's `id`, when it had one.")
    document: ResultDocument | None = None
    window: WindowInfo | None = None


class RequestResults(BaseModel):
    custom_id: str | None = None
    results: list[RankedResult]
    tokens: int | None = Field(None, description="Prompt tokens scored for this request.")


class JobResults(BaseModel):
    id: str
    object: Literal["list"] = "list"
    data: list[RequestResults]


class ErrorResponse(BaseModel):
    error: ErrorInfo
