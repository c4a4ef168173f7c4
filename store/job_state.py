"""A job: its typed record and input in Redis, and every write to it as a named move. The one place a job changes.

Moves, each one atomic (a Lua script, or the creating transaction), each returning what its caller reads next. Every
side reaches a job through one handle, `JobHandle(job_id, tenant)`, whose methods are its moves:

    create            the record, the input summary, the chunks' inputs, the tenant's in-flight slot   (API)
    take              a worker takes a chunk: queued -> running on the first       -> Taken       (workers)
    record_chunk      a chunk's scores, counted once; the last one: -> succeeded   -> Recorded    (workers)
    fail, cancel      -> failed | cancelled, with a cause                         -> Finished    (API, workers)
    expire            -> failed `expired`, past its deadline                      -> Finished    (recovery, API)
    webhook_attempt   one delivery attempt of the job's event, and the next due   -> None        (webhook worker)
    redeliver         the job's last event scheduled again                        -> JobView     (API)
    delete            a finished job and all it holds, at once                    -> str         (API)
    read, status      the job as the API shows it; its status alone                              (everyone)

    queued ──first chunk taken──▶ running ──last chunk recorded──▶ succeeded
       │                             │
       └──────── cancel, fail ───────┴──▶ cancelled | failed

Every move into a final state runs the shared prelude `finalize` in its script: the job leaves its tenant's
in-flight set and its model's backlog (what it had not sent, `store.backlog`), its status goes to the done-list
when someone waits on it (an interactive call), the webhook event the job asked for is scheduled, and the chunks'
ledger and inputs go (the inputs stay when results echo documents).
Nothing can set a final state without those following, and each move that changes a job's state counts and logs it
(`Move.then`, run by whichever runner ran the move: once). A move is data (`store.moves.Move`: script, keys, args, and
how to read the reply); `moves.Runner` runs it on a sync client, `moves.AsyncRunner` on an asyncio one.
`store.chunk_ledger` keeps the chunks' own state (sent, re-sent, renewed) beside it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from pydantic import BaseModel

from schemas import keys, metrics
from schemas.chunks import Chunk
from schemas.jobs import ErrorInfo, Job, JobKind, JobStatus, Progress, RerankRequest, Timings
from schemas.webhooks import WebhookAttempt, WebhookState, WebhookStatus
from store import backlog
from store.codec import as_str, decode_hash, now_iso
from store.moves import Move

logger = logging.getLogger(__name__)


_TYPES: dict[str, Any] = {"int": int, "JobKind": JobKind}  # how a record's hash fields are read back (else str)


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
    model: str = ""  # the served model's name: its queues, its workers
    kind: JobKind = JobKind.bulk
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
    webhook_dest: str = ""  # host[:port] of webhook_url: its delivery caps and circuit breaker (store.webhook_queue)
    webhook_events: str = ""  # JSON list of the events the job's webhook wants
    webhook_event: str = ""  # the event being (or last) delivered
    webhook_state: str = ""
    webhook_attempt: int = 0
    keep_input: int = 0  # 1: results echo documents, read from the chunks' inputs, which then outlive the job's end
    deadline_at: str = ""  # ISO time past which the job expires unless it has ended
    chunk_size: int = 0  # pairs per chunk (the last one holds the rest)
    fed: int = 0  # a bulk job's chunks sent from its model's backlog so far (`store.backlog`)
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
                known[f.name] = _TYPES.get(str(f.type), str)(values[f.name])
        return cls(**known)

    @property
    def final(self) -> bool:
        return JobStatus(self.status).final

    @property
    def duration_s(self) -> float | None:
        """Seconds from creation to finish, once finished."""
        if not self.finished_at:
            return None
        return (datetime.fromisoformat(self.finished_at) - datetime.fromisoformat(self.created_at)).total_seconds()

    def to_job(
        self, workers: Mapping[str, int] | None = None, attempts: Sequence[str] = (), expires_at: datetime | None = None
    ) -> Job:
        """The job as the API shows it, with its per-worker pair counts, its webhook attempts (JSON entries) and when
        it leaves Redis."""
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
            kind=self.kind,
            model=self.model or None,
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
            deadline_at=datetime.fromisoformat(self.deadline_at) if self.deadline_at else None,
            expires_at=expires_at,
        )


class RequestInput(BaseModel):
    """What results need of one request besides its scores (`rerank:job:{id}:input`)."""

    custom_id: str | None = None
    top_n: int | None = None
    n: int  # documents
    echo: bool = False  # results echo the documents' texts (read from the chunks' inputs, kept for such jobs)
    ids: list[str | None] | None = None  # the documents' ids, when any had one


class JobInput(BaseModel):
    """A job's input summary: its requests, in order."""

    requests: list[RequestInput]

    @classmethod
    def of(cls, requests: Sequence[RerankRequest]) -> JobInput:
        return cls(
            requests=[
                RequestInput(
                    custom_id=r.custom_id,
                    top_n=r.top_n,
                    n=len(r.documents),
                    echo=r.return_documents,
                    ids=r.document_ids(),
                )
                for r in requests
            ]
        )

    @property
    def echo(self) -> bool:
        return any(r.echo for r in self.requests)


