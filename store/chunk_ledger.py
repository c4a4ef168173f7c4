"""The chunk ledger: the farm, not the broker, owns every chunk until its scores are recorded.

Celery on Redis can lose a message (`docs/guarantees.md`): kombu pops it before it records it as
unacked, a late ack of a redelivered message deletes the record another worker depends on, a failover drops what
had not reached the replica. So each chunk's state lives with its job, and recovery reads that, never the broker:

- `rerank:job:{id}:chunks`: each chunk's input (the only copy of the texts; a message carries a `ChunkRef`).
- `rerank:job:{id}:ledger`: per chunk, how often it was sent, its sequence number in its lane (and the lane, once
  sent again: a re-sent bulk chunk goes to the first priority step, `store.queueing.resend_lane`), who took it,
  when.
- `rerank:chunks:open` (sorted set): every chunk sent and not recorded, scored with the last time something vouched
  for it: its send, its take (`store.job_state.TAKE`), its live holder's renewal (every lease / 4, with the lease of
  kombu's message: `workers.lease`), or a check that found it still waiting in its queue.
- `rerank:lane:{list}`: per kombu list (queue and priority step) the sequence numbers given at send (`sent`) and the
  highest one a worker has taken (`taken`). Lists are FIFO: a chunk whose number is above `taken` has not left its
  list yet; at or below, it has.

`find_lost` looks at chunks nobody vouched for in `grace` seconds (two leases): recorded or of a job that ended,
they leave the set; above their lane's high-water mark and with the lane not empty, they are waiting in the queue
(vouched for now); otherwise they were taken and their holder stopped renewing, or their message never reached the
list, and they are sent again (`resend`), at most `RERANK_CHUNK_MAX_RETRIES` + 1 times in all. Recording is first
write wins (`store.job_state.RECORD_CHUNK`), so a chunk that comes back twice counts once.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from schemas import keys
from schemas.chunks import ChunkRef, chunk_priority
from schemas.jobs import JobKind, JobStatus
from store.codec import as_str

# KEYS: ledger, open chunks, then each group's lane. ARGV: job id, now (unix), ttl, the job's own lane (`job_lane`'s),
# then per group its lane's name and chunk count. Chunks 0..n-1 of a new job, sent once each in index order, group
# by group (an interactive call's chunks go to several lanes: `store.queueing.interactive_steps`). A chunk sent into
# a lane other than its job's own has its lane written down. Returns each chunk's sequence number in its lane.
OPEN = """
local seqs = {}
for g = 0, (#ARGV - 4) / 2 - 1 do
  local lane, n = ARGV[5 + 2 * g], tonumber(ARGV[6 + 2 * g])
  local top = redis.call('HINCRBY', KEYS[3 + g], 'sent', n)
  for k = 1, n do
    local i, seq = #seqs, top - n + k
    seqs[i + 1] = seq
    if lane == ARGV[4] then
      redis.call('HSET', KEYS[1], i .. ':sends', 1, i .. ':seq', seq)
    else
      redis.call('HSET', KEYS[1], i .. ':sends', 1, i .. ':seq', seq, i .. ':lane', lane)
    end
    redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1] .. ':' .. i)
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return seqs
"""

# KEYS: job, scores, ledger, open chunks, the lane to send to. ARGV: chunk index, member, now (unix), the send count
# the caller saw, the most sends allowed, that lane's name. Returns {'sent', seq, sends} after counting a new send;
# {'gone'} (job ended or expired) or {'recorded'}, both taking the chunk out of the open set; {'raced'} when someone
# else sent it meanwhile; {'exhausted', sends} when it was sent as often as allowed.
RESEND = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then
  redis.call('ZREM', KEYS[4], ARGV[2])
  return {'gone'}
end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  redis.call('ZREM', KEYS[4], ARGV[2])
  return {'recorded'}
end
local sends = tonumber(redis.call('HGET', KEYS[3], ARGV[1] .. ':sends') or '0')
if sends ~= tonumber(ARGV[4]) then return {'raced'} end
if sends >= tonumber(ARGV[5]) then return {'exhausted', sends} end
local seq = redis.call('HINCRBY', KEYS[5], 'sent', 1)
redis.call('HSET', KEYS[3], ARGV[1] .. ':sends', sends + 1, ARGV[1] .. ':seq', seq, ARGV[1] .. ':lane', ARGV[6])
redis.call('HDEL', KEYS[3], ARGV[1] .. ':holder', ARGV[1] .. ':taken_at')
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[2])
return {'sent', seq, sends + 1}
"""

