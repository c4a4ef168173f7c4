"""A job's results, assembled from its input summary and its chunks' stored scores (`rerank:job:{id}:scores`), with
the documents' texts from the chunks' inputs (`rerank:job:{id}:chunks`) for requests whose results echo them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from schemas.chunks import Chunk, ChunkResult
from schemas.jobs import JobResults, RankedResult, RequestResults, ResultDocument, WindowInfo


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


class ResultAssembler:
    """Turns a job's chunk results, fed in chunk order, into its requests' ranked results as soon as each request's
    pairs are all in: the whole job is never held, only the pairs of the request being completed."""

    def __init__(self, requests_meta: Iterable[dict[str, Any]]) -> None:
        metas = list(requests_meta)
        self.needs_inputs = any(m.get("echo") for m in metas)  # feed `add` each chunk's input too
        self._requests = iter(metas)
        self._next: dict[str, Any] | None = next(self._requests, None)
        self._scores: list[float] = []
        self._texts: list[str] = []
        self._windows: list[list[int] | None] = []
        self._request = 0  # the number of the request completed next
        self._tokens: dict[int, int] | None = {}  # prompt tokens per request; None once a chunk did not say

    def add(self, chunk: ChunkResult, chunk_input: Chunk | None = None) -> list[RequestResults]:
        self._scores.extend(chunk.scores)
        if chunk_input is not None:
            self._texts.extend(text for segment in chunk_input.segments for text in segment.documents)
        self._windows.extend(chunk.windows or [None] * len(chunk.scores))
        if chunk.request_tokens is None:
            self._tokens = None
        elif self._tokens is not None:
            for request, count in chunk.request_tokens:
                self._tokens[request] = self._tokens.get(request, 0) + count
        done = []
        while self._next is not None and len(self._scores) >= self._next["n"]:
            meta, n = self._next, self._next["n"]
            texts = self._texts[:n] if meta.get("echo") else None
            ranked = rank(self._scores[:n], meta["top_n"], texts, meta["ids"], self._windows[:n])
            tokens: int | None = self._tokens.pop(self._request, 0) if self._tokens is not None else None
            done.append(RequestResults(custom_id=meta["custom_id"], results=ranked, tokens=tokens))
            del self._scores[:n], self._windows[:n], self._texts[:n]
            self._request += 1
            self._next = next(self._requests, None)
        return done

    def check_complete(self) -> None:
        if self._next is not None or self._scores:
            raise ValueError("the chunks' scores do not match the job's requests")


def assemble_results(
    job_id: str,
    chunks_total: int,
    raw_input: bytes | str,
    raw_chunks: Mapping[Any, Any],
    raw_inputs: Mapping[Any, Any] | None = None,
) -> JobResults:
    """Results from the job's input summary and its chunks' stored results and inputs (keys: chunk index, str or
    bytes; the inputs are needed only where `ResultAssembler.needs_inputs`)."""
    by_index = {int(k): v for k, v in raw_chunks.items()}
    inputs = {int(k): v for k, v in (raw_inputs or {}).items()}
    assembler = ResultAssembler(json.loads(raw_input)["requests"])
    data = []
    for index in range(chunks_total):
        chunk_input = Chunk.model_validate_json(inputs[index]) if assembler.needs_inputs else None
        data.extend(assembler.add(ChunkResult.model_validate_json(by_index[index]), chunk_input))
    assembler.check_complete()
    return JobResults(id=job_id, data=data)
