"""The backlog: bulk chunks that wait in Redis, per model, until the feed sends them to a worker's lane, and the
fair order in which it sends them (`store.dispatch` runs the feed and publishes what it sent).

A bulk job does not go to the broker when it is accepted. Its chunks wait in its model's backlog (`Backlog.enqueue`,
in the job's creating transaction), and the model's broker lanes are kept short (RERANK_LANE_DEPTH chunks waiting
in its bulk lists) and fed from the backlog in fair order (`feed`):

- strict between priorities: a priority-9 job's chunks go before any priority-5 chunk, whoever sent it;
- at one priority, tenants share the workers in proportion to their weights (`rerankfarm keys weight`, default 1),
  counted in pairs: start-time fair queuing, where each tenant has a virtual time that grows by pairs / weight with
  each chunk sent, and the tenant with the smallest goes next. A tenant that comes back starts at the clock (the
  virtual time of the last tenant served), so time away earns it no credit and costs it none;
- within a tenant, its jobs share the tenant's part the same way, so its small job does not wait for its big one.

The feed is one Lua move: it counts the chunks waiting in the model's bulk lists, sends as many as the depth allows,
writes each one's first send into the chunk ledger (`store.chunk_ledger`: from then on the ledger covers it as it
covers every sent chunk) and returns their messages, for its caller to publish. Anyone runs it, at any time, with no
lock: the API after accepting a job, a worker as it takes a bulk chunk, every worker's recovery each
look (`workers.recovery`). A feeder that dies between the move and the publish leaves chunks that the ledger finds lost
(sent, never seen in their lane), and recovery sends them again. Chunks in the backlog are held by Redis alone,
like the job itself: no worker's death touches them. A job that ends leaves the backlog in the same script
(`store.job_state`'s finalize runs `backlog_drop`); the feed drops one gone from Redis, and never feeds one past its
deadline.

Interactive calls do not wait in the backlog: their chunks go to their own queue as they are accepted (fair between
tenants by their steps there, `store.queueing.interactive_steps`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from schemas import keys
from schemas.chunks import ChunkRef, chunk_priority
from schemas.jobs import JobKind
from store.codec import decode_hash
from store.moves import Move
from store.queueing import bulk_queue_keys

# Lua functions of the backlog, shared by its moves here and by `store.job_state`'s finalize (a job that ends leaves
# the backlog in the same script). P: a model's backlog prefix; p: a job priority.
# count(P, p, tenant, id, chunks, pairs): that many fewer wait (sent, or gone with their job); a tenant's and a
# priority's counts go once nothing of theirs waits.
# leave(P, p, tenant, id): the job leaves its tenant's jobs, and a tenant with no job left leaves its priority.
# drop(P, p, tenant, id): a job that ended leaves the backlog with what it had not sent; nothing for one not there.
BACKLOG = """
local function backlog_count(P, p, tenant, id, chunks, pairs)
  local waiting = P .. ':waiting'
  for _, f in ipairs({'', tenant .. ':', '#' .. p .. ':'}) do
    if redis.call('HINCRBY', waiting, f .. 'chunks', -chunks) <= 0 and f ~= '' then
      redis.call('HDEL', waiting, f .. 'chunks', f .. 'pairs')
    else
      redis.call('HINCRBY', waiting, f .. 'pairs', -pairs)
    end
  end
  redis.call('HINCRBY', P .. ':left', id, -chunks)
  redis.call('HINCRBY', P .. ':left', id .. ':pairs', -pairs)
end
local function backlog_leave(P, p, tenant, id)
  local level = P .. ':' .. p
  local jobs = level .. ':jobs:' .. tenant
  redis.call('ZREM', jobs, id)
  redis.call('HDEL', P .. ':left', id, id .. ':pairs')
  if redis.call('ZCARD', jobs) == 0 then
    redis.call('ZREM', level .. ':tenants', tenant)
    redis.call('HDEL', level .. ':clock', tenant)
  end
end
local function backlog_drop(P, p, tenant, id)
  local left = redis.call('HMGET', P .. ':left', id, id .. ':pairs')
  if not left[1] then return end
  backlog_count(P, p, tenant, id, tonumber(left[1]), tonumber(left[2] or '0'))
  backlog_leave(P, p, tenant, id)
