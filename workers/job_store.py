"""What a worker writes about jobs: each chunk's take and scores and the job's moves, through `store.job_state`, and
a chunk's re-send through `store.chunk_ledger`."""

from __future__ import annotations

from datetime import datetime

import redis

from schemas import keys, metrics
from schemas.chunks import Chunk, ChunkRef, ChunkResult
from schemas.jobs import JobStatus
from schemas.queueing import resend_lane
from store import job_state
from store.chunk_ledger import Ledger
from store.job_state import as_str


class WorkerJobStore:
    def __init__(self, client: redis.Redis, result_ttl_s: int) -> None:
        self.redis = client
        self.ttl = result_ttl_s
        self.scripts = job_state.Scripts(client)
        self.ledger = Ledger(client)

    def status(self, job_id: str) -> str | None:
        value = self.redis.hget(keys.job_key(job_id), "status")
        return None if value is None else as_str(value)

    def should_skip(self, job_id: str) -> bool:
        """True when the job is gone, cancelled, failed or already done: its remaining chunks need no scoring."""
        status = self.status(job_id)
        return status is None or JobStatus(status).final

    def take(self, ref: ChunkRef, worker: str) -> tuple[str, Chunk | None, bool]:
        """Take a chunk message: (outcome, the chunk's input, whether the job started now). Outcome 'taken' comes
        with the input; else the job's final status, 'gone' (expired) or 'duplicate' (recorded already)."""
        reply = self.scripts.run(job_state.take(ref.job_id, ref.index, worker, ref.lane, ref.seq))
        outcome = as_str(reply[0])
        if outcome != "taken":
            return outcome, None, False
        return outcome, Chunk.model_validate_json(reply[1]), bool(int(reply[2]))

    def resend(self, ref: ChunkRef, max_sends: int) -> tuple[str, ChunkRef | None]:
        """Count another send of the chunk this message delivered: ('sent', the new message to publish), or
        'exhausted' (sent `max_sends` times), 'raced' (sent again by someone else), 'recorded' or 'gone'."""
        lane = resend_lane(ref.lane)
        outcome, seq, sends = self.ledger.resend(ref.job_id, ref.index, lane, ref.send, max_sends)
        if outcome != "sent":
            return outcome, None
        return outcome, ref.model_copy(update={"lane": lane, "seq": seq, "send": sends})

    def record_chunk(
        self,
        job_id: str,
        index: int,
        result: ChunkResult,
        worker: str,
        tenant: str = "default",
        timings_ms: tuple[int, int] = (0, 0),
    ) -> str:
        """Store a chunk's result and its (tokenization, inference) milliseconds; returns 'finished' (job done),
        'recorded', 'duplicate' or 'missing'."""
        move = job_state.record_chunk(
            job_id, tenant, index, result.model_dump_json(), len(result.scores), worker, result.tokens, self.ttl,
            *timings_ms,
        )  # fmt: skip
        return as_str(self.scripts.run(move))

    def fail(self, job_id: str, code: str, message: str, tenant: str = "default") -> bool:
        """Fail a job that is not final yet, with its cause (`code`) and reason; returns whether it moved. Counted
        in `rerank_jobs_failed_total` by cause."""
        failed = bool(self.scripts.run(job_state.fail(job_id, tenant, code, message)))
        if failed:
            metrics.JOBS_FINISHED.labels("failed").inc()
            metrics.JOBS_FAILED.labels(code).inc()
        return failed

    def latency(self, job_id: str) -> tuple[str, float] | None:
        """(kind, seconds from creation to finish) of a finished job."""
        kind, created, finished = (
            None if v is None else as_str(v)
            for v in self.redis.hmget(keys.job_key(job_id), "kind", "created_at", "finished_at")
        )
        if not (created and finished):
            return None
        seconds = (datetime.fromisoformat(finished) - datetime.fromisoformat(created)).total_seconds()
        return kind or "bulk", seconds
