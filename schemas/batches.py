"""Files and batches: the OpenAI Batch API's shapes (also Voyage's batch), over the farm's jobs. A batch is a job."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.jobs import check_metadata

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]

# The calls a batch line may make, and the path each is served on (clients write them with or without the slash).
BATCH_ENDPOINTS = ("/v1/rerank", "/v2/rerank", "/rerank", "/v1/score", "/score")


def endpoint_path(value: str) -> str:
    return "/" + value.strip().lstrip("/")


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int | None = Field(description="Size in bytes; null for a batch's output, which is written as it is read.")
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None


class Page(BaseModel):
    """A page of a list, OpenAI's way: `data`, `has_more`, and the first and last ids (the next page is `after`
    the last)."""

    object: Literal["list"] = "list"
    data: Sequence[FileObject | Batch]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None

    @classmethod
    def of(cls, data: Sequence[Any], has_more: bool) -> Self:
        first, last = (data[0].id, data[-1].id) if data else (None, None)
        return cls(data=data, has_more=has_more, first_id=first, last_id=last)


class FileList(Page):
    data: list[FileObject]


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI's `output_expires_after` and the like: accepted, ignored

    input_file_id: str = Field(description="An uploaded JSONL file (purpose `batch`) of this tenant.")
    endpoint: str = Field(
        "/v1/rerank",
        description="The call each line makes unless it names its own `url`: /v1/rerank, /v2/rerank, /rerank, "
        "/v1/score (`v1/rerank` without the slash is read the same).",
    )
    completion_window: str = Field("24h", pattern=r"^\d{1,4}h$", description="`24h` and the like: hours.")
    metadata: dict[str, str] | None = Field(None, description="Up to 16 string pairs, returned with the batch.")
    request_params: dict[str, Any] | None = Field(
        None, description="Voyage: fields every line's body takes unless it sets them (the `model`, for one)."
    )

    _small_metadata = field_validator("metadata")(check_metadata)

    @field_validator("endpoint")
    @classmethod
    def _known_endpoint(cls, v: str) -> str:
        path = endpoint_path(v)
        if path not in BATCH_ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(BATCH_ENDPOINTS)}")
        return path

    @property
    def window_s(self) -> int:
        return int(self.completion_window[:-1]) * 3600


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class PairProgress(BaseModel):
    completed: int = Field(description="Pairs scored so far.")
    total: int


class Batch(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None
    job_id: str | None = Field(None, description="The farm job running the batch (/v1/jobs/{id}).")
    progress: PairProgress | None = Field(None, description="The job's progress in pairs, as it goes.")


class BatchList(Page):
    data: list[Batch]


class OutputResponse(BaseModel):
    status_code: int
    request_id: str
    body: Any


class OutputLine(BaseModel):
    """One line of a batch's output file; clients join lines to their input on `custom_id`."""

    id: str
    custom_id: str
    response: OutputResponse | None
    error: BatchError | None = None
