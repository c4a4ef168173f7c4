"""Bulk job requests and responses (the HTTP contract of /v1/jobs)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from schemas.webhooks import WebhookAttempt, WebhookSpec, WebhookStatus

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


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="ignore")  # rerank clients may send more fields per document

    text: NonBlank
    id: str | None = Field(None, max_length=256, description="Your id for the document, echoed in the results.")


class RerankRequest(BaseModel):
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
    long_documents: Literal["truncate", "windows"] = Field(
        "truncate",
        description="`truncate`: a prompt over the max length loses the end of its document. `windows`: a long "
        "document is split into overlapping windows, scored by its best window, reported in `window`.",
    )
    window_tokens: int | None = Field(
        None, ge=16, description="Document tokens per window (`windows` mode); default: as many as fit."
    )
    window_overlap: int = Field(64, ge=0, description="Tokens shared by consecutive windows (`windows` mode).")
    max_tokens_per_doc: int | None = Field(None, ge=1, description="Cut each document to this many tokens first.")
    truncate: bool = Field(True, description="False: a prompt over the max length fails the job instead of being cut.")

    @model_validator(mode="after")
    def _window_fits(self) -> RerankRequest:
        if self.window_tokens is not None and self.window_overlap >= self.window_tokens:
            raise ValueError("window_overlap must be smaller than window_tokens")
        return self

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]

    def document_ids(self) -> list[str | None] | None:
        ids = [None if isinstance(d, str) else d.id for d in self.documents]
        return ids if any(i is not None for i in ids) else None


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: list[RerankRequest] = Field(min_length=1)
    priority: int = Field(5, ge=0, le=9, description="0 (lowest) to 9 (highest); higher-priority chunks run first.")
    metadata: dict[str, str] | None = Field(None, description="Up to 16 string pairs, returned with the job.")
    webhook: WebhookSpec | None = Field(None, description="Called (signed, retried) when the job ends.")

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None and (len(v) > 16 or any(len(k) > 64 or len(x) > 512 for k, x in v.items())):
            raise ValueError("metadata holds at most 16 pairs, keys up to 64 and values up to 512 characters")
        return v

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


class Job(BaseModel):
    id: str
    object: Literal["rerank.job"] = "rerank.job"
    status: JobStatus
    kind: Literal["bulk", "interactive"] = "bulk"
    priority: int
    metadata: dict[str, str] | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: Progress
    request_count: int
    tokens: int = Field(0, description="Prompt tokens scored so far.")
    error: ErrorInfo | None = None
    workers: dict[str, int] = Field(default_factory=dict, description="Pairs scored by each worker (hostname).")
    webhook: WebhookStatus | None = None


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
    custom_id: str | None
    results: list[RankedResult]


class JobResults(BaseModel):
    id: str
    object: Literal["list"] = "list"
    data: list[RequestResults]


def rank(
    scores: list[float],
    top_n: int | None,
    texts: list[str] | None,
    ids: list[str | None] | None,
    windows: list[list[int] | None] | None = None,
) -> list[RankedResult]:
    """Results sorted by score (ties keep document order), cut to top_n (0 or None: all)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[: top_n or None]
    results = []
    for i in order:
        window = windows[i] if windows else None
        results.append(
            RankedResult(
                index=i,
                relevance_score=scores[i],
                id=ids[i] if ids else None,
                document=ResultDocument(text=texts[i]) if texts is not None else None,
                window=WindowInfo(index=window[0], count=window[1], start_token=window[2], end_token=window[3])
                if window
                else None,
            )
        )
    return results


def as_str(value: object) -> str:
    """A Redis reply as text (clients may or may not decode responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_record(raw: Mapping[Any, Any]) -> dict[str, str]:
    """A Redis hash as text keys and values, the form job_from_record reads."""
    return {as_str(k): as_str(v) for k, v in raw.items()}


def job_from_record(r: dict[str, str], workers: dict[str, int], attempts: list[str] | None = None) -> Job:
    """The job as the API shows it, from its Redis hash (decoded), its per-worker pair counts and its webhook
    attempts (JSON entries)."""
    error = ErrorInfo(code=r["error_code"], message=r.get("error_message", "")) if r.get("error_code") else None
    webhook = None
    if r.get("webhook_url"):
        webhook = WebhookStatus(
            url=r["webhook_url"],
            events=json.loads(r["webhook_events"]),
            state=r.get("webhook_state"),
            event=r.get("webhook_event"),
            attempts=[WebhookAttempt.model_validate_json(a) for a in attempts or []],
        )
    return Job(
        id=r["id"],
        status=JobStatus(r["status"]),
        kind="interactive" if r.get("kind") == "interactive" else "bulk",
        tokens=int(r.get("tokens", 0)),
        priority=int(r["priority"]),
        metadata=json.loads(r.get("metadata") or "null"),
        created_at=datetime.fromisoformat(r["created_at"]),
        started_at=datetime.fromisoformat(r["started_at"]) if r.get("started_at") else None,
        finished_at=datetime.fromisoformat(r["finished_at"]) if r.get("finished_at") else None,
        progress=Progress(completed=int(r["completed"]), total=int(r["total"])),
        request_count=int(r["request_count"]),
        error=error,
        workers=workers,
        webhook=webhook,
    )


def assemble_results(
    job_id: str, chunks_total: int, raw_input: bytes | str, raw_chunks: Mapping[Any, Any]
) -> JobResults:
    """Results from the job's input summary and its chunks' stored results (keys: chunk index, str or bytes)."""
    from schemas.chunks import ChunkResult

    by_index = {int(k): v for k, v in raw_chunks.items()}
    flat: list[float] = []
    windows: list[list[int] | None] = []
    for index in range(chunks_total):
        chunk = ChunkResult.model_validate_json(by_index[index])
        flat.extend(chunk.scores)
        windows.extend(chunk.windows or [None] * len(chunk.scores))
    data = []
    offset = 0
    for meta in json.loads(raw_input)["requests"]:
        end = offset + meta["n"]
        ranked = rank(flat[offset:end], meta["top_n"], meta["texts"], meta["ids"], windows[offset:end])
        data.append(RequestResults(custom_id=meta["custom_id"], results=ranked))
        offset = end
    return JobResults(id=job_id, data=data)


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
