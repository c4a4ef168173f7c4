"""Which models this farm serves, and the one place a request's `model` becomes a served model's name.

Workers announce their model with every heartbeat (`rerank:models:seen`, a sorted set of served names by the time
last seen). A model is served while one of its workers was seen within RERANK_MODEL_GRACE_S (live, or restarting);
the farm's default model (RERANK_DEFAULT_MODEL, by default the public name of RERANK_MODEL) is always accepted, so
its jobs may queue before its first worker is up. Aliases (RERANK_MODEL_ALIASES) map other names on purpose; any
other name is refused with the list of served names.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from schemas import keys
from schemas.errors import ModelNotFound
from schemas.settings import Settings
from store.codec import as_str


@dataclass
class ServedModel:
    name: str
    live: bool  # a worker of it announced itself within its heartbeat's lifetime


class ModelCatalog:
    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings

    async def served(self) -> list[ServedModel]:
        """The default model first, then every model seen within the grace period, by name."""
        now = time.time()
        live_after = now - self.settings.worker_heartbeat_s * keys.WORKER_TTL_FACTOR
        seen: Any = await self.redis.zrangebyscore(
            keys.MODELS_SEEN, now - self.settings.model_grace_s, "+inf", withscores=True
        )
        found = {as_str(name): ServedModel(as_str(name), at >= live_after) for name, at in seen}
        default = self.settings.default_served
        first = found.pop(default, ServedModel(default, False))
        return [first, *(found[name] for name in sorted(found))]

    async def resolve(self, requested: str | None) -> str:
        """The served name a request's `model` means: the default when it names none, an alias's target, or the
        name itself when it is served; ModelNotFound otherwise."""
        if not requested:
            return self.settings.default_served
        name = self.settings.model_aliases.get(requested, requested)
        if name == self.settings.default_served:  # always served (`served` lists it first): no Redis read
            return name
        served = [m.name for m in await self.served()]
        if name not in served:
            raise ModelNotFound(requested, served)
        return name
