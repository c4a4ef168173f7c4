"""Idempotency-Key claims (`store.idempotency`) as pure logic on fakeredis; the real farm's behaviour is in
tests/integration/test_redis_memory_and_retries.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import fakeredis
import pytest

from schemas.errors import IdempotencyInProgress, IdempotencyKeyReused, InvalidRequest, Unavailable
from store.idempotency import Claim, Idempotency


class Maker:
    """Creates numbered resources; records what each create saw."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.made: list[str] = []
        self.fail = fail

    async def create(self, claim: Claim | None) -> str:
        if self.fail is not None:
            raise self.fail
        self.made.append(f"res_{len(self.made) + 1}")
        return self.made[-1]

    async def replay(self, resource: str) -> str:
        return resource


def run(scenario: Callable[[Idempotency], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        client = fakeredis.aioredis.FakeRedis()
        return await scenario(Idempotency(client, ttl_s=3600, lock_s=60))

    return asyncio.run(main())


def once(idem: Idempotency, maker: Maker, key: str | None, body: str, tenant: str = "acme") -> Awaitable[Any]:
    return idem.once(tenant, "jobs", key, body, maker.create, maker.replay, resource_id=str)


def test_a_retry_with_the_same_key_and_body_answers_the_first_resource() -> None:
    maker = Maker()

    async def scenario(idem: Idempotency) -> Any:
        return [await once(idem, maker, "k1", "{}") for _ in range(3)]

    assert run(scenario) == [("res_1", False), ("res_1", True), ("res_1", True)]
    assert maker.made == ["res_1"]


def test_without_a_key_every_request_creates() -> None:
    maker = Maker()

    async def scenario(idem: Idempotency) -> Any:
        return [await once(idem, maker, None, "{}") for _ in range(2)]

    assert run(scenario) == [("res_1", False), ("res_2", False)]


def test_the_same_key_with_another_body_is_refused() -> None:
    maker = Maker()

    async def scenario(idem: Idempotency) -> None:
        await once(idem, maker, "k1", '{"a": 1}')
        with pytest.raises(IdempotencyKeyReused, match="another request body"):
            await once(idem, maker, "k1", '{"a": 2}')

    run(scenario)
    assert maker.made == ["res_1"]


def test_keys_are_per_tenant() -> None:
    maker = Maker()

    async def scenario(idem: Idempotency) -> Any:
        return [await once(idem, maker, "k1", "{}", tenant) for tenant in ("acme", "globex")]

    assert run(scenario) == [("res_1", False), ("res_2", False)]


def test_a_key_whose_first_request_is_still_running_answers_409() -> None:
    maker = Maker()

    async def scenario(idem: Idempotency) -> None:
        started, release = asyncio.Event(), asyncio.Event()

        async def slow(claim: Claim | None) -> str:
            started.set()
            await release.wait()
            return await maker.create(claim)

        first = asyncio.create_task(idem.once("acme", "jobs", "k1", "{}", slow, maker.replay, resource_id=str))
        await started.wait()
        with pytest.raises(IdempotencyInProgress) as refused:
            await once(idem, maker, "k1", "{}")
        assert refused.value.headers == {"Retry-After": "1"}
        release.set()
        assert await first == ("res_1", False)
        assert await once(idem, maker, "k1", "{}") == ("res_1", True)

    run(scenario)


def test_a_failed_first_request_gives_its_key_up() -> None:
    failing, maker = Maker(fail=Unavailable("queue down")), Maker()

    async def scenario(idem: Idempotency) -> Any:
        with pytest.raises(Unavailable):
            await once(idem, failing, "k1", "{}")
        return await once(idem, maker, "k1", "{}")

    assert run(scenario) == ("res_1", False)


def test_a_resource_recorded_in_the_creating_transaction_is_replayed() -> None:
    """A job's key is written with the job (`Claim.record` on the creating pipeline), not after it."""

    async def scenario(idem: Idempotency) -> Any:
        async def create(claim: Claim | None) -> str:
            assert claim is not None
            async with idem.redis.pipeline(transaction=True) as pipe:
                claim.record(pipe, "job_7")
                await pipe.execute()
            return "batch_7"

        first = await idem.once("acme", "batches", "k", "{}", create, Maker().replay, str, lambda j: "batch_7")
        again = await idem.once("acme", "batches", "k", "{}", create, Maker().replay, str, lambda j: "batch_7")
        ttl = [await idem.redis.ttl(key) for key in await idem.redis.keys("rerank:tenant:acme:idem:*")]
        return first, again, ttl

    first, again, ttl = run(scenario)
    assert first == ("batch_7", False) and again == ("batch_7", True)
    assert ttl and 3500 < ttl[0] <= 3600  # the retention window, not the lock's


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there"])
def test_a_malformed_key_is_refused(key: str) -> None:
    async def scenario(idem: Idempotency) -> None:
        with pytest.raises(InvalidRequest, match="Idempotency-Key"):
            await once(idem, Maker(), key, "{}")

    run(scenario)
