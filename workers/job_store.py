"""What a worker writes about jobs: state changes and each chunk's scores, atomically and idempotently."""

from __future__ import annotations

from datetime import UTC, datetime

import redis

from schemas import keys
from schemas.chunks import ChunkResult
from schemas.jobs import as_str

# KEYS: job, scores, workers, input, done. ARGV: chunk index, result JSON, pairs in chunk, worker, now, ttl seconds,
# tokens, done ttl. HSETNX makes a chunk count once however often it is delivered; the last chunk finishes the job.
_RECORD_CHUNK = (
    keys.FINAL_LUA
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 'duplicate' end
redis.call('HINCRBY', KEYS[3], ARGV[4], ARGV[3])
redis.call('HINCRBY', KEYS[1], 'completed', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'tokens', ARGV[7])
local done = redis.call('HINCRBY', KEYS[1], 'chunks_done', 1)
for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[6]) end
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[5])
  status = 'running'
end
if status == 'running' and done >= tonumber(redis.call('HGET', KEYS[1], 'chunks_total')) then
  redis.call('HSET', KEYS[1], 'status', 'succeeded', 'finished_at', ARGV[5])
  finalize('succeeded')
  return 'finished'
end
return 'recorded'
"""
)

# KEYS: job. ARGV: now.
_MARK_RUNNING = """
if redis.call('HGET', KEYS[1], 'status') == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1])
  return 1
end
return 0
"""

# KEYS: job, (unused x3), done. ARGV: code, message, now, done ttl. Only a job that is not final yet can fail.
_FAIL = (
    keys.FINAL_LUA
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[3],
             'error_code', ARGV[1], 'error_message', ARGV[2])
  finalize('failed')
  return 1
end
return 0
"""
)

FINAL = {"succeeded", "failed", "cancelled"}


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


class WorkerJobStore:
    def __init__(self, client: redis.Redis, result_ttl_s: int) -> None:
        self.redis = client
        self.ttl = result_ttl_s
        self._record = client.register_script(_RECORD_CHUNK)
        self._running = client.register_script(_MARK_RUNNING)
        self._fail = client.register_script(_FAIL)

    def status(self, job_id: str) -> str | None:
        value = self.redis.hget(keys.job_key(job_id), "status")
        return None if value is None else as_str(value)

    def should_skip(self, job_id: str) -> bool:
        """True when the job is gone, cancelled, failed or already done: its remaining chunks need no scoring."""
        status = self.status(job_id)
        return status is None or status in FINAL

    def mark_running(self, job_id: str) -> bool:
        return bool(self._running(keys=[keys.job_key(job_id)], args=[now_iso()]))

    def record_chunk(self, job_id: str, chunk_index: int, result: ChunkResult, worker: str) -> str:
        """Store a chunk's result; returns 'finished' (job done), 'recorded', 'duplicate' or 'missing'."""
        outcome = self._record(
            keys=keys.job_script_keys(job_id),
            args=[
                chunk_index,
                result.model_dump_json(),
                len(result.scores),
                worker,
                now_iso(),
                self.ttl,
                result.tokens,
                keys.DONE_TTL_S,
            ],
        )
        return as_str(outcome)

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

    def fail(self, job_id: str, code: str, message: str) -> bool:
        args: list[str | int] = [code, message[:2000], now_iso(), keys.DONE_TTL_S]
        return bool(self._fail(keys=keys.job_script_keys(job_id), args=args))