end
"""

# ARGV: backlog prefix, job id, tenant, job priority, chunks, pairs. The job joins its tenant's jobs at its priority
# at the tenant's jobs' clock, and the tenant joins the priority's tenants at the clock unless it is there already.
ENQUEUE = """
local P, id, tenant, p = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local level = P .. ':' .. p
local clock = redis.call('HMGET', level .. ':clock', '_', tenant)
redis.call('ZADD', level .. ':tenants', 'NX', clock[1] or 0, tenant)
redis.call('ZADD', level .. ':jobs:' .. tenant, clock[2] or 0, id)
redis.call('HSET', P .. ':left', id, ARGV[5], id .. ':pairs', ARGV[6])
for _, f in ipairs({'', tenant .. ':', '#' .. p .. ':'}) do
  redis.call('HINCRBY', P .. ':waiting', f .. 'chunks', ARGV[5])
  redis.call('HINCRBY', P .. ':waiting', f .. 'pairs', ARGV[6])
end
return 1
"""

# KEYS: open chunks, tenant weights, job deadlines. ARGV: backlog prefix, now (unix), ledger ttl, lane depth, job key
# prefix, ledger key suffix, lane key prefix, then the model's bulk lists, step 0 first. Sends up to depth - (chunks
# waiting in those lists) chunks, the highest priority first, the tenant and then the job with the smallest virtual
# time first; drops from the backlog the jobs that ended, expired from Redis or passed their deadline. Returns {job
# id, chunk index, tenant, job priority, step, sequence number in the step's list} per chunk sent, in send order.
FEED = (
    BACKLOG
    + """
