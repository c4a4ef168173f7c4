"""A job's state: its record in Redis, every move between states, and the Lua scripts that make each move atomic.

Every move of a job's status is here (the record's type, its creation, and the Lua moves below); the API's and the
workers' job stores make them through it. Not yet here: the webhook worker and the API write the webhook delivery
fields of the hash themselves, and the stores read single fields with HGET. `store.chunk_ledger` keeps the chunks'
own state (sent, re-sent, renewed) beside it.

    queued ──first chunk taken──▶ running ──last chunk recorded──▶ succeeded
       │                             │
       └──────── cancel, fail ───────┴──▶ cancelled | failed

`TAKE` (a worker takes a chunk) is the one move from queued to running. Every move into a final state goes through
`FINISH` or `RECORD_CHUNK`, whose shared prelude `finalize` runs in the same script: it takes the job out of its
tenant's in-flight set, pushes the status to the done-list when someone waits on the job (an interactive call),
schedules the webhook event the job asked for, and drops the chunks' ledger and inputs (the inputs are kept when
results echo documents). Nothing can set a final state without those following.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, NamedTuple

from schemas import keys
from schemas.chunks import Chunk
from schemas.jobs import ErrorInfo, Job, JobStatus, Progress, Timings
from schemas.webhooks import WebhookAttempt, WebhookStatus


def now_iso() -> str:
    """The time stamps of job records: ISO 8601, UTC."""
    return datetime.now(UTC).isoformat()


def as_str(value: object) -> str:
    """A Redis reply as text (clients may or may not decode responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_hash(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {as_str(k): as_str(v) for k, v in raw.items()}


@dataclass
class JobRecord:
    """The job hash `rerank:job:{id}`, typed. Webhook fields are written by the webhook worker as it delivers."""

    id: str
    priority: int
    created_at: str
    total: int  # pairs
    chunks_total: int
    request_count: int
    tenant: str = "default"
    kind: str = "bulk"  # or "interactive"
    status: str = JobStatus.queued.value
    notify: int = 0  # 1: push the final status to the done-list (someone waits on it)
    metadata: str = "null"  # JSON
    completed: int = 0  # pairs scored
    chunks_done: int = 0
    tokens: int = 0
    started_at: str = ""
    finished_at: str = ""
    error_code: str = ""
    error_message: str = ""
    webhook_url: str = ""
    webhook_events: str = ""  # JSON list of the events the job's webhook wants
    webhook_event: str = ""  # the event being (or last) delivered
    webhook_state: str = ""
    webhook_attempt: int = 0
    keep_input: int = 0  # 1: results echo documents, read from the chunks' inputs, which then outlive the job's end
    tokenize_ms: int = 0  # the slowest recorded chunk's tokenization
    inference_ms: int = 0  # the slowest recorded chunk's wait for its scores

    def to_hash(self) -> dict[Any, Any]:
        """The fields to HSET (empty ones are left out: a missing field reads as its default)."""
        return {k: v for k, v in asdict(self).items() if v != ""}

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any]) -> JobRecord:
        values = decode_hash(raw)
        known: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in values:
                known[f.name] = int(values[f.name]) if f.type == "int" else values[f.name]
        return cls(**known)

    @property
    def final(self) -> bool:
        return JobStatus(self.status).final

    def to_job(self, workers: Mapping[str, int] | None = None, attempts: Sequence[str] = ()) -> Job:
        """The job as the API shows it, with its per-worker pair counts and its webhook attempts (JSON entries)."""
        webhook = None
        if self.webhook_url:
            webhook = WebhookStatus(
                url=self.webhook_url,
                events=json.loads(self.webhook_events or "[]"),
                state=self.webhook_state or None,
                event=self.webhook_event or None,
                attempts=[WebhookAttempt.model_validate_json(a) for a in attempts],
            )
        created = datetime.fromisoformat(self.created_at)
        started = datetime.fromisoformat(self.started_at) if self.started_at else None
        timings = None
        if started is not None:
            queue_ms = round((started - created).total_seconds() * 1000)
            timings = Timings(queue_ms=queue_ms, tokenization_ms=self.tokenize_ms, inference_ms=self.inference_ms)
        return Job(
            id=self.id,
            status=JobStatus(self.status),
            kind="interactive" if self.kind == "interactive" else "bulk",
            tokens=self.tokens,
            priority=self.priority,
            metadata=json.loads(self.metadata or "null"),
            created_at=created,
            started_at=started,
            finished_at=datetime.fromisoformat(self.finished_at) if self.finished_at else None,
            progress=Progress(completed=self.completed, total=self.total),
            request_count=self.request_count,
            error=ErrorInfo(code=self.error_code, message=self.error_message) if self.error_code else None,
            workers=dict(workers or {}),
            webhook=webhook,
            timings=timings,
        )


