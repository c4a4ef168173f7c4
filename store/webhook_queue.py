"""The webhook delivery schedule: which due delivery goes next, how many are in flight where, and which destinations
are paused. The one place where webhook fairness lives.

Redis:
- `rerank:webhooks:due:{tenant}` (sorted set, job id -> unix time due), one per tenant, and `rerank:webhooks:tenants`
  (the tenants that may have some): written by `store.job_state` (a job's end, a redelivery, each attempt);
- `rerank:webhooks:inflight` (sorted set, `{job}\\t{tenant}\\t{destination}` -> lease end): deliveries being made;
  an entry whose webhook worker died leaves at its lease's end;
- `rerank:webhooks:breaker` (hash, `{tenant}\\t{destination}` -> `{failures} {paused until} {last failure}`): the
  circuit breaker of each tenant's destination.

`claim` (run by every webhook worker's dispatcher, for as many deliveries as it has free slots) takes due deliveries
round robin between tenants, the tenants with the fewest deliveries in flight first, and skips (for
RERANK_WEBHOOK_DISPATCH_INTERVAL_S) any whose tenant or destination is at its in-flight cap. A claimed delivery's due
time moves to its lease's end, so a worker that dies mid-delivery only delays it. A destination that failed
RERANK_WEBHOOK_BREAKER_FAILURES times in a row (for one tenant: another tenant's broken URL on the same host pauses
nothing of yours) is paused for RERANK_WEBHOOK_BREAKER_PAUSE_S, doubled by each failed probe up to
RERANK_WEBHOOK_BREAKER_MAX_PAUSE_S: its due deliveries are claimed only to be recorded as not sent (an attempt of
their schedule, no request, so their schedule still ends), and once the pause is over, one probe goes at a time
until one succeeds. `release` (after each attempt) frees the slot and keeps the breaker.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from schemas import keys
from schemas.settings import Settings
from store.codec import as_str
from store.moves import Move

LEGACY_DUE = f"{keys.NAMESPACE}:webhooks:due"  # the one due set of farms before per-tenant ones (`migrate`)

# KEYS: tenants set, in-flight set, breaker hash. ARGV: now, lease end, slots, per-tenant cap, per-destination cap,
# due deliveries looked at per tenant, due-set key prefix, job key prefix, seconds a capped delivery waits, breaker
# failures. Returns {job id, tenant, destination, paused until ('' when not paused)} per claimed delivery.
_CLAIM = """
local now, lease, slots = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tcap, dcap, scan = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local due_prefix, job_prefix, wait, threshold = ARGV[7], ARGV[8], tonumber(ARGV[9]), tonumber(ARGV[10])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. now)
local by_tenant, by_dest, by_pair = {}, {}, {}
local function add(t, k) t[k] = (t[k] or 0) + 1 end
for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local _, _, t, d = string.find(m, '^[^\\t]*\\t([^\\t]*)\\t(.*)$')
  if t then add(by_tenant, t); add(by_dest, d); add(by_pair, t .. '\\t' .. d) end
