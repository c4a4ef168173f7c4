"""How a job is cut into chunks, and the chunk message a worker receives.

A job's pairs are numbered request by request, document by document; chunk k holds pairs
[k * chunk_size, (k + 1) * chunk_size). Concatenating the chunks' scores in chunk order gives every pair's score.
"""

from __future__ import annotations

from collections.abc import Iterator

from pydantic import BaseModel

from schemas.jobs import RerankRequest


class Segment(BaseModel):
    """Consecutive documents of one request inside a chunk."""

    request: int
    query: str
    instruction: str | None
    documents: list[str]


class Chunk(BaseModel):
    job_id: str
    index: int
    priority: int
    segments: list[Segment]

    @property
    def size(self) -> int:
        return sum(len(s.documents) for s in self.segments)


def split_into_chunks(job_id: str, requests: list[RerankRequest], chunk_size: int, priority: int) -> Iterator[Chunk]:
    segments: list[Segment] = []
    room = chunk_size
    index = 0
    for r, request in enumerate(requests):
        texts = request.texts()
        start = 0
        while start < len(texts):
            take = texts[start : start + room]
            segments.append(Segment(request=r, query=request.query, instruction=request.instruction, documents=take))
            start += len(take)
            room -= len(take)
            if room == 0:
                yield Chunk(job_id=job_id, index=index, priority=priority, segments=segments)
                index, segments, room = index + 1, [], chunk_size
    if segments:
        yield Chunk(job_id=job_id, index=index, priority=priority, segments=segments)


def chunk_count(total_pairs: int, chunk_size: int) -> int:
    return -(-total_pairs // chunk_size)