# The KEYS every job-state script receives, in this order: job, scores, workers, input, done-list, webhooks due
# set, the tenant's in-flight set, chunk inputs, chunk ledger, open chunks.
def script_keys(job_id: str, tenant: str) -> list[str]:
    return [
        keys.job_key(job_id),
        keys.job_scores_key(job_id),
        keys.job_workers_key(job_id),
        keys.job_input_key(job_id),
        keys.job_done_key(job_id),
        keys.WEBHOOKS_DUE,
        keys.tenant_inflight_key(tenant),
        keys.job_chunks_key(job_id),
        keys.job_ledger_key(job_id),
        keys.CHUNKS_OPEN,
    ]


# The prelude of every script that may set a final state. finalize(status): out of the tenant's in-flight set,
# the status to the done-list when someone waits (`notify`), the webhook event scheduled when the job's webhook
# wants it. The script's last ARGV is the done-list's TTL in seconds.
_FINALIZE = """
local function finalize(status)
  local id = redis.call('HGET', KEYS[1], 'id')
  if id then redis.call('SREM', KEYS[7], id) end
  if redis.call('HGET', KEYS[1], 'notify') == '1' then
    redis.call('RPUSH', KEYS[5], status)
    redis.call('EXPIRE', KEYS[5], tonumber(ARGV[#ARGV]))
  end
  local events = redis.call('HGET', KEYS[1], 'webhook_events')
  if id and events and string.find(events, '"job.' .. status .. '"', 1, true) then
    redis.call('HSET', KEYS[1], 'webhook_event', 'job.' .. status, 'webhook_state', 'pending', 'webhook_attempt', 0)
    redis.call('ZADD', KEYS[6], redis.call('TIME')[1], id)
  end
  redis.call('DEL', KEYS[9])
  if redis.call('HGET', KEYS[1], 'keep_input') ~= '1' then redis.call('DEL', KEYS[8]) end
  if id then
    for i = 0, tonumber(redis.call('HGET', KEYS[1], 'chunks_total') or '0') - 1 do
      redis.call('ZREM', KEYS[10], id .. ':' .. i)
    end
  end
end
"""

# ARGV: chunk index, result JSON, pairs in the chunk, worker, now, ttl seconds, tokens, tokenization ms, inference ms,
# done-list ttl. HSETNX makes a chunk count once however often it is delivered (first write wins); a recorded chunk
# leaves the open set; the job keeps the slowest chunk's timings; the last chunk finishes the job. Returns
# 'finished', 'recorded', 'duplicate' (already counted), or 'missing' (the job expired).
RECORD_CHUNK = (
    _FINALIZE
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 'duplicate' end
local id = redis.call('HGET', KEYS[1], 'id')
if id then redis.call('ZREM', KEYS[10], id .. ':' .. ARGV[1]) end
redis.call('HINCRBY', KEYS[3], ARGV[4], ARGV[3])
redis.call('HINCRBY', KEYS[1], 'completed', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'tokens', ARGV[7])
if tonumber(ARGV[8]) > tonumber(redis.call('HGET', KEYS[1], 'tokenize_ms') or '0') then
  redis.call('HSET', KEYS[1], 'tokenize_ms', ARGV[8])
end
if tonumber(ARGV[9]) > tonumber(redis.call('HGET', KEYS[1], 'inference_ms') or '0') then
  redis.call('HSET', KEYS[1], 'inference_ms', ARGV[9])
end
local done = redis.call('HINCRBY', KEYS[1], 'chunks_done', 1)
for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[6]) end
if (status == 'queued' or status == 'running') and done >= tonumber(redis.call('HGET', KEYS[1], 'chunks_total')) then
  redis.call('HSET', KEYS[1], 'status', 'succeeded', 'finished_at', ARGV[5])
  finalize('succeeded')
  return 'finished'