def _fields(flat: Sequence[Any]) -> dict[str, str]:
    """A flat HGETALL reply from a script ([k1, v1, k2, v2, ...]) as a dict of text."""
    return {as_str(flat[i]): as_str(flat[i + 1]) for i in range(0, len(flat), 2)}


@dataclass
class JobView:
    """A job with what the API shows beside its record: pairs per worker and its webhook attempts (JSON entries)."""

    record: JobRecord
    workers: dict[str, int]
    attempts: list[str]
    expires_at: datetime | None = None

    @classmethod
    def from_reply(cls, reply: Sequence[Any]) -> JobView:
        """From a script's `view()`: {job hash, workers hash, attempts list, the record's PTTL}."""
        raw_job, raw_workers, raw_attempts, ttl_ms = reply
        workers = {k: int(v) for k, v in _fields(raw_workers).items()}
        expires_at = datetime.now(UTC) + timedelta(milliseconds=int(ttl_ms)) if int(ttl_ms) >= 0 else None
        return cls(JobRecord.from_hash(_fields(raw_job)), workers, [as_str(a) for a in raw_attempts], expires_at)

    def to_job(self) -> Job:
        return self.record.to_job(self.workers, self.attempts, self.expires_at)


# The KEYS every job-state script receives, in this order: job, scores, workers, input, done-list, the tenant's
# webhooks due set, the tenant's in-flight set, chunk inputs, chunk ledger, open chunks, webhook attempts, the set of
# tenants with deliveries due.
def script_keys(job_id: str, tenant: str) -> list[str]:
    return [
        keys.job_key(job_id),
        keys.job_scores_key(job_id),
        keys.job_workers_key(job_id),
        keys.job_input_key(job_id),
        keys.job_done_key(job_id),
        keys.webhooks_due_key(tenant),
        keys.tenant_inflight_key(tenant),
        keys.job_chunks_key(job_id),
        keys.job_ledger_key(job_id),
        keys.CHUNKS_OPEN,
        keys.job_webhook_attempts_key(job_id),
        keys.WEBHOOK_TENANTS,
        keys.JOB_DEADLINES,
    ]


# view(): the job, its pairs per worker, its webhook attempts and its record's time to live (ms), as
# `JobView.from_reply` reads them.
_VIEW = """
local function view()
  return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[3]), redis.call('LRANGE', KEYS[11], 0, -1),
          redis.call('PTTL', KEYS[1])}
end
"""

