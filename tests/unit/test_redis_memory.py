"""The eviction-policy check and the headroom estimate (`store.redis_memory`) as pure logic."""

from __future__ import annotations

import pytest
from redis.exceptions import ExecAbortError, OutOfMemoryError, ResponseError

from schemas.errors import StoreFull
from store.redis_memory import EvictingRedis, Memory, admit, check_policy, is_out_of_memory, job_bytes

MB = 2**20


@pytest.mark.parametrize("policy", ["volatile-lru", "allkeys-lru", "volatile-ttl", "allkeys-random"])
def test_an_evicting_redis_is_refused_with_the_setting_and_the_fix(policy: str) -> None:
    memory = Memory(used=MB, maxmemory=64 * MB, policy=policy)
    with pytest.raises(EvictingRedis) as refused:
        check_policy(memory, allow_eviction=False, who="api")
    assert f"maxmemory-policy {policy}" in str(refused.value)
    assert "maxmemory-policy noeviction" in str(refused.value)
    assert "RERANK_REDIS_ALLOW_EVICTION" in str(refused.value)


def test_an_evicting_redis_runs_when_allowed_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    check_policy(Memory(MB, 64 * MB, "allkeys-lru"), allow_eviction=True, who="worker")
    assert "EVICTING REDIS" in caplog.text and caplog.records[-1].levelname == "ERROR"


@pytest.mark.parametrize("memory", [Memory(MB, 64 * MB, "noeviction"), Memory(MB, 0, "allkeys-lru")])
def test_noeviction_or_no_limit_is_accepted(memory: Memory) -> None:
    assert memory.policy_problem() is None
    check_policy(memory, allow_eviction=False, who="api")


def test_info_memory_is_read() -> None:
    memory = Memory.of({"used_memory": 5, "maxmemory": 10, "maxmemory_policy": "volatile-lru"})
    assert memory == Memory(5, 10, "volatile-lru") and memory.evicting


def test_a_job_past_the_headroom_is_refused_with_retry_after() -> None:
    memory = Memory(used=70 * MB, maxmemory=100 * MB, policy="noeviction")
    admit(memory, 0.8, 10 * MB - 1)  # fits under 80 MB
    with pytest.raises(StoreFull) as refused:
        admit(memory, 0.8, 10 * MB + 1)
    assert refused.value.status == 503 and refused.value.headers["Retry-After"]
    admit(Memory(used=70 * MB, maxmemory=0, policy="noeviction"), 0.8, 10**12)  # no limit, nothing refused


def test_a_job_is_estimated_above_its_inputs() -> None:
    assert job_bytes(input_bytes=10_000, pairs=100, chunks=1) > 10_000 + 100 * 8


@pytest.mark.parametrize(
    "exc",
    [
        OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
        # redis-server 6.2 inside a script (what the embedded Redis answers)
        ResponseError("Error running script (call to f_1): @user_script:1: -OOM command not allowed when used memory"),
        ExecAbortError("Transaction discarded because of: -OOM command not allowed when used memory"),
    ],
)
def test_a_full_redis_is_recognised_in_every_form(exc: Exception) -> None:
    assert is_out_of_memory(exc)


def test_other_errors_are_not_a_full_redis() -> None:
    assert not is_out_of_memory(ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"))


def test_a_full_redis_is_recognised_behind_another_librarys_error() -> None:
    class BrokerError(Exception):
        pass

    try:
        try:
            raise OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
        except OutOfMemoryError as oom:
            raise BrokerError("publish failed") from oom
    except BrokerError as wrapped:
        assert is_out_of_memory(wrapped)
    assert not is_out_of_memory(BrokerError("publish failed"))
