"""A move: one atomic write to Redis (a Lua script), as data, and the runners that run it.

`store.job_state` (every write to a job), `store.webhook_queue` (the delivery schedule) and `store.webhook_secrets`
(tenants' signing secrets) define their writes as moves, so the same move runs on the workers' sync client and on
the API's asyncio one.
A move's `then` is what its reply means beyond its caller (a job that ended is counted and logged): the runner does
it, once per move run, whichever side ran it, so no caller has to remember it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Move(Generic[T]):
    """One move: which script, with which KEYS and ARGV, how its caller reads the reply, and what follows it."""

    script: str
    keys: list[str]
    args: Sequence[str | int | float]
    parse: Callable[[Any], T]
    then: Callable[[T], None] | None = None

    def read(self, reply: Any) -> T:
        """The reply as its caller reads it, after the move's `then`."""
        result = self.parse(reply)
        if self.then is not None:
            self.then(result)
        return result


class Runner:
    """Runs moves on a sync Redis client (each script is registered once, by its first move; EVALSHA after)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._scripts: dict[str, Any] = {}

    def __call__(self, move: Move[T]) -> T:
        script = self._scripts.get(move.script) or self._scripts.setdefault(
            move.script, self._client.register_script(move.script)
        )
        return move.read(script(keys=move.keys, args=move.args))


class AsyncRunner:
    """Runs moves on an asyncio Redis client."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._scripts: dict[str, Any] = {}

    async def __call__(self, move: Move[T]) -> T:
        script = self._scripts.get(move.script) or self._scripts.setdefault(
            move.script, self._client.register_script(move.script)
        )
        reply: Awaitable[Any] = script(keys=move.keys, args=move.args)
        return move.read(await reply)