end
return 'recorded'
"""
)

# A worker takes a chunk message. KEYS: job, scores, ledger, open chunks, chunk inputs, the message's lane.
# ARGV: chunk index, worker, now (ISO), now (unix), the message's sequence number in its lane.
# Raises the lane's high-water mark of taken sequence numbers, then returns the job's final status (or 'gone') when
# the chunk needs no scoring, 'duplicate' when it is recorded already; else marks the chunk held by this worker,
# moves a queued job to running and returns {'taken', the chunk's input JSON, 1 when the job started now}.
TAKE = """
local taken = tonumber(redis.call('HGET', KEYS[6], 'taken') or '0')
if tonumber(ARGV[5]) > taken then redis.call('HSET', KEYS[6], 'taken', ARGV[5]) end
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'gone'} end
if status ~= 'queued' and status ~= 'running' then return {status} end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return {'duplicate'} end
local input = redis.call('HGET', KEYS[5], ARGV[1])
if not input then return {'gone'} end
redis.call('HSET', KEYS[3], ARGV[1] .. ':holder', ARGV[2], ARGV[1] .. ':taken_at', ARGV[3])
local id = redis.call('HGET', KEYS[1], 'id')
if id then redis.call('ZADD', KEYS[4], 'XX', ARGV[4], id .. ':' .. ARGV[1]) end
local started = 0
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[3])
  started = 1
end
return {'taken', input, started}
"""

# ARGV: final status ('failed' or 'cancelled'), error code, error message, now, done-list ttl. Only a job that is
# not final yet moves; returns 1 when it did.
FINISH = (
    _FINALIZE
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished_at', ARGV[4])
  if ARGV[2] ~= '' then
    redis.call('HSET', KEYS[1], 'error_code', ARGV[2], 'error_message', ARGV[3])
  end
  finalize(ARGV[1])
  return 1
end
return 0
"""
)


class Move(NamedTuple):
    """One state move: which script, with which KEYS and ARGV."""

    script: str
    keys: list[str]
    args: Sequence[str | int | float]


def record_chunk(job_id: str, tenant: str, index: int, result_json: str, pairs: int, worker: str, tokens: int,
                 ttl_s: int, tokenize_ms: int = 0, inference_ms: int = 0) -> Move:  # fmt: skip
    args: list[str | int] = [index, result_json, pairs, worker, now_iso(), ttl_s, tokens, tokenize_ms, inference_ms]
    args.append(keys.DONE_TTL_S)
    return Move(RECORD_CHUNK, script_keys(job_id, tenant), args)


def create(pipe: Any, record: JobRecord, summary: Mapping[str, Any], chunks: Sequence[Chunk], ttl_s: int) -> None:
    """Queue on `pipe` (the creating transaction) a new job's writes: its record, its input summary (per request
    custom_id, top_n, document count, ids, whether results echo documents), each chunk's input, and its place in
    its tenant's in-flight set. `store.chunk_ledger.Ledger.open_chunks` adds the chunks' first sends to the same
    transaction."""
    pipe.hset(keys.job_key(record.id), mapping=record.to_hash())
    pipe.expire(keys.job_key(record.id), ttl_s)
    pipe.set(keys.job_input_key(record.id), json.dumps(summary), ex=ttl_s)
    if chunks:
        pipe.hset(keys.job_chunks_key(record.id), mapping={c.index: c.model_dump_json() for c in chunks})
        pipe.expire(keys.job_chunks_key(record.id), ttl_s)
    pipe.sadd(keys.tenant_inflight_key(record.tenant), record.id)


def take(job_id: str, index: int, worker: str, lane: str, seq: int) -> Move:
    move_keys = [keys.job_key(job_id), keys.job_scores_key(job_id), keys.job_ledger_key(job_id), keys.CHUNKS_OPEN]
    move_keys += [keys.job_chunks_key(job_id), keys.lane_key(lane)]
    return Move(TAKE, move_keys, [index, worker, now_iso(), time.time(), seq])


def fail(job_id: str, tenant: str, code: str, message: str) -> Move:
    args: list[str | int] = [JobStatus.failed.value, code, message[:2000], now_iso(), keys.DONE_TTL_S]
    return Move(FINISH, script_keys(job_id, tenant), args)


def cancel(job_id: str, tenant: str, code: str = "", message: str = "") -> Move:
    """A cancel by its owner (no reason), or by the farm with one (an interactive call nobody waits for)."""
    args: list[str | int] = [JobStatus.cancelled.value, code, message[:2000], now_iso(), keys.DONE_TTL_S]
    return Move(FINISH, script_keys(job_id, tenant), args)


@dataclass
class Scripts:
    """The job-state scripts registered on one Redis client, sync or asyncio: `run` returns the reply, or an
    awaitable of it for an asyncio client."""

    client: Any
    _registered: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for lua in (RECORD_CHUNK, TAKE, FINISH):
            self._registered[lua] = self.client.register_script(lua)

    def run(self, move: Move) -> Any:
        return self._registered[move.script](keys=move.keys, args=move.args)