local P, now, ttl, depth = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local lists = {}
local queued = 0
for i = 8, #ARGV do
  lists[#lists + 1] = ARGV[i]
  queued = queued + redis.call('LLEN', ARGV[i])
end
local out = {}
local room = depth - queued
local p = #lists - 1
local looks = 0
while room > 0 and p >= 0 and looks < 10000 do
  looks = looks + 1
  local level = P .. ':' .. p
  local top = redis.call('ZRANGE', level .. ':tenants', 0, 0, 'WITHSCORES')
  if #top == 0 then
    p = p - 1
  else
    local tenant, tvt = top[1], tonumber(top[2])
    local first = redis.call('ZRANGE', level .. ':jobs:' .. tenant, 0, 0, 'WITHSCORES')
    if #first == 0 then
      redis.call('ZREM', level .. ':tenants', tenant)
    else
      local id, jvt = first[1], tonumber(first[2])
      local job = ARGV[5] .. id
      local f = redis.call('HMGET', job, 'status', 'fed', 'total', 'chunk_size')
      local chunks_left = tonumber(redis.call('HGET', P .. ':left', id) or '0')
      local deadline = redis.call('ZSCORE', KEYS[3], id)
      if (f[1] ~= 'queued' and f[1] ~= 'running') or chunks_left <= 0 or not f[4]
          or (deadline and tonumber(deadline) <= tonumber(now)) then
        backlog_drop(P, p, tenant, id)
        backlog_leave(P, p, tenant, id)
      else
        local index, size = tonumber(f[2] or '0'), tonumber(f[4])
        local pairs = math.min(size, tonumber(f[3]) - index * size)
        local step = #lists - 1 - p
        local seq = redis.call('HINCRBY', ARGV[7] .. lists[step + 1], 'sent', 1)
        local ledger = job .. ARGV[6]
        redis.call('HSET', job, 'fed', index + 1)
        redis.call('HSET', ledger, index .. ':sends', 1, index .. ':seq', seq)
        redis.call('EXPIRE', ledger, ttl)
        redis.call('ZADD', KEYS[1], now, id .. ':' .. index)
        backlog_count(P, p, tenant, id, 1, pairs)
        redis.call('HSET', level .. ':clock', '_', tvt, tenant, jvt)
        if chunks_left <= 1 then
          backlog_leave(P, p, tenant, id)
        else
          redis.call('ZADD', level .. ':jobs:' .. tenant, jvt + pairs, id)
        end
        if redis.call('ZSCORE', level .. ':tenants', tenant) then
          local weight = tonumber(redis.call('HGET', KEYS[2], tenant) or '1')
          redis.call('ZADD', level .. ':tenants', tvt + pairs / weight, tenant)
        end
        out[#out + 1] = {id, index, tenant, p, step, seq}
        room = room - 1
      end
    end
  end
end
return out
"""
)

# KEYS: the backlog's waiting counts, the job's level's tenants, the job's tenant's jobs there, left. ARGV: job id,
# its priority. Returns {pairs of the job not yet sent, pairs waiting at higher priorities, tenants with a backlog at
# its priority, jobs of its tenant with a backlog there}.
POSITION = """
local pairs = tonumber(redis.call('HGET', KEYS[4], ARGV[1] .. ':pairs') or '0')
local ahead = 0
for p = tonumber(ARGV[2]) + 1, 9 do
  ahead = ahead + tonumber(redis.call('HGET', KEYS[1], '#' .. p .. ':pairs') or '0')
end
return {pairs, ahead, redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[3])}
"""

WAITING = "return redis.call('HGETALL', KEYS[1])"


class Backlog:
    """The backlog's write in a job's creating transaction, on one client (sync, or asyncio: await the reply)."""

    def __init__(self, client: Any) -> None:
        self._enqueue = client.register_script(ENQUEUE)

    def enqueue(self, pipe: Any, model: str, job_id: str, tenant: str, priority: int, chunks: int, pairs: int) -> Any:
        """Queue on `pipe` the job's place in its model's backlog (the feed reads `chunk_size` from its record)."""
        args = [keys.backlog_prefix(model), job_id, tenant, priority, chunks, pairs]
        return self._enqueue(keys=[], args=args, client=pipe)


def _fed(model: str, reply: Sequence[Any]) -> list[ChunkRef]:
    lists = bulk_queue_keys(model)
    refs = []
    for raw_id, index, tenant, priority, step, seq in reply:
        refs.append(
            ChunkRef(
                job_id=raw_id.decode() if isinstance(raw_id, bytes) else raw_id,
                index=int(index),
                tenant=tenant.decode() if isinstance(tenant, bytes) else tenant,
                priority=chunk_priority(JobKind.bulk, int(priority)),
                lane=lists[int(step)],
                seq=int(seq),
            )
        )
    return refs


def feed(model: str, depth: int, ttl_s: int, now: float | None = None) -> Move[list[ChunkRef]]:
    """Send the next chunks of the model's backlog, in fair order, until `depth` chunks wait in its bulk lists; the
    chunks' messages, for the caller to publish (`store.queueing.publish`)."""
    job_prefix = keys.job_key("")
    args: list[str | int | float] = [keys.backlog_prefix(model), time.time() if now is None else now, ttl_s, depth]
    args += [job_prefix, keys.job_ledger_key("")[len(job_prefix) :], keys.lane_key(""), *bulk_queue_keys(model)]
    move_keys = [keys.CHUNKS_OPEN, keys.TENANT_WEIGHTS, keys.JOB_DEADLINES]
    return Move(FEED, move_keys, args, lambda reply: _fed(model, reply))


@dataclass(frozen=True)
class Waiting:
    """What waits in a model's backlog: in all, per tenant and per job priority."""

    chunks: int = 0
    pairs: int = 0
    tenants: dict[str, tuple[int, int]] = field(default_factory=dict)  # tenant -> (chunks, pairs)


def _waiting(reply: Any) -> Waiting:
    fields = decode_hash(dict(zip(reply[::2], reply[1::2], strict=True)))
    tenants: dict[str, list[int]] = {}
    for name, value in fields.items():
        owner, _, what = name.rpartition(":")
        if owner and not owner.startswith("#"):
            tenants.setdefault(owner, [0, 0])[what == "pairs"] = int(value)
    return Waiting(
        int(fields.get("chunks", 0)), int(fields.get("pairs", 0)), {t: (c, p) for t, (c, p) in tenants.items()}
    )


def waiting(model: str) -> Move[Waiting]:
    return Move(WAITING, [f"{keys.backlog_prefix(model)}:waiting"], [], _waiting)


@dataclass(frozen=True)
class Position:
    """Where a queued bulk job stands in its model's backlog."""

    pairs_waiting: int  # its own pairs not yet sent to a worker
    pairs_ahead: int  # pairs waiting at higher priorities (all tenants): served first
    tenants_sharing: int  # tenants with pairs waiting at its priority: the workers are shared between them ...
    jobs_sharing: int  # ... and its tenant's part between its jobs with pairs waiting there


def position(model: str, job_id: str, tenant: str, priority: int) -> Move[Position]:
    prefix = keys.backlog_prefix(model)
    level = f"{prefix}:{priority}"
    move_keys = [f"{prefix}:waiting", f"{level}:tenants", f"{level}:jobs:{tenant}", f"{prefix}:left"]
    return Move(POSITION, move_keys, [job_id, priority], lambda reply: Position(*(int(v) for v in reply)))


def set_weight(client: Any, tenant: str, weight: float) -> None:
    """A tenant's weight in the fair shares (sync client): with weights 3 and 1, two tenants with work waiting at the
    same priority are served 3 pairs to 1."""
    client.hset(keys.TENANT_WEIGHTS, tenant, check_weight(weight))


def check_weight(weight: float) -> float:
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"a tenant's weight is a finite number above 0, not {weight}")
    return weight


def weights(client: Any) -> dict[str, float]:
    """Every tenant's weight that was set (the others have 1)."""
    return {k.decode() if isinstance(k, bytes) else k: float(v) for k, v in client.hgetall(keys.TENANT_WEIGHTS).items()}
