"""A job's results, read from Redis as they are needed: the one reader behind the results endpoints, interactive
answers, batch output and webhooks. Each request's ranked results come from the job's input summary (`JobInput`),
its chunks' stored scores (`rerank:job:{id}:scores`), and, for requests whose results echo documents, the chunks'
inputs (`rerank:job:{id}:chunks`). Rendering them for a client is the API's business (`api.shapes`).

`ResultReader` holds the logic and no connection; `open_results` (asyncio) drives it, a few chunks per Redis round
trip, so that a reader holds the input summary and a few chunks, never a job's whole results.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from schemas import keys
from schemas.chunks import Chunk, ChunkResult
from schemas.errors import JobNotFound
from schemas.jobs import RankedResult, RequestResults, ResultDocument, WindowInfo
from store.job_state import JobInput, JobRecord

READ_CHUNKS = 32  # chunk results read per Redis round trip


def rank(
    scores: Sequence[float | None],
    top_n: int | None,
    texts: list[str] | None,
    ids: list[str | None] | None,
    windows: list[list[int] | None] | None = None,
) -> list[RankedResult]:
    """Results sorted by score (ties keep document order), cut to top_n (0 or None: all). A document without a score
    (its chunk never scored: an expired job's partial results) is left out."""
    scored = {i: s for i, s in enumerate(scores) if s is not None}
    order = sorted(scored, key=lambda i: -scored[i])[: top_n or None]
    results = []
    for i in order:
        window = windows[i] if windows else None
        results.append(
            RankedResult(
                index=i,
                relevance_score=scored[i],
                id=ids[i] if ids else None,
                document=ResultDocument(text=texts[i]) if texts is not None else None,
                window=WindowInfo(index=window[0], count=window[1], start_token=window[2], end_token=window[3])
                if window
                else None,
            )
        )
    return results


class ResultReader:
    """Turns a job's chunk results, fed in chunk order, into its requests' ranked results as soon as each request's
    pairs are all in: only the pairs of the request being completed are held. `partial` (a job that expired): a chunk
    never scored leaves its documents out of their requests' results instead of failing the read."""

    def __init__(self, record: JobRecord, job_input: JobInput, partial: bool = False) -> None:
        self.job_id = record.id
        self.chunks_total = record.chunks_total
        self.partial = partial
        self.chunk_size, self.total = record.chunk_size, record.total
        self._chunk = 0  # the index of the chunk fed next
        self.needs_inputs = job_input.echo  # feed `add` each chunk's input too
        self._requests = iter(job_input.requests)
        self._next = next(self._requests, None)
        self._scores: list[float | None] = []
        self._texts: list[str] = []
        self._windows: list[list[int] | None] = []
        self._request = 0  # the number of the request completed next
        self._tokens: dict[int, int] | None = {}  # prompt tokens per request; None once a chunk did not say

    def reads(self) -> Iterator[list[int]]:
        """The chunk indexes to read next, READ_CHUNKS at a time."""
        for start in range(0, self.chunks_total, READ_CHUNKS):
            yield list(range(start, min(start + READ_CHUNKS, self.chunks_total)))

    def feed(self, raw_scores: Sequence[Any], raw_inputs: Sequence[Any] | None) -> list[RequestResults]:
        """The HMGET replies for one `reads()` batch (inputs only where `needs_inputs`); JobNotFound when a chunk is
        missing (the job expired while being read)."""
        done: list[RequestResults] = []
        for i, raw in enumerate(raw_scores):
            raw_input = raw_inputs[i] if raw_inputs is not None else None
            if raw is None and self.partial:  # never scored: its pairs have no score
                pairs = min(self.chunk_size, self.total - self._chunk * self.chunk_size)
                done.extend(self.add(ChunkResult(scores=[], windows=None, request_tokens=[]), None, missing=pairs))
                continue
            if raw is None or (self.needs_inputs and raw_input is None):
                raise JobNotFound(self.job_id)
            chunk_input = Chunk.model_validate_json(raw_input) if raw_input is not None else None
            done.extend(self.add(ChunkResult.model_validate_json(raw), chunk_input))
        return done

    def add(self, chunk: ChunkResult, chunk_input: Chunk | None = None, missing: int = 0) -> list[RequestResults]:
        """One chunk's scores; or, with `missing`, that many pairs of a chunk never scored."""
        self._chunk += 1
        self._scores.extend(chunk.scores or [None] * missing)
        if chunk_input is not None:
            self._texts.extend(text for segment in chunk_input.segments for text in segment.documents)
        elif missing and self.needs_inputs:
            self._texts.extend([""] * missing)
        self._windows.extend(chunk.windows or [None] * len(chunk.scores or [None] * missing))
        if chunk.request_tokens is None:
            self._tokens = None
        elif self._tokens is not None:
            for request, count in chunk.request_tokens:
                self._tokens[request] = self._tokens.get(request, 0) + count
        done = []
        while self._next is not None and len(self._scores) >= self._next.n:
            meta, n = self._next, self._next.n
            texts = self._texts[:n] if meta.echo else None
            ranked = rank(self._scores[:n], meta.top_n, texts, meta.ids, self._windows[:n])
            tokens: int | None = self._tokens.pop(self._request, 0) if self._tokens is not None else None
            done.append(RequestResults(custom_id=meta.custom_id, results=ranked, tokens=tokens))
            del self._scores[:n], self._windows[:n], self._texts[:n]
            self._request += 1
            self._next = next(self._requests, None)
        return done

    def check_complete(self) -> None:
        if self._next is not None or self._scores:
            raise ValueError("the chunks' scores do not match the job's requests")


def _input(raw: Any, job_id: str) -> JobInput:
    if raw is None:
        raise JobNotFound(job_id)
    return JobInput.model_validate_json(raw)


async def open_results(client: Any, record: JobRecord, partial: bool = False) -> AsyncIterator[RequestResults]:
    """The job's results, request by request, from an asyncio Redis client (`partial`: what was scored of a job that
    expired). Raises JobNotFound here when they expired (before a response starts), or from the stream when they
    expire while it is read."""
    reader = ResultReader(record, _input(await client.get(keys.job_input_key(record.id)), record.id), partial)

    async def results() -> AsyncIterator[RequestResults]:
        for indexes in reader.reads():
            inputs = await client.hmget(keys.job_chunks_key(record.id), indexes) if reader.needs_inputs else None
            for entry in reader.feed(await client.hmget(keys.job_scores_key(record.id), indexes), inputs):
                yield entry
        reader.check_complete()

    return results()