# The prelude of every script that may set a final state. finalize(status): out of the tenant's in-flight set,
# the status to the done-list when someone waits (`notify`), the webhook event scheduled when the job's webhook
# wants it. The script's last ARGV is the done-list's TTL in seconds.
_FINALIZE = (
    backlog.BACKLOG
    + """
local function finalize(status)
  local id = redis.call('HGET', KEYS[1], 'id')
  if id then redis.call('SREM', KEYS[7], id) end
  if id and redis.call('HGET', KEYS[1], 'kind') ~= 'interactive' then
    local job = redis.call('HMGET', KEYS[1], 'model', 'priority', 'tenant')
    backlog_drop('"""
    + keys.backlog_prefix("")
    + """' .. (job[1] or ''), job[2] or '0', job[3] or 'default', id)
  end
  if redis.call('HGET', KEYS[1], 'notify') == '1' then
    redis.call('RPUSH', KEYS[5], status)
    redis.call('EXPIRE', KEYS[5], tonumber(ARGV[#ARGV]))
  end
  local events = redis.call('HGET', KEYS[1], 'webhook_events')
  if id and events and string.find(events, '"job.' .. status .. '"', 1, true) then
    redis.call('HSET', KEYS[1], 'webhook_event', 'job.' .. status, 'webhook_state', 'pending', 'webhook_attempt', 0)
    redis.call('ZADD', KEYS[6], redis.call('TIME')[1], id)
    redis.call('SADD', KEYS[12], redis.call('HGET', KEYS[1], 'tenant') or 'default')
  end
  redis.call('DEL', KEYS[9])
  if redis.call('HGET', KEYS[1], 'keep_input') ~= '1' then redis.call('DEL', KEYS[8]) end
  if id then
    redis.call('ZREM', KEYS[13], id)
    for i = 0, tonumber(redis.call('HGET', KEYS[1], 'chunks_total') or '0') - 1 do
      redis.call('ZREM', KEYS[10], id .. ':' .. i)
    end
  end
end
"""
)

# ARGV: chunk index, result JSON, pairs in the chunk, worker, now, ttl seconds, tokens, tokenization ms, inference ms,
# done-list ttl. A job that failed (expired among them) or was cancelled records nothing more: what it scored stays
# what it had when it ended. HSETNX makes a chunk count once however often it is delivered (first write wins); a
# recorded chunk leaves the open set; the job keeps the slowest chunk's timings; the last chunk finishes the job.
# Returns {'finished', the job's hash}, {'recorded'}, {'duplicate'} (already counted), {'failed'} or {'cancelled'}
# (the job ended), or {'missing'} (the job expired).
RECORD_CHUNK = (
    _FINALIZE
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing'} end
if status == 'failed' or status == 'cancelled' then return {status} end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return {'duplicate'} end
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
  return {'finished', redis.call('HGETALL', KEYS[1])}
end
return {'recorded'}
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

# Taken by a full Redis. Moves that end a job or record its webhook must go through when Redis is at its maxmemory
# (`noeviction`), or a job answered 202 could never end. Redis checks memory at a script's writes only until the
# script's first write (seen on redis-server 6.2 and 7.0: a script whose first write is a delete writes on past
# maxmemory; `shared/REFERENCE.md`), so such a move's first write is a delete, which Redis always takes and which
# frees memory. Their other writes are small. Every other move is refused by a full Redis before it writes anything.

# ARGV: final status ('failed' or 'cancelled'), error code, error message, now, done-list ttl. Only a job that is
# not final yet moves; returns {1 when it moved, view()}, or false for an unknown job. Taken by a full Redis: its
# first write deletes the chunks' ledger (as `finalize` does anyway).
FINISH = (
    _FINALIZE
    + _VIEW
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == 'queued' or status == 'running' then
  redis.call('DEL', KEYS[9])
  redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished_at', ARGV[4])
  if ARGV[2] ~= '' then
    redis.call('HSET', KEYS[1], 'error_code', ARGV[2], 'error_message', ARGV[3])
  end
  finalize(ARGV[1])
  return {1, view()}
end
return {0, view()}
"""
)

# ARGV: now (unix). The job's last webhook event due again, attempts counted from 0 (same event, same webhook-id).
# Returns view(), or false for an unknown job or one without an event to send.
REDELIVER = (
    _VIEW
    + """
local id = redis.call('HGET', KEYS[1], 'id')
if not id or not redis.call('HGET', KEYS[1], 'webhook_url') or not redis.call('HGET', KEYS[1], 'webhook_event') then
  return false
end
redis.call('HSET', KEYS[1], 'webhook_state', 'pending', 'webhook_attempt', 0)
redis.call('ZADD', KEYS[6], ARGV[1], id)
redis.call('SADD', KEYS[12], redis.call('HGET', KEYS[1], 'tenant') or 'default')
return view()
"""
)

# One delivery attempt. KEYS: job, attempts, the tenant's webhooks due set. ARGV: job id, attempt entry (JSON), state
# after it, attempt number, when the next attempt is due (unix; '' for none), attempts kept (2 or more), ttl seconds.
# Taken by a full Redis: its first write trims the attempts kept (a delete).
WEBHOOK_ATTEMPT = """
redis.call('LTRIM', KEYS[2], 1 - tonumber(ARGV[6]), -1)
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[7])
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'webhook_state', ARGV[3], 'webhook_attempt', ARGV[4])
end
if ARGV[5] == '' then redis.call('ZREM', KEYS[3], ARGV[1]) else redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1]) end
"""

# The job as the API shows it: view(), or false for an unknown job.
READ = (
    _VIEW
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return view()
"""
)

