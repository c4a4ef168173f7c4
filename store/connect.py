"""Connections to the farm's Redis, from `RERANK_REDIS_URL`: a plain `redis://` (or `rediss://`, `unix://`) URL, or
Redis Sentinel.

A Sentinel URL names every sentinel, kombu's way, and the master's name:

    sentinel://[:PASSWORD@]HOST:PORT;sentinel://HOST:PORT;sentinel://HOST:PORT[/DB]?master_name=NAME

The password (from any part) is the master's; the sentinels are asked without one. The job store, the API, the
webhook worker and the broker (kombu's Sentinel transport, with `master_name` in its transport options) all follow
the master the sentinels name, through a failover.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import Sentinel


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: list[tuple[str, int]]
    master_name: str
    db: int
    password: str | None


def sentinel_target(url: str) -> SentinelTarget | None:
    """The sentinels, master name, database and password of a Sentinel URL; None for any other URL. Raises
    ValueError for a Sentinel URL without a master name."""
    if not url.startswith("sentinel://"):
        return None
    sentinels: list[tuple[str, int]] = []
    master_name, db, password = None, 0, None
    for part in url.split(";"):
        parts = urlsplit(part.strip())
        if parts.scheme != "sentinel" or not parts.hostname:
            raise ValueError(f"not a sentinel://HOST:PORT part: {part!r}")
        sentinels.append((parts.hostname, parts.port or 26379))
        password = parts.password or password
        if parts.path.strip("/"):
            db = int(parts.path.strip("/"))
        master_name = parse_qs(parts.query).get("master_name", [master_name])[0]
    if not master_name:
        raise ValueError("a sentinel:// URL needs ?master_name=NAME (the name the sentinels monitor)")
    return SentinelTarget(sentinels, master_name, db, password)


def redis_client(url: str, **kwargs: Any) -> redis.Redis:
    """A redis-py client of the farm's Redis; with Sentinel, of the current master (found again after a failover)."""
    target = sentinel_target(url)
    if target is None:
        return redis.Redis.from_url(url, **kwargs)
    sentinel = Sentinel(target.sentinels, socket_timeout=kwargs.get("socket_timeout", 2.0))
    return sentinel.master_for(target.master_name, db=target.db, password=target.password, **kwargs)


def async_redis_client(url: str, **kwargs: Any) -> aioredis.Redis:
    """`redis_client` for asyncio (the API)."""
    target = sentinel_target(url)
    if target is None:
        return aioredis.from_url(url, **kwargs)
    sentinel = AsyncSentinel(target.sentinels, socket_timeout=kwargs.get("socket_timeout", 2.0))
    return sentinel.master_for(target.master_name, db=target.db, password=target.password, **kwargs)


async def close_async(client: aioredis.Redis) -> None:
    """Close an asyncio client from `async_redis_client`, and the connections to its sentinels, if any."""
    await client.aclose()
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", []):
        await sentinel.aclose()


def broker(url: str) -> tuple[str, dict[str, Any]]:
    """kombu's broker URL and the transport options it needs besides the farm's own (the master's name)."""
    target = sentinel_target(url)
    if target is None:
        return url, {}
    auth = f":{target.password}@" if target.password else ""
    hosts = ";".join(f"sentinel://{auth}{host}:{port}/{target.db}" for host, port in target.sentinels)
    return hosts, {"master_name": target.master_name}