end
local tenants = redis.call('SMEMBERS', KEYS[1])
table.sort(tenants)
local turn = {}
local offset = math.floor(now * 10) % math.max(#tenants, 1)
for i, t in ipairs(tenants) do turn[t] = (i - 1 - offset) % #tenants end
table.sort(tenants, function(a, b)
  local x, y = by_tenant[a] or 0, by_tenant[b] or 0
  if x ~= y then return x < y end
  return turn[a] < turn[b]
end)
local order, due, pos = {}, {}, {}
for _, t in ipairs(tenants) do
  local c = redis.call('ZRANGEBYSCORE', due_prefix .. t, '-inf', now, 'LIMIT', 0, scan)
  if #c > 0 then
    due[t], pos[t] = c, 1
    table.insert(order, t)
  elseif redis.call('ZCARD', due_prefix .. t) == 0 then
    redis.call('SREM', KEYS[1], t)
  end
end
local out = {}
local moved = true
while slots > 0 and moved do
  moved = false
  for _, t in ipairs(order) do
    if slots > 0 and (by_tenant[t] or 0) < tcap then
      local c = due[t]
      while pos[t] <= #c do
        local id = c[pos[t]]
        pos[t] = pos[t] + 1
        local f = redis.call('HMGET', job_prefix .. id, 'webhook_dest', 'webhook_url')
        local d = f[1] or f[2] or ''
        local pair = t .. '\\t' .. d
        local fails, paused = 0, 0
        local b = redis.call('HGET', KEYS[3], pair)
        if b then
          local _, _, x, y = string.find(b, '^(%S+) (%S+)')
          fails, paused = tonumber(x), tonumber(y)
        end
        if paused > now then
          redis.call('ZADD', due_prefix .. t, lease, id)
          table.insert(out, {id, t, d, tostring(paused)})
          slots, moved = slots - 1, true
          break
        elseif (by_dest[d] or 0) >= dcap or (fails >= threshold and (by_pair[pair] or 0) > 0) then
          redis.call('ZADD', due_prefix .. t, now + wait, id)
        else
          redis.call('ZADD', due_prefix .. t, lease, id)
          redis.call('ZADD', KEYS[2], lease, id .. '\\t' .. t .. '\\t' .. d)
          add(by_tenant, t); add(by_dest, d); add(by_pair, pair)
          table.insert(out, {id, t, d, ''})
          slots, moved = slots - 1, true
          break
        end
      end
    end
  end
end
return out
"""

# KEYS: in-flight set, breaker hash. ARGV: in-flight member, breaker field, outcome, now, breaker failures, first
# pause, longest pause. Returns {failures in a row, paused until} (0 0 after a success; -1 0 when not counted).
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
if ARGV[3] == 'ok' then
  redis.call('HDEL', KEYS[2], ARGV[2])
  return {0, '0'}
end
if ARGV[3] ~= 'failed' then return {-1, '0'} end
local fails = 0
local b = redis.call('HGET', KEYS[2], ARGV[2])
if b then fails = tonumber(string.match(b, '^(%S+)')) end
fails = fails + 1
local now, threshold = tonumber(ARGV[4]), tonumber(ARGV[5])
local paused = 0
if fails >= threshold then
  paused = now + math.min(tonumber(ARGV[7]), tonumber(ARGV[6]) * 2 ^ (fails - threshold))
end
redis.call('HSET', KEYS[2], ARGV[2], string.format('%d %.3f %.3f', fails, paused, now))
return {fails, string.format('%.3f', paused)}
"""

# KEYS: the legacy due set, tenants set. ARGV: due-set key prefix, job key prefix. Moves each entry to its tenant's
# due set (a farm upgraded with deliveries pending).
_MIGRATE = """
local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #entries, 2 do
  local t = redis.call('HGET', ARGV[2] .. entries[i], 'tenant') or 'default'
  redis.call('ZADD', ARGV[1] .. t, entries[i + 1], entries[i])
  redis.call('SADD', KEYS[2], t)
end
redis.call('DEL', KEYS[1])
return #entries / 2
"""


class Outcome(StrEnum):
    """What an attempt says of its destination's health."""

    ok = "ok"  # it answered (2xx, or 410 Gone)
    failed = "failed"  # another status, a timeout, a connection error: counted by the breaker
    none = "none"  # not sent (paused, refused by policy, the job gone): says nothing of the destination


@dataclass(frozen=True)
class Claimed:
    job_id: str
    tenant: str
    destination: str
    paused_until: float | None  # set: the destination is paused, the attempt is recorded as not sent

    @property
    def member(self) -> str:
        return f"{self.job_id}\t{self.tenant}\t{self.destination}"

    @property
    def pair(self) -> str:
        return f"{self.tenant}\t{self.destination}"


def _claimed(reply: Sequence[Any]) -> list[Claimed]:
    return [
        Claimed(as_str(job), as_str(tenant), as_str(dest), float(as_str(paused)) if as_str(paused) else None)
        for job, tenant, dest, paused in reply
    ]


def claim(settings: Settings, slots: int, now: float | None = None) -> Move[list[Claimed]]:
    """Up to `slots` due deliveries, in fair order, each leased for RERANK_WEBHOOK_LEASE_S."""
    now = time.time() if now is None else now
    args: list[str | int | float] = [
        now,
        now + settings.webhook_lease_s,
        slots,
        settings.webhook_max_in_flight_per_tenant,
        settings.webhook_max_in_flight_per_destination,
        max(32, 4 * settings.webhook_max_in_flight_per_tenant),
        keys.WEBHOOKS_DUE_PREFIX,
        keys.job_key(""),
        settings.webhook_dispatch_interval_s,
        settings.webhook_breaker_failures,
    ]
    return Move(_CLAIM, [keys.WEBHOOK_TENANTS, keys.WEBHOOKS_IN_FLIGHT, keys.WEBHOOK_BREAKER], args, _claimed)


def release(
    claimed: Claimed, outcome: Outcome, settings: Settings, now: float | None = None
) -> Move[tuple[int, float]]:
    """The delivery's slot freed, and its destination's breaker told the outcome: (failures in a row, paused
    until, 0 when not paused)."""
    args: list[str | int | float] = [
        claimed.member,
        claimed.pair,
        outcome.value,
        time.time() if now is None else now,
        settings.webhook_breaker_failures,
        settings.webhook_breaker_pause_s,
        settings.webhook_breaker_max_pause_s,
    ]
    return Move(
        _RELEASE,
        [keys.WEBHOOKS_IN_FLIGHT, keys.WEBHOOK_BREAKER],
        args,
        lambda reply: (int(reply[0]), float(as_str(reply[1]))),
    )


# KEYS: the tenant's due set, in-flight set. ARGV: job id, in-flight member.
_DROP = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[2])
"""


def drop(claimed: Claimed) -> Move[None]:
    """A claimed delivery with nothing to send (its job gone, or its webhook no longer pending): out of the
    schedule, its slot freed."""
    move_keys = [keys.webhooks_due_key(claimed.tenant), keys.WEBHOOKS_IN_FLIGHT]
    return Move(_DROP, move_keys, [claimed.job_id, claimed.member], lambda _: None)


def migrate() -> Move[int]:
    """The legacy single due set's entries moved to their tenants' due sets; how many."""
    args = [keys.WEBHOOKS_DUE_PREFIX, keys.job_key("")]
    return Move(_MIGRATE, [LEGACY_DUE, keys.WEBHOOK_TENANTS], args, lambda reply: int(reply))


def breaker_field(tenant: str, destination: str) -> str:
    return f"{tenant}\t{destination}"


def paused_until(raw: str | bytes | None, now: float | None = None) -> float | None:
    """When a destination's pause ends, from its breaker entry; None when it is not paused."""
    if not raw:
        return None
    until = float(as_str(raw).split()[1])
    return until if until > (time.time() if now is None else now) else None


@dataclass
class Snapshot:
    """What the metrics show of the schedule: deliveries in flight per destination and per tenant, and each
    tenant's paused destinations."""

    in_flight_by_destination: Counter[str]
    in_flight_by_tenant: Counter[str]
    paused_by_tenant: Counter[str]
    stale: list[str]  # breaker entries of destinations that last failed long ago and are not paused


def snapshot(in_flight: Sequence[Any], breaker: Mapping[Any, Any], now: float, forget_after_s: float) -> Snapshot:
    """Read from `ZRANGE rerank:webhooks:inflight 0 -1` (live leases only) and `HGETALL rerank:webhooks:breaker`."""
    by_dest: Counter[str] = Counter()
    by_tenant: Counter[str] = Counter()
    for member in in_flight:
        _, tenant, destination = as_str(member).split("\t", 2)
        by_dest[destination] += 1
        by_tenant[tenant] += 1
    paused: Counter[str] = Counter()
    stale = []
    for field, value in breaker.items():
        _, until, last = (float(x) for x in as_str(value).split())
        if until > now:
            paused[as_str(field).split("\t", 1)[0]] += 1
        elif now - last > forget_after_s:
            stale.append(as_str(field))
    return Snapshot(by_dest, by_tenant, paused, stale)
