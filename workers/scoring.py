"""From a chunk to prompts, and from prompt scores back to a score per pair (best window for long documents).
Plain Python: the task wires it to Celery and Redis."""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.chunks import Chunk, ChunkResult
from workers.prompts import Pair, Prompts


@dataclass
class Prepared:
    prompts: list[list[int]] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)  # the pair each prompt belongs to
    spans: list[list[int] | None] = field(default_factory=list)  # [index, count, start, end] of a window prompt
    pairs: int = 0
    windowed: bool = False
    request_tokens: list[list[int]] = field(default_factory=list)  # [request, prompt tokens] per segment


def prepare(prompts: Prompts, chunk: Chunk) -> Prepared:
    """Tokenize every pair of the chunk (InvalidInput propagates: the input is at fault)."""
    out = Prepared()
    for segment in chunk.segments:
        first = len(out.prompts)
        pairs = [Pair(segment.query, d, segment.instruction) for d in segment.documents]
        options = segment.options
        if options is not None and options.windows:
            out.windowed = True
            for pair in pairs:
                windows = prompts.windows(pair, options)
                for k, w in enumerate(windows):
                    out.prompts.append(w.token_ids)
                    out.owners.append(out.pairs)
                    out.spans.append([k, len(windows), w.start, w.end])
                out.pairs += 1
        else:
            out.prompts.extend(prompts.encode(pairs, options))
            out.owners.extend(range(out.pairs, out.pairs + len(pairs)))
            out.spans.extend([None] * len(pairs))
            out.pairs += len(pairs)
        out.request_tokens.append([segment.request, sum(len(p) for p in out.prompts[first:])])
    return out


def aggregate(prepared: Prepared, scores: list[float]) -> ChunkResult:
    """A pair's score is its best prompt's; windows mode reports which window won."""
    best: list[float] = [-1.0] * prepared.pairs
    won: list[list[int] | None] = [None] * prepared.pairs
    for owner, span, score in zip(prepared.owners, prepared.spans, scores, strict=True):
        if score > best[owner]:
            best[owner], won[owner] = score, span
    return ChunkResult(
        scores=best,
        windows=won if prepared.windowed else None,
        tokens=sum(len(p) for p in prepared.prompts),
        request_tokens=prepared.request_tokens,
    )
