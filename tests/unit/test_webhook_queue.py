"""The webhook delivery schedule's moves (`store.webhook_queue`) on fakeredis: fair order between tenants, the caps
per tenant and per destination, leases, the circuit breaker, the legacy due set's migration, the metrics' snapshot."""

from __future__ import annotations

from schemas import keys
from schemas.settings import Settings
from store import webhook_queue
from store.webhook_queue import Claimed, Outcome

NOW = 1_800_000_000.0
SETTINGS = Settings(
    webhook_max_in_flight_per_tenant=8,
    webhook_max_in_flight_per_destination=4,
    webhook_breaker_failures=3,
    webhook_breaker_pause_s=30,
    webhook_breaker_max_pause_s=100,
    webhook_lease_s=120,
    webhook_dispatch_interval_s=1.0,
)


def due(r, tenant: str, job_id: str, dest: str, at: float = NOW - 1) -> None:
    """A job of `tenant` whose webhook to `dest` is due at `at`, as `store.job_state`'s final moves leave it."""
    r.hset(keys.job_key(job_id), mapping={"id": job_id, "tenant": tenant, "webhook_dest": dest})
    r.zadd(keys.webhooks_due_key(tenant), {job_id: at})
    r.sadd(keys.WEBHOOK_TENANTS, tenant)


def claim(run, slots: int, now: float = NOW, settings: Settings = SETTINGS) -> list[Claimed]:
    return run(webhook_queue.claim(settings, slots, now))


def test_a_tenants_backlog_does_not_hide_another_tenants_delivery(r, run) -> None:
    for i in range(50):
        due(r, "a", f"a{i}", f"h{i % 10}.example", at=NOW - 100 + i)  # a's backlog, due long before b's
    due(r, "b", "b0", "b.example")
    got = claim(run, 2)
    assert {c.tenant for c in got} == {"a", "b"}  # one each: round robin, not due order
    assert [c.job_id for c in got if c.tenant == "b"] == ["b0"]


def test_in_flight_is_capped_per_tenant_and_per_destination(r, run) -> None:
    for i in range(20):
        due(r, "a", f"a{i}", "slow.example")  # one destination
        due(r, "c", f"c{i}", f"c{i}.example")  # many destinations
    got = claim(run, 32)
    by_tenant = {t: [c for c in got if c.tenant == t] for t in ("a", "c")}
    assert len(by_tenant["a"]) == 4  # the destination's cap
    assert len(by_tenant["c"]) == 8  # the tenant's cap
    assert claim(run, 32) == []  # both caps full while those are in flight
    held = r.zscore(keys.webhooks_due_key("a"), "a9")
    assert held is not None and NOW < held <= NOW + 1  # held back a dispatch interval, not dropped
    leased = r.zscore(keys.webhooks_due_key("a"), by_tenant["a"][0].job_id)
    assert leased == NOW + 120  # a claimed delivery is due again at its lease's end if its worker dies
    run(webhook_queue.release(by_tenant["a"][0], Outcome.ok, SETTINGS))
    [next_one] = claim(run, 32, now=NOW + 2)
    assert next_one.tenant == "a"  # its slot freed: the destination takes one more


def test_the_tenant_with_fewer_deliveries_in_flight_goes_first(r, run) -> None:
    for i in range(3):
        due(r, "a", f"a{i}", f"a{i}.example")
    assert len(claim(run, 2)) == 2  # a: 2 in flight
    due(r, "b", "b0", "b.example")
    due(r, "b", "b1", "b1.example")
    got = claim(run, 1)
    assert [c.tenant for c in got] == ["b"]


def test_a_dead_workers_leases_end(r, run) -> None:
    for i in range(6):
        due(r, "a", f"a{i}", "one.example")
    assert len(claim(run, 32)) == 4
    assert claim(run, 32, now=NOW + 10) == []
    later = claim(run, 32, now=NOW + 121)  # the worker never released them: their leases are over
    assert len(later) == 4 and r.zcard(keys.WEBHOOKS_IN_FLIGHT) == 4


