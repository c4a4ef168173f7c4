"""Idempotent submission (Stripe's semantics): a POST that creates work may carry `Idempotency-Key`.

Per tenant and route, the first request with a key claims it atomically (one Lua script, not check-then-set) with
its body's fingerprint; the key then names what it created (a job, batch or file id) for RERANK_IDEMPOTENCY_TTL_S.
A retry with the same key and the same body gets that resource again (`Idempotent-Replayed: true`), never a second
one; the same key with another body is refused (422 `idempotency_key_reused`); a retry while the first request is
still being handled answers 409 `idempotency_in_progress`. A first request that fails gives its key up, so a retry
runs again. A job's key is written in the same transaction that creates the job (`Claim.record`), so no crash can
leave a job without its key; a claim whose request died unfinished lapses after RERANK_IDEMPOTENCY_LOCK_S.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

import redis.asyncio as aioredis

from schemas import keys
from schemas.errors import IdempotencyInProgress, IdempotencyKeyReused, InvalidRequest
from store.codec import as_str

T = TypeVar("T")

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_CHARS = 255

# KEYS: the key's hash. ARGV: fingerprint, lock seconds. Returns {'claimed'}, {'replay', resource id},
# {'mismatch'} or {'pending'}.
CLAIM = """
local held = redis.call('HMGET', KEYS[1], 'fingerprint', 'resource')
if not held[1] then
  redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return {'claimed'}
end
if held[1] ~= ARGV[1] then return {'mismatch'} end
if held[2] then return {'replay', held[2]} end
return {'pending'}
"""

# KEYS: the key's hash. ARGV: fingerprint, '1' to give it up even when it names a resource. Gives up a claim
# whose request failed.
RELEASE = """
if redis.call('HGET', KEYS[1], 'fingerprint') ~= ARGV[1] then return 0 end
if ARGV[2] ~= '1' and redis.call('HEXISTS', KEYS[1], 'resource') == 1 then return 0 end
return redis.call('DEL', KEYS[1])
"""


def fingerprint(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()


def content_hash(source: BinaryIO, block: int = 1 << 20) -> str:
    """sha256 of a file's bytes from its start, read a block at a time; the file is left at its start."""
    digest = hashlib.sha256()
    source.seek(0)
    while data := source.read(block):
        digest.update(data)
    source.seek(0)
    return digest.hexdigest()


@dataclass
class Claim:
    """A key claimed by this request. `record` writes what it created (in the creating transaction, for jobs)."""

    key: str
    fingerprint: str
    ttl_s: int
    resource_of: Callable[[str], str] = str  # the resource id from the job id, for a batch made of one job
    recorded: bool = False

    def record(self, pipe: Any, job_id: str) -> None:
        """Queue on `pipe` the key's resource: the job (or what `resource_of` makes of it) and the full TTL."""
        pipe.hset(self.key, "resource", self.resource_of(job_id))
        pipe.expire(self.key, self.ttl_s)
        self.recorded = True


class Idempotency:
    def __init__(self, client: aioredis.Redis, ttl_s: int, lock_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self.lock_s = lock_s
        self._claim = client.register_script(CLAIM)
        self._release = client.register_script(RELEASE)

    async def once(
        self,
        tenant: str,
        route: str,
        key: str | None,
        body: str,
        create: Callable[[Claim | None], Awaitable[T]],
        replay: Callable[[str], Awaitable[T]],
        resource_id: Callable[[T], str],
        resource_of: Callable[[str], str] = str,
    ) -> tuple[T, bool]:
        """Create once per (tenant, route, key): returns (what `create` made, False), or (what `replay` reads of
        the resource created by an earlier request with the key, True). `create` gets the claim, to record in
        its own transaction where it can; otherwise the resource is recorded once `create` returns."""
        if key is None:
            return await create(None), False
        if not key or len(key) > MAX_KEY_CHARS or not key.isprintable():
            raise InvalidRequest(f"{HEADER} must be 1 to {MAX_KEY_CHARS} printable characters")
        name = keys.idempotency_key(tenant, route, hashlib.sha256(key.encode()).hexdigest())
        claim = Claim(name, fingerprint(route, body), self.ttl_s, resource_of)
        reply = await self._claim(keys=[name], args=[claim.fingerprint, self.lock_s])
        outcome = as_str(reply[0])
        if outcome == "replay":
            return await replay(as_str(reply[1])), True
        if outcome == "mismatch":
            raise IdempotencyKeyReused(
                f"this {HEADER} was used with another request body within {self.ttl_s} s; use a new key for a new "
                "request"
            )
        if outcome == "pending":
            raise IdempotencyInProgress(
                f"a request with this {HEADER} is still being handled; retry for its answer",
                headers={"Retry-After": "1"},
            )
        try:
            made = await create(claim)
        except Exception:
            # A failed request made nothing that lives on (a job whose enqueue failed has failed): a retry runs
            # again.
            await self._release(keys=[name], args=[claim.fingerprint, 1])
            raise
        except BaseException:  # cancelled: what it recorded stays (a retry replays it), else the claim goes
            await self._release(keys=[name], args=[claim.fingerprint, 0])
            raise
        if not claim.recorded:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(name, "resource", resource_id(made))
                pipe.expire(name, self.ttl_s)
                await pipe.execute()
        return made, False