STATUS = "return redis.call('HGET', KEYS[1], 'status')"

# A finished job deleted with everything it holds (its caller has downloaded its results). KEYS: script_keys, then
# the tenant's recent-jobs index. Returns 'deleted', the status of a job not final yet (nothing deleted), or false
# for an unknown job. Taken by a full Redis (deletes only).
DELETE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == 'queued' or status == 'running' then return status end
local id = redis.call('HGET', KEYS[1], 'id')
for _, i in ipairs({1, 2, 3, 4, 5, 8, 9, 11}) do redis.call('DEL', KEYS[i]) end
if id then
  redis.call('ZREM', KEYS[6], id)
  redis.call('ZREM', KEYS[13], id)
  redis.call('ZREM', KEYS[14], id)
end
return 'deleted'
"""


class Taken(NamedTuple):
    """A chunk message taken: outcome 'taken' with the chunk's input (and whether the job started now), else the
    job's final status, 'gone' (expired) or 'duplicate' (recorded already)."""

    outcome: str
    chunk: Chunk | None = None
    started: bool = False


class Recorded(NamedTuple):
    """A chunk's scores recorded: 'finished' (the job succeeded now; its record), 'recorded', 'duplicate' or
    'missing'."""

    outcome: str
    record: JobRecord | None = None


class Finished(NamedTuple):
    """A fail or cancel: whether the job moved now, and the job after it (None: unknown job)."""

    moved: bool
    job: JobView | None


@dataclass
class NewJob:
    """A job about to be created: its record, and its input summary and chunks' inputs as the JSON it stores
    (serialized once: their size is what the job will hold in Redis, `store.redis_memory.job_bytes`)."""

    record: JobRecord
    input_json: str
    chunk_inputs: dict[int, str]

    @classmethod
    def of(cls, record: JobRecord, job_input: JobInput, chunks: Sequence[Chunk]) -> NewJob:
        return cls(record, job_input.model_dump_json(), {c.index: c.model_dump_json() for c in chunks})

    @property
    def input_bytes(self) -> int:
        return len(self.input_json) + sum(len(text) for text in self.chunk_inputs.values())


def create(pipe: Any, job: NewJob, ttl_s: int) -> None:
    """Queue on `pipe` (the creating transaction, sync or asyncio) a new job's writes: its record, its input
    summary, each chunk's input, and its place in its tenant's in-flight set. `store.chunk_ledger.Ledger.open_chunks`
    adds the chunks' first sends to the same transaction."""
    record = job.record
    pipe.hset(keys.job_key(record.id), mapping=record.to_hash())
    pipe.expire(keys.job_key(record.id), ttl_s)
    pipe.set(keys.job_input_key(record.id), job.input_json, ex=ttl_s)
    if job.chunk_inputs:
        pipe.hset(keys.job_chunks_key(record.id), mapping=job.chunk_inputs)
        pipe.expire(keys.job_chunks_key(record.id), ttl_s)
    pipe.sadd(keys.tenant_inflight_key(record.tenant), record.id)
    if record.deadline_at:
        pipe.zadd(keys.JOB_DEADLINES, {record.id: datetime.fromisoformat(record.deadline_at).timestamp()})


