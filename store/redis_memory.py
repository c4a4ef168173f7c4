"""Redis memory: the eviction policy the farm needs, and the room left for new jobs.

The farm keeps every job's record, inputs, chunk ledger and results in Redis, each with a TTL. A Redis with a
`maxmemory` and any policy but `noeviction` deletes keys silently when it fills (`volatile-*` policies pick exactly
the keys with a TTL): jobs answered 202 would vanish. So the API, the workers and the webhook worker refuse such a
Redis at start, and `/readyz` says why, unless `RERANK_REDIS_ALLOW_EVICTION` says to run anyway (logged as an error).
The policy is read from `INFO memory`, which managed Redis offerings answer even where they disable `CONFIG`.

With `noeviction`, a full Redis refuses writes (redis-py's `OutOfMemoryError`). The API keeps it from filling with
new jobs: it estimates what a job will hold (`job_bytes`) and answers 503 (`StoreFull`, with Retry-After) when that
would push `used_memory` past `RERANK_REDIS_MEMORY_HEADROOM` x `maxmemory`; the rest of memory is left for the
results of jobs already accepted. Writes that end a job are made so that a full Redis still takes them
(`store.job_state`'s final moves), so an accepted job always ends.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ExecAbortError, OutOfMemoryError, RedisError, ResponseError
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

from schemas import metrics
from schemas.errors import StoreFull

logger = logging.getLogger(__name__)

# Redis bytes per stored item beyond the text it holds, from `python -m rerankfarm.bench_memory` (README, "Redis
# memory"): a pair's score in its chunk's result JSON (22 measured, with margin), and a chunk's ledger and open-set
# entries. `job_bytes` adds these to the exact size of the inputs it writes.
RESULT_BYTES_PER_PAIR = 32
BYTES_PER_CHUNK = 220
BYTES_PER_JOB = 2_000  # the job hash, its input summary, index entries
STORE_FULL_RETRY_AFTER_S = 30


def job_bytes(input_bytes: int, pairs: int, chunks: int) -> int:
    """What a new job will hold in Redis at most: its inputs (the chunks' JSON and the input summary, written at
    submit), its results (written as chunks are scored) and its bookkeeping."""
    return input_bytes + pairs * RESULT_BYTES_PER_PAIR + chunks * BYTES_PER_CHUNK + BYTES_PER_JOB


def is_out_of_memory(exc: BaseException | None) -> bool:
    """A write Redis refused because it is full: `OOM command not allowed...`, raised as such, as the error of a
    script (redis-server 6.2) or as the abort of a transaction; also when wrapped by another library (kombu), as the
    cause of what it raised."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, OutOfMemoryError):
            return True
        if isinstance(exc, ExecAbortError | ResponseError) and "OOM command not allowed" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def waiting_for_room(wait_s: float) -> Retrying:
    """A write that a full Redis refuses is tried again for up to `wait_s` seconds, as running jobs end and free
    their chunks' inputs; then the error goes up (a worker's chunk then fails its job, `store_full`). Use:
    `waiting_for_room(5)(run, move)`."""
    return Retrying(
        retry=retry_if_exception(is_out_of_memory),
        stop=stop_after_delay(wait_s),
        wait=wait_exponential(multiplier=0.1, max=2.0),
        before_sleep=lambda state: logger.warning("redis full: waiting for room (%r)", state.outcome),
        reraise=True,
    )


@dataclass(frozen=True)
class Memory:
    """Redis's `INFO memory`, the fields the farm reads."""

    used: int
    maxmemory: int  # 0: no limit
    policy: str

    @classmethod
    def of(cls, info: dict[str, Any]) -> Memory:
        return cls(
            used=int(info.get("used_memory", 0)),
            maxmemory=int(info.get("maxmemory", 0)),
            policy=str(info.get("maxmemory_policy", "noeviction")),
        )

    @property
    def evicting(self) -> bool:
        """Redis may delete the farm's keys when it fills (a limit, and a policy other than noeviction)."""
        return self.maxmemory > 0 and self.policy != "noeviction"

    def room(self, headroom: float) -> int | None:
        """Bytes that new jobs may still take below `headroom` x maxmemory; None without a limit."""
        if not self.maxmemory:
            return None
        return int(self.maxmemory * headroom) - self.used

    def policy_problem(self) -> str | None:
        """Why this Redis cannot be trusted with jobs, naming the setting and the fix; None when it can."""
        if not self.evicting:
            return None
        return (
            f"Redis has maxmemory {self.maxmemory} bytes with maxmemory-policy {self.policy}: when it fills it "
            "deletes keys, and jobs answered 202 would vanish. Set `maxmemory-policy noeviction` on the Redis "
            "server (redis.conf, `CONFIG SET maxmemory-policy noeviction`, or your provider's parameter group), "
            "or set RERANK_REDIS_ALLOW_EVICTION=true to run anyway."
        )


def export(memory: Memory) -> None:
    metrics.REDIS_MEMORY_USED.set(memory.used)
    metrics.REDIS_MEMORY_MAX.set(memory.maxmemory)


def check_policy(memory: Memory, allow_eviction: bool, who: str) -> None:
    """At start: raise EvictingRedis for an evicting Redis, unless allowed (then logged as an error)."""
    problem = memory.policy_problem()
    if problem is None:
        return
    if not allow_eviction:
        raise EvictingRedis(f"{who}: {problem}")
    logger.error("%s: RUNNING ON AN EVICTING REDIS (RERANK_REDIS_ALLOW_EVICTION=true): %s", who, problem)


def check_at_start(client: Any, allow_eviction: bool, who: str) -> None:
    """A process's check as it starts (sync client): raises EvictingRedis (see `check_policy`); a Redis that does
    not answer yet is logged and left to the process's own retries."""
    try:
        memory = read_memory(client)
    except RedisError as exc:
        logger.warning("%s: could not read Redis's memory settings at start (%r)", who, exc)
        return
    check_policy(memory, allow_eviction, who)


async def check_at_start_async(client: Any, allow_eviction: bool, who: str) -> None:
    """`check_at_start` for an asyncio client (the API, the webhook worker)."""
    try:
        memory = await aread_memory(client)
    except RedisError as exc:
        logger.warning("%s: could not read Redis's memory settings at start (%r)", who, exc)
        return
    check_policy(memory, allow_eviction, who)


def read_memory(client: Any) -> Memory:
    """`INFO memory` of a sync client."""
    return Memory.of(client.info("memory"))


async def aread_memory(client: Any) -> Memory:
    """`INFO memory` of an asyncio client."""
    return Memory.of(await client.info("memory"))


def admit(memory: Memory, headroom: float, needed: int) -> None:
    """Raise StoreFull (503, Retry-After) when `needed` more bytes would push Redis past its headroom."""
    room = memory.room(headroom)
    if room is None or needed <= room:
        return
    metrics.REQUESTS_REFUSED.labels("store_full").inc()
    raise StoreFull(
        f"the job store is near its memory limit ({memory.used} of {memory.maxmemory} bytes used, "
        f"{headroom:.0%} is the limit for new work; this job needs about {needed}); retry later",
        headers={"Retry-After": str(STORE_FULL_RETRY_AFTER_S)},
    )


class EvictingRedis(RuntimeError):
    """Redis may evict the farm's keys (see `Memory.policy_problem`)."""