# KEYS: open chunks. ARGV: now (unix), then per held chunk: member, lane key, sequence number. A live holder vouches
# for its chunks (XX: a chunk recorded meanwhile is not brought back) and raises their lanes' high-water marks.
RENEW = """
for i = 2, #ARGV, 3 do
  redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[i])
  local taken = tonumber(redis.call('HGET', ARGV[i + 1], 'taken') or '0')
  if tonumber(ARGV[i + 2]) > taken then redis.call('HSET', ARGV[i + 1], 'taken', ARGV[i + 2]) end
end
return (#ARGV - 1) / 3
"""


@dataclass
class Lost:
    """A chunk nobody vouched for: taken by a worker that stopped renewing, or never delivered."""

    job_id: str
    index: int
    tenant: str
    kind: JobKind
    priority: int  # the job's 0..9
    sends: int
    seq: int
    lane: str
    holder: str | None

    @property
    def member(self) -> str:
        return f"{self.job_id}:{self.index}"

    @property
    def ref(self) -> ChunkRef:
        """The chunk's message as it was last sent."""
        return ChunkRef(
            job_id=self.job_id,
            index=self.index,
            tenant=self.tenant,
            priority=chunk_priority(self.kind, self.priority),
            lane=self.lane,
            seq=self.seq,
            send=self.sends,
        )


@dataclass
class Findings:
    """What one look at the open set found."""

    lost: list[Lost] = field(default_factory=list)
    waiting: int = 0  # still in their queue: vouched for
    closed: int = 0  # recorded, or their job ended: out of the open set


def split_member(member: str) -> tuple[str, int]:
    job_id, _, index = member.rpartition(":")
    return job_id, int(index)


