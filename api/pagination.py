"""Lists of a tenant's files and batches, newest first, a page at a time (OpenAI's `limit` / `after` cursor)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis

from schemas.errors import RerankError
from store.codec import as_str

T = TypeVar("T")


async def newest_first(
    client: aioredis.Redis,
    index_key: str,
    limit: int,
    after: str | None,
    get: Callable[[str], Awaitable[T]],
    gone: type[RerankError],
) -> tuple[list[T], bool]:
    """Up to `limit` items of the sorted set `index_key` (id -> creation time), newest first, starting after the id
    `after`, and whether more follow. Ids whose item is `gone` (expired) are dropped from the index as they are met."""
    ids = [as_str(i) for i in await client.zrevrange(index_key, 0, -1)]
    if after is not None:
        ids = ids[ids.index(after) + 1 :] if after in ids else []
    items: list[T] = []
    for item_id in ids:
        try:
            items.append(await get(item_id))
        except gone:
            await client.zrem(index_key, item_id)
        if len(items) > limit:
            break
    return items[:limit], len(items) > limit
