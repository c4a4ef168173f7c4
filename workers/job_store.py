"""What a worker writes about jobs: each chunk's scores and the job's moves, through `store.job_state`."""

from __future__ import annotations

from datetime import datetime

import redis

from schemas import keys
from schemas.chunks import ChunkResult
from schemas.jobs import JobStatus
from store import job_state
from store.job_state import as_str


class WorkerJobStore:
    def __init__(self, client: redis.Redis, result_ttl_s: int) -> None:
        self.redis = client
        self.ttl = result_ttl_s
        self.scripts = job_state.Scripts(client)

    def status(self, job_id: str) -> str | None:
        value = self.redis.hget(keys.job_key(job_id), "status")
        return None if value is None else as_str(value)

    def should_skip(self, job_id: str) -> bool:
        """True when the job is gone, cancelled, failed or already done: its remaining chunks need no scoring."""
        status = self.status(job_id)
        return status is None or JobStatus(status).final

    def mark_running(self, job_id: str) -> bool:
        return bool(self.scripts.run(job_state.mark_running(job_id)))

    def record_chunk(self, job_id: str, index: int, result: ChunkResult, worker: str, tenant: str = "default") -> str:
        """Store a chunk's result; returns 'finished' (job done), 'recorded', 'duplicate' or 'missing'."""
        move = job_state.record_chunk(
            job_id, tenant, index, result.model_dump_json(), len(result.scores), worker, result.tokens, self.ttl
        )
        return as_str(self.scripts.run(move))

    def fail(self, job_id: str, code: str, message: str, tenant: str = "default") -> bool:
        return bool(self.scripts.run(job_state.fail(job_id, tenant, code, message)))

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
