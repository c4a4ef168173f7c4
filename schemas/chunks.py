"""How a job is cut into chunks, and the chunk message a worker receives.

A job's pairs are numbered request by request, document by document; chunk k holds pairs
[k * chunk_size, (k + 1) * chunk_size). Concatenating the chunks' scores in chunk order gives every pair's score.
A chunk's input (`Chunk`) is stored once, with its job (`rerank:job:{id}:chunks`); its message is a `ChunkRef`.
"""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import BaseModel

from schemas.jobs import JobKind, RerankRequest


class PairOptions(BaseModel):
    """How a request's prompts are cut; the defaults are the model card's (cut the document's end to fit)."""

    max_doc_tokens: int | None = None
    max_prompt_tokens: int | None = None
    truncate: bool = True
    truncate_left: bool = False  # cut a too long document's start instead of its end
    windows: bool = False
    window_tokens: int | None = None
    window_overlap: int = 64

    @classmethod
    def of(cls, request: RerankRequest, max_prompt_tokens: int | None = None) -> PairOptions | None:
        options = cls(
            max_doc_tokens=request.max_tokens_per_doc,
            max_prompt_tokens=max_prompt_tokens,
            truncate=request.truncate,
            truncate_left=request.truncation_side == "left",
            windows=request.long_documents == "windows",
            window_tokens=request.window_tokens,
            window_overlap=request.window_overlap,
        )
        return None if options == cls() else options


class Segment(BaseModel):
    """Consecutive documents of one request inside a chunk."""

    request: int
    query: str
    instruction: str | None
    documents: list[str]
    options: PairOptions | None = None


class ChunkResult(BaseModel):
    """What a worker stores for a chunk: a score per pair, the winning window per pair (windows mode) and the
    prompt tokens it scored, in all and per request."""

    scores: list[float]
    windows: list[list[int] | None] | None = None  # [index, count, start_token, end_token]
    tokens: int = 0
    request_tokens: list[list[int]] | None = None  # [request, prompt tokens] per segment, in segment order


class Chunk(BaseModel):
    job_id: str
    tenant: str = "default"  # the job's tenant, for the job-state scripts (its in-flight set)
    index: int
    priority: int
    segments: list[Segment]

    @property
    def size(self) -> int:
        return sum(len(s.documents) for s in self.segments)


# The farm's one priority scale, from the API to the engine: a job's priority 0 (lowest) .. 9, and interactive calls
# above every job, INTERACTIVE_PRIORITY .. INTERACTIVE_PRIORITY + 9 by their tenant's share (a chunk's step in the
# interactive queue, `store.queueing.interactive_steps`: step 0 is the most urgent). Higher is served first. The
# broker's lanes (`store.queueing.celery_priority`) and vLLM (-priority) translate it at their own boundaries.
INTERACTIVE_PRIORITY = 10
QUEUE_STEPS = 10  # each queue's steps in the broker (`store.queueing`): a bulk job's priority, an interactive share


def chunk_priority(kind: JobKind, job_priority: int, step: int = 0) -> int:
    """The priority a job's chunks are scored at; an interactive chunk's by its step in the interactive queue, so
    that the engine, too, serves a tenant with little in flight before one with much (a chunk sent again: step 0)."""
    return INTERACTIVE_PRIORITY + QUEUE_STEPS - 1 - step if kind == JobKind.interactive else job_priority


class ChunkRef(BaseModel):
    """A chunk message: which chunk, and where and how often it was sent. No document text travels through the
    broker; the worker reads the chunk's input from the job store when it takes the message."""

    job_id: str
    index: int
    tenant: str = "default"
    priority: int  # `chunk_priority`: 0..9 bulk, INTERACTIVE_PRIORITY and up interactive
    lane: str  # the Redis list it was pushed to (queue, with its priority step)
    seq: int  # its sequence number in that lane
    send: int = 1  # 1 for the first send, +1 for each re-send

    @property
    def member(self) -> str:
        return f"{self.job_id}:{self.index}"


def split_into_chunks(
    job_id: str,
    requests: list[RerankRequest],
    chunk_size: int,
    priority: int,
    max_prompt_tokens: int | None = None,
    tenant: str = "default",
) -> Iterator[Chunk]:
    segments: list[Segment] = []
    room = chunk_size
    index = 0
    for r, request in enumerate(requests):
        texts = request.texts()
        options = PairOptions.of(request, max_prompt_tokens)
        start = 0
        while start < len(texts):
            take = texts[start : start + room]
            segments.append(
                Segment(
                    request=r, query=request.query, instruction=request.instruction, documents=take, options=options
                )
            )
            start += len(take)
            room -= len(take)
            if room == 0:
                yield Chunk(job_id=job_id, tenant=tenant, index=index, priority=priority, segments=segments)
                index, segments, room = index + 1, [], chunk_size
    if segments:
        yield Chunk(job_id=job_id, tenant=tenant, index=index, priority=priority, segments=segments)


def chunk_count(total_pairs: int, chunk_size: int) -> int:
    return -(-total_pairs // chunk_size)
