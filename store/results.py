"""A job's results, assembled from its input summary and its chunks' stored scores (`rerank:job:{id}:scores`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from schemas.chunks import ChunkResult
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


def assemble_results(
    job_id: str, chunks_total: int, raw_input: bytes | str, raw_chunks: Mapping[Any, Any]
) -> JobResults:
    """Results from the job's input summary and its chunks' stored results (keys: chunk index, str or bytes)."""
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
