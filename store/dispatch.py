"""The dispatcher: every send of a chunk to the broker (first, fed from a backlog or an interactive call's; again,
after an engine error or a loss) and every give-up, so that "every accepted job comes back" is kept in one place.
What a backlog sends next is `store.backlog`'s; how a chunk's sends are counted is `store.chunk_ledger`'s."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import redis

from schemas import metrics
from schemas.chunks import ChunkRef
from schemas.settings import Settings
from store import backlog, moves, redis_memory
from store.chunk_ledger import Ledger
from store.job_state import JobHandle
from store.queueing import publish, resend_lane

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)

# The cause of a re-send, and the job's error code when the chunk was sent as often as allowed.
GIVE_UP_CODES = {"engine_error": "engine_error", "lost": "chunk_lost"}


class Dispatcher:
    """Every send of a chunk to the broker from a sync client (workers), and every give-up: the feed from a model's
    backlog, the re-send of a chunk whose engine call failed or that recovery found lost, and the end of its job when
    it was sent RERANK_CHUNK_MAX_RETRIES + 1 times. (The API's sends are `afeed` and `asend` below.) Counted in
    `rerank_chunk_sends_total` by cause and `rerank_chunks_given_up_total` by the job's error code.

    Beside it, kombu redelivers a message whose worker died before acking it (the lease lapses, `workers.lease`) and
    one a worker gives back while Redis is away (`workers.tasks`): the same message again, not a new send, which the
    ledger's first-write-wins record counts once."""

    def __init__(self, client: Any, app: Celery, settings: Settings) -> None:
        self.app = app
        self.run = moves.Runner(client)
        self.ledger = Ledger(client)
        self.depth = settings.lane_depth
        self.ttl_s = settings.result_ttl_s
        self.max_sends = settings.chunk_max_retries + 1

    def feed(self, model: str) -> int:
        """Top the model's bulk lanes up from its backlog, in fair order; how many chunks were sent."""
        refs = self.run(backlog.feed(model, self.depth, self.ttl_s))
        if refs:
            publish(self.app, refs)
            metrics.CHUNK_SENDS.labels("first").inc(len(refs))
        return len(refs)

    def send_again(self, ref: ChunkRef, cause: str, reason: str) -> str:
        """Send the chunk again (`cause`: 'engine_error' or 'lost'; `ref` as it was last sent), into the first step
        of its queue (`store.queueing.resend_lane`), unless someone else did (the ledger's send count is compared and
        set: 'raced'), it was recorded or its job ended ('recorded', 'gone'), or it was sent as often as allowed: then
        its job fails ('exhausted'). A Redis too full to count the send fails the job too (`store_full`). Returns the
        outcome ('sent' or one of those)."""
        lane = resend_lane(ref.lane)
        try:
            outcome, seq, sends = self.ledger.resend(ref.job_id, ref.index, lane, ref.send, self.max_sends)
        except redis.RedisError as exc:
            if not redis_memory.is_out_of_memory(exc):
                raise
            self.give_up(ref, "store_full", f"chunk {ref.index} cannot be sent again: Redis is full ({exc}); {reason}")
            return "exhausted"
        if outcome == "sent":
            publish(self.app, [ref.model_copy(update={"lane": lane, "seq": seq, "send": sends})])
            metrics.CHUNK_SENDS.labels(cause).inc()
            event = {"event": "chunk.sent_again", "job": ref.job_id, "chunk": ref.index, "cause": cause, "send": sends}
            logger.warning("job %s chunk %d %s: sent again (send %d)", ref.job_id, ref.index, reason, sends,
                           extra=event)  # fmt: skip
        elif outcome == "exhausted":
            message = (
                f"chunk {ref.index} was sent {sends} times and never scored (RERANK_CHUNK_MAX_RETRIES="
                f"{self.max_sends - 1}); the last time: {reason}"
            )
            self.give_up(ref, GIVE_UP_CODES[cause], message)
        return outcome

    def give_up(self, ref: ChunkRef, code: str, message: str) -> bool:
        """The chunk's job fails with `code` (a no-op for a job that has ended); whether it moved."""
        finished = self.run(JobHandle(ref.job_id, ref.tenant).fail(code, message))
        if finished.moved:
            metrics.CHUNKS_GIVEN_UP.labels(code).inc()
        return finished.moved


async def asend(app: Celery, refs: list[ChunkRef]) -> None:
    """First sends from the API (an interactive call's chunks, whose ledger entries its creating transaction wrote;
    what its feed took from a backlog), published from a thread."""
    import anyio

    if refs:
        await anyio.to_thread.run_sync(publish, app, refs)
        metrics.CHUNK_SENDS.labels("first").inc(len(refs))


async def afeed(run: moves.AsyncRunner, app: Celery, settings: Settings, model: str) -> int:
    """`Dispatcher.feed` from the API's asyncio client."""
    refs = await run(backlog.feed(model, settings.lane_depth, settings.result_ttl_s))
    await asend(app, refs)
    return len(refs)