class Ledger:
    """The ledger's scripts and reads on one Redis client (sync, or asyncio for `open_chunks` in a pipeline)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._open = client.register_script(OPEN)
        self._resend = client.register_script(RESEND)
        self._renew = client.register_script(RENEW)

    def open_chunks(self, pipe: Any, job_id: str, lanes: list[str], own_lane: str, ttl_s: int) -> Any:
        """Queue on `pipe` (in the job's creating transaction) the first send of chunks 0..n-1, chunk k into
        `lanes[k]` (`own_lane`: the lane `job_lane` gives the job); on an asyncio client, await what this returns. The
        reply, at this command's place in the pipeline's results, is each chunk's sequence number in its lane."""
        groups = [(lane, len(list(run))) for lane, run in itertools.groupby(lanes)]
        ledger_keys = [keys.job_ledger_key(job_id), keys.CHUNKS_OPEN, *(keys.lane_key(lane) for lane, _ in groups)]
        args: list[Any] = [job_id, time.time(), ttl_s, own_lane]
        for lane, count in groups:
            args += [lane, count]
        return self._open(keys=ledger_keys, args=args, client=pipe)

    def renew(self, refs: Iterable[ChunkRef], now: float | None = None) -> int:
        """Vouch for chunks this process holds. Returns how many it named."""
        args: list[Any] = [time.time() if now is None else now]
        for ref in refs:
            args += [ref.member, keys.lane_key(ref.lane), ref.seq]
        return int(self._renew(keys=[keys.CHUNKS_OPEN], args=args)) if len(args) > 1 else 0

    def resend(
        self, job_id: str, index: int, lane: str, sends: int, max_sends: int
    ) -> tuple[str, int, int]:  # fmt: skip
        """Count one more send of the chunk, into `lane`, when `sends` is still what the caller saw. Returns (outcome,
        seq, sends): outcome 'sent' (publish it now with that seq and send number), 'exhausted', 'raced', 'recorded' or
        'gone' (then seq and sends are 0, or the sends so far for 'exhausted')."""
        move_keys = [keys.job_key(job_id), keys.job_scores_key(job_id), keys.job_ledger_key(job_id)]
        move_keys += [keys.CHUNKS_OPEN, keys.lane_key(lane)]
        member = f"{job_id}:{index}"
        reply = self._resend(keys=move_keys, args=[index, member, time.time(), sends, max_sends, lane])
        outcome = as_str(reply[0])
        if outcome == "sent":
            return outcome, int(reply[1]), int(reply[2])
        return outcome, 0, int(reply[1]) if outcome == "exhausted" else 0

    def find_lost(
        self, grace_s: float, job_lane: Callable[[JobKind, int, str], str], now: float | None = None, limit: int = 1000
    ) -> Findings:
        """Look at up to `limit` chunks nobody vouched for in `grace_s` seconds; see the module's docstring.
        `job_lane(kind, priority, model)` names the lane a job's chunks are sent to."""
        now = time.time() if now is None else now
        found = Findings()
        members = [as_str(m) for m in self.client.zrangebyscore(keys.CHUNKS_OPEN, "-inf", now - grace_s, 0, limit)]
        if not members:
            return found
        parsed = [split_member(m) for m in members]
        with self.client.pipeline(transaction=False) as pipe:
            for job_id, index in parsed:
                pipe.hmget(keys.job_key(job_id), "status", "kind", "priority", "tenant", "model")
                pipe.hmget(keys.job_ledger_key(job_id), *(f"{index}:{f}" for f in ("sends", "seq", "holder", "lane")))
                pipe.hexists(keys.job_scores_key(job_id), str(index))
            replies = pipe.execute()
        closed: list[str] = []
        suspects: list[Lost] = []
        for n, (job_id, index) in enumerate(parsed):
            (status, kind, priority, tenant, model), (sends, seq, holder, lane), recorded = replies[3 * n : 3 * n + 3]
            if status is None or JobStatus(as_str(status)).final or recorded:
                closed.append(members[n])
                continue
            job_kind = JobKind(as_str(kind or JobKind.bulk))
            job_priority = int(priority or 0)
            suspects.append(
                Lost(
                    job_id,
                    index,
                    as_str(tenant or "default"),
                    job_kind,
                    job_priority,
                    int(sends or 0),
                    int(seq or 0),
                    as_str(lane) if lane is not None else job_lane(job_kind, job_priority, as_str(model or "")),
                    None if holder is None else as_str(holder),
                )
            )
        lanes = sorted({s.lane for s in suspects})
        with self.client.pipeline(transaction=False) as pipe:
            for lane in lanes:
                pipe.hget(keys.lane_key(lane), "taken")
                pipe.llen(lane)
            lane_replies = pipe.execute()
        taken = {lane: int(lane_replies[2 * k] or 0) for k, lane in enumerate(lanes)}
        queued = {lane: int(lane_replies[2 * k + 1]) for k, lane in enumerate(lanes)}
        in_queue = [s.seq > taken[s.lane] and queued[s.lane] > 0 for s in suspects]
        waiting = [s.member for s, queued_now in zip(suspects, in_queue, strict=True) if queued_now]
        found.lost = [s for s, queued_now in zip(suspects, in_queue, strict=True) if not queued_now]
        with self.client.pipeline(transaction=False) as pipe:
            if closed:
                pipe.zrem(keys.CHUNKS_OPEN, *closed)
            if waiting:
                pipe.zadd(keys.CHUNKS_OPEN, dict.fromkeys(waiting, now), xx=True)
            pipe.execute()
        found.closed, found.waiting = len(closed), len(waiting)
        return found