def _taken(reply: Sequence[Any]) -> Taken:
    outcome = as_str(reply[0])
    if outcome != "taken":
        return Taken(outcome)
    return Taken(outcome, Chunk.model_validate_json(reply[1]), bool(int(reply[2])))


def _recorded(reply: Sequence[Any]) -> Recorded:
    outcome = as_str(reply[0])
    return Recorded(outcome, JobRecord.from_hash(_fields(reply[1])) if outcome == "finished" else None)


def _finished(reply: Sequence[Any] | None) -> Finished:
    if reply is None:
        return Finished(False, None)
    return Finished(bool(int(reply[0])), JobView.from_reply(reply[1]))


def _view(reply: Sequence[Any] | None) -> JobView | None:
    return None if reply is None else JobView.from_reply(reply)


EXPIRED = "expired"  # the error code of a job whose deadline passed


@dataclass(frozen=True)
class JobHandle:
    """The one handle on a job, every side's (arq's `Job`): its moves, bound to it. A runner runs them, sync
    (`moves.Runner`: workers, recovery, dispatcher) or asyncio (`moves.AsyncRunner`: API, webhook worker):

        run(JobHandle(job_id, tenant).fail("engine_error", "...")) -> Finished

    Each change of state is counted in the metrics and logged once, by the move that made it (its `then`), whichever
    side ran it: a start (`take`), an end (`record_chunk`'s last chunk, `fail`, `cancel`, `expire`). The tenant names
    the job's in-flight set and webhook schedule; moves that only read (`read`, `status`) need none."""

    id: str
    tenant: str = "default"

    def _keys(self) -> list[str]:
        return script_keys(self.id, self.tenant)

    def take(self, index: int, worker: str, lane: str, seq: int) -> Move[Taken]:
        """A worker takes chunk `index` (sent to `lane` as its `seq`th message): queued -> running on the first."""
        job_id = self.id
        move_keys = [keys.job_key(job_id), keys.job_scores_key(job_id), keys.job_ledger_key(job_id), keys.CHUNKS_OPEN]
        move_keys += [keys.job_chunks_key(job_id), keys.lane_key(lane)]
        return Move(TAKE, move_keys, [index, worker, now_iso(), time.time(), seq], _taken, self._started)

    def record_chunk(self, index: int, result_json: str, pairs: int, worker: str, tokens: int, ttl_s: int,
                     tokenize_ms: int = 0, inference_ms: int = 0) -> Move[Recorded]:  # fmt: skip
        """A chunk's scores, counted once; the last one: -> succeeded. Results live `ttl_s` from then."""
        args: list[str | int] = [index, result_json, pairs, worker, now_iso(), ttl_s, tokens, tokenize_ms]
        args += [inference_ms, keys.DONE_TTL_S]
        return Move(RECORD_CHUNK, self._keys(), args, _recorded, _succeeded)

    def fail(self, code: str, message: str) -> Move[Finished]:
        """-> failed with its cause (`code`) and reason; a no-op for a job that has ended (it keeps its first end)."""
        return self._finish(JobStatus.failed, code, message)

    def cancel(self, code: str = "", message: str = "") -> Move[Finished]:
        """A cancel by its owner (no reason), or by the farm with one (an interactive call nobody waits for)."""
        return self._finish(JobStatus.cancelled, code, message)

    def expire(self) -> Move[Finished]:
        """A job past its deadline ends `failed` with code `expired` (a no-op for one that has ended): its chunks still
        waiting or in flight are dropped as a cancel drops them; its progress says what was scored."""
        return self.fail(EXPIRED, "its deadline passed before it finished")

    def _finish(self, status: JobStatus, code: str, message: str) -> Move[Finished]:
        args: list[str | int] = [status.value, code, message[:2000], now_iso(), keys.DONE_TTL_S]
        return Move(FINISH, self._keys(), args, _finished, _ended_by)

    def redeliver(self) -> Move[JobView | None]:
        """The job's last webhook event scheduled again."""
        return Move(REDELIVER, self._keys(), [time.time()], _view)

    def webhook_attempt(self, entry: WebhookAttempt, state: WebhookState, due: float | None, kept: int,
                        ttl_s: int) -> Move[None]:  # fmt: skip
        """One delivery attempt of the job's event recorded (the last `kept`), and its next due time, if any."""
        job_id = self.id
        move_keys = [keys.job_key(job_id), keys.job_webhook_attempts_key(job_id), keys.webhooks_due_key(self.tenant)]
        args = [job_id, entry.model_dump_json(), state.value, entry.attempt, "" if due is None else due, kept, ttl_s]
        return Move(WEBHOOK_ATTEMPT, move_keys, args, lambda _: None)

    def read(self) -> Move[JobView | None]:
        """The job as the API shows it (callers check the record's own tenant)."""
        return Move(READ, self._keys(), [], _view)

    def status(self) -> Move[JobStatus | None]:
        return Move(STATUS, [keys.job_key(self.id)], [], _status)

    def delete(self) -> Move[str | None]:
        """Delete a finished job: 'deleted', else the status of a job not final yet, or None for an unknown job."""
        move_keys = [*self._keys(), keys.recent_jobs_key(self.tenant)]
        return Move(DELETE, move_keys, [], lambda reply: None if reply is None else as_str(reply))

    def _started(self, taken: Taken) -> None:
        if taken.started:
            logger.info("job %s running", self.id)


