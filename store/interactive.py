"""Interactive calls in flight, per model and per tenant: a call that would pass a limit is refused at once (429,
Retry-After) rather than queued behind more work than the model's workers can answer within the call's timeout, as
TEI answers 429 when its queue is full and vLLM with `--max-num-queued-reqs`.

Each call holds an entry in the model's sorted set (`schemas.keys.interactive_inflight_key`) while the API waits for
it, scored by when its wait ends; the API removes it when the call is answered, and an entry of an API process that
died leaves once its time has passed. The check and the add are one script, so concurrent calls cannot both pass.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from schemas import keys, metrics
from schemas.errors import Overloaded
from store.codec import as_str

RETRY_AFTER_S = 1

# KEYS: the model's calls in flight. ARGV: now, when this call's wait ends, member, tenant, pairs, tenant limit,
# model limit, key ttl. Returns {'ok', the tenant's pairs in flight before this call}, or {'tenant' | 'model', pairs
# already in flight}. A call alone (nothing of its tenant in flight, for the tenant's limit; nothing at all, for the
# model's) is let in whatever its size.
ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local total, mine = 0, 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local tenant, pairs = string.match(member, '^(.*)|[^|]*|(%d+)$')
  total = total + tonumber(pairs)
  if tenant == ARGV[4] then mine = mine + tonumber(pairs) end
end
local pairs = tonumber(ARGV[5])
if mine > 0 and mine + pairs > tonumber(ARGV[6]) then return {'tenant', mine} end
if total > 0 and total + pairs > tonumber(ARGV[7]) then return {'model', total} end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[8])
return {'ok', mine}
"""


class InteractiveLimits:
    def __init__(self, client: Any, per_tenant: int, per_model: int) -> None:
        self.redis = client
        self.per_tenant = per_tenant
        self.per_model = per_model
        self._admit = client.register_script(ADMIT)

    @asynccontextmanager
    async def slot(self, model: str, tenant: str, pairs: int, wait_s: float) -> AsyncIterator[int]:
        """Hold the call's pairs in flight while the caller waits; Overloaded (429) past a limit. Yields the pairs of
        the tenant's other calls in flight, which place this one's chunks in the queue
        (`store.queueing.interactive_steps`)."""
        key = keys.interactive_inflight_key(model)
        member = f"{tenant}|{uuid.uuid4().hex}|{pairs}"
        now = time.time()
        ttl = int(wait_s) + 60
        args = [now, now + wait_s + 5, member, tenant, pairs, self.per_tenant, self.per_model, ttl]
        reply = await self._admit(keys=[key], args=args)
        outcome = as_str(reply[0])
        if outcome != "ok":
            who, limit = ("this tenant", self.per_tenant) if outcome == "tenant" else (f"model {model}", self.per_model)
            metrics.REQUESTS_REFUSED.labels(f"interactive_{outcome}").inc()
            raise Overloaded(
                f"{who} already has {int(reply[1])} interactive pairs in flight for model {model}; {pairs} more "
                f"would pass its limit of {limit}: retry when some are answered",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        try:
            yield int(reply[1])
        finally:
            await self.redis.zrem(key, member)
