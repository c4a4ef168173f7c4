"""What a worker does to jobs: each chunk's take and scores and the job's failure, as moves of `store.job_state`. (A
chunk's re-send is the dispatcher's, `store.dispatch`.)"""

from __future__ import annotations

import logging

import redis
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

from schemas.chunks import ChunkRef, ChunkResult
from schemas.jobs import JobStatus
from store import job_state, moves
from store.job_state import Finished, Recorded, Taken
from store.moves import Move
from store.redis_memory import is_out_of_memory

logger = logging.getLogger(__name__)


class WorkerJobStore:
    def __init__(self, client: redis.Redis, result_ttl_s: int, store_full_wait_s: float = 0.0) -> None:
        self.redis = client
        self.ttl = result_ttl_s
        self.run = moves.Runner(client)
        # A full Redis (noeviction) refuses a take or a record: try again for up to store_full_wait_s, as running
        # jobs end and free their chunks' inputs; then the error goes up and the chunk's job fails `store_full`.
        self._with_room = Retrying(
            retry=retry_if_exception(is_out_of_memory),
            stop=stop_after_delay(store_full_wait_s),
            wait=wait_exponential(multiplier=0.1, max=2.0),
            before_sleep=lambda state: logger.warning("redis full: waiting for room (%r)", state.outcome),
            reraise=True,
        )

    def status(self, job_id: str) -> JobStatus | None:
        return self.run(job_state.status(job_id))

    def should_skip(self, job_id: str) -> bool:
        """True when the job is gone, cancelled, failed or already done: its remaining chunks need no scoring."""
        status = self.status(job_id)
        return status is None or status.final

    def take(self, ref: ChunkRef, worker: str) -> Taken:
        return self._with_room(self.run, job_state.take(ref.job_id, ref.index, worker, ref.lane, ref.seq))

    def record_chunk(self, ref: ChunkRef, result: ChunkResult, worker: str, timings_ms: tuple[int, int]) -> Recorded:
        """Store a chunk's result and its (tokenization, inference) milliseconds. A job that succeeds now is counted
        once (`job_state.ended`)."""
        move = job_state.record_chunk(
            ref.job_id, ref.tenant, ref.index, result.model_dump_json(), len(result.scores), worker, result.tokens,
            self.ttl, *timings_ms,
        )  # fmt: skip
        recorded = self._with_room(self.run, move)
        record = recorded.record
        if record is not None:
            job_state.ended(record)
        return recorded

    def end(self, move: Move[Finished]) -> bool:
        """Run a move that may end a job (fail, expire); whether it moved. An ended job is counted once
        (`job_state.ended`)."""
        finished = self.run(move)
        if finished.moved and finished.job is not None:
            job_state.ended(finished.job.record)
        return finished.moved

    def fail(self, job_id: str, code: str, message: str, tenant: str = "default") -> bool:
        """Fail a job that is not final yet, with its cause (`code`) and reason; whether it moved."""
        return self.end(job_state.fail(job_id, tenant, code, message))