def _status(reply: Any) -> JobStatus | None:
    return None if reply is None else JobStatus(as_str(reply))


# KEYS: the deadlines set. ARGV: now, most, job key prefix. {id, tenant} of each job whose deadline has passed; the
# entries of jobs gone from Redis leave.
OVERDUE = """
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))) do
  local found = redis.call('HMGET', ARGV[3] .. id, 'id', 'tenant')
  if found[1] then table.insert(out, {id, found[2] or 'default'}) else redis.call('ZREM', KEYS[1], id) end
end
return out
"""


def overdue(now: float | None = None, most: int = 100) -> Move[list[JobHandle]]:
    """Up to `most` jobs whose deadline has passed and that have not ended."""
    args: list[str | int | float] = [time.time() if now is None else now, most, keys.job_key("")]
    return Move(OVERDUE, [keys.JOB_DEADLINES], args, lambda reply: [JobHandle(as_str(j), as_str(t)) for j, t in reply])


def past_deadline(record: JobRecord, now: float | None = None) -> bool:
    return (
        bool(record.deadline_at)
        and not record.final
        and datetime.fromisoformat(record.deadline_at).timestamp() <= (time.time() if now is None else now)
    )


def _succeeded(recorded: Recorded) -> None:
    if recorded.record is not None:
        _ended(recorded.record)


def _ended_by(finished: Finished) -> None:
    if finished.moved and finished.job is not None:
        _ended(finished.job.record)


def _ended(record: JobRecord) -> None:
    """A job a move has just ended (the move said it moved, so once per job, whoever moved it): counted in
    `rerank_jobs_finished_total`, a failure's cause in `rerank_jobs_failed_total`, a success's latency observed,
    and logged."""
    metrics.JOBS_FINISHED.labels(record.status, record.model).inc()
    if record.status == JobStatus.succeeded:
        metrics.JOB_LATENCY.labels(record.kind, record.model).observe(record.duration_s or 0.0)
    elif record.status == JobStatus.failed:
        metrics.JOBS_FAILED.labels(record.error_code).inc()
    reason = f" ({record.error_code}: {record.error_message})" if record.error_code else ""
    logger.info("job %s %s%s", record.id, record.status, reason)