def test_a_failing_destination_is_paused_for_its_tenant_only_then_probed_one_at_a_time(r, run) -> None:
    for i in range(10):
        due(r, "a", f"a{i}", "shared.example")
    due(r, "b", "b0", "shared.example")
    for attempt in range(3):
        [c] = [x for x in claim(run, 1, now=NOW + attempt) if x.tenant == "a"] or [None]
        assert c is not None and c.paused_until is None
        r.zadd(keys.webhooks_due_key("a"), {c.job_id: NOW + 1000})  # its next attempt, much later
        failures, paused = run(webhook_queue.release(c, Outcome.failed, SETTINGS, now=NOW + attempt))
        assert failures == attempt + 1 and (paused > 0) == (attempt == 2)
    got = claim(run, 32, now=NOW + 5)
    paused_a = [c for c in got if c.tenant == "a"]
    assert paused_a and all(c.paused_until is not None for c in paused_a)  # recorded as not sent, no request
    assert r.zcard(keys.WEBHOOKS_IN_FLIGHT) == 1  # only b's real delivery holds a slot
    [b] = [c for c in got if c.tenant == "b"]
    assert b.paused_until is None  # a's broken receiver pauses nothing of b's
    field = webhook_queue.breaker_field("a", "shared.example")
    assert webhook_queue.paused_until(r.hget(keys.WEBHOOK_BREAKER, field), NOW + 5) is not None
    for c in paused_a:
        r.zadd(keys.webhooks_due_key("a"), {c.job_id: NOW + 40})
        run(webhook_queue.release(c, Outcome.none, SETTINGS, now=NOW + 5))  # not sent: not counted
    after = claim(run, 32, now=NOW + 40)  # the pause (30 s) is over: one probe at a time
    assert len([c for c in after if c.tenant == "a"]) == 1
    failures, paused = run(webhook_queue.release(after[0], Outcome.failed, SETTINGS, now=NOW + 41))
    assert failures == 4 and paused == NOW + 41 + 60  # the failed probe doubles the pause
    assert next(c.paused_until for c in claim(run, 32, now=NOW + 42) if c.tenant == "a") == NOW + 101
    run(webhook_queue.release(after[0], Outcome.ok, SETTINGS, now=NOW + 200))
    assert r.hget(keys.WEBHOOK_BREAKER, field) is None  # one success closes it


def test_empty_tenants_leave_the_index_and_the_legacy_due_set_migrates(r, run) -> None:
    r.sadd(keys.WEBHOOK_TENANTS, "gone")
    r.hset(keys.job_key("old1"), mapping={"id": "old1", "tenant": "acme"})
    r.zadd(webhook_queue.LEGACY_DUE, {"old1": 5.0, "old2": 6.0})  # old2's job expired: the default tenant
    assert run(webhook_queue.migrate()) == 2
    assert r.zscore(keys.webhooks_due_key("acme"), "old1") == 5.0
    assert r.zscore(keys.webhooks_due_key("default"), "old2") == 6.0
    assert not r.exists(webhook_queue.LEGACY_DUE)
    claim(run, 1)
    assert b"gone" not in r.smembers(keys.WEBHOOK_TENANTS)


def test_the_snapshot_counts_in_flight_and_paused_and_forgets_old_failures() -> None:
    in_flight = [b"j1\ta\th1:80", b"j2\ta\th2", b"j3\tb\th1:80"]
    breaker = {b"a\th1:80": f"5 {NOW + 10} {NOW}".encode(), b"b\tx": f"1 0 {NOW - 1000}".encode()}
    snap = webhook_queue.snapshot(in_flight, breaker, NOW, forget_after_s=500)
    assert snap.in_flight_by_destination == {"h1:80": 2, "h2": 1}
    assert snap.in_flight_by_tenant == {"a": 2, "b": 1}
    assert snap.paused_by_tenant == {"a": 1}
    assert snap.stale == ["b\tx"]


def test_a_delivery_with_nothing_to_send_leaves_the_schedule(r, run) -> None:
    due(r, "a", "a0", "h.example")
    [c] = claim(run, 1)
    run(webhook_queue.drop(c))
    assert r.zscore(keys.webhooks_due_key("a"), "a0") is None and r.zcard(keys.WEBHOOKS_IN_FLIGHT) == 0
