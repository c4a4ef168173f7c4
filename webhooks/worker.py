"""The webhook worker (`rerankfarm webhooks`): delivers job webhooks, on no GPU and with no model.

A job's final-state move puts the job in its tenant's due set (`store.job_state`). Each webhook worker runs one
asyncio loop. Its dispatcher claims as many due deliveries as it has free slots (`store.webhook_queue.claim`: round
robin between tenants, capped per tenant and per destination, a paused destination's deliveries recorded as not
sent) and runs each at once as a task: read the job, sign its event with the tenant's secrets
(`store.webhook_secrets`), make one attempt (`webhooks.delivery`), record it and the next due time
(`JobHandle.webhook_attempt`), then free the slot and tell the destination's circuit breaker
(`webhook_queue.release`). Nothing waits in a first-in first-out queue between the claim and the attempt, so a
receiver that hangs holds only the slots its caps allow. Several workers share the work through Redis alone; one that
dies mid-delivery only delays the deliveries it held, by RERANK_WEBHOOK_LEASE_S (the receiver may then get the event
twice, with the same webhook-id).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
import time
from datetime import UTC, datetime
from typing import Any

from prometheus_client import start_http_server

from schemas import keys, metrics
from schemas.errors import JobNotFound
from schemas.settings import Settings, get_settings
from schemas.webhooks import WebhookAttempt, WebhookState, event_payload
from store import moves, redis_memory, webhook_queue, webhook_secrets
from store.connect import async_redis_client, close_async
from store.job_state import JobHandle, JobRecord
from store.results import open_results
from store.webhook_queue import Claimed, Outcome
from webhooks import delivery

logger = logging.getLogger(__name__)

ATTEMPTS_KEPT = 50
SNAPSHOT_EVERY_S = 5.0  # how often the schedule's gauges are read from Redis
BREAKER_FORGOTTEN_AFTER_S = 7 * 86400  # a destination not paused whose last failure is older is forgotten


async def build_body(client: Any, settings: Settings, record: JobRecord, event: str, at: str) -> str:
    """The event's JSON: the job, a link to its results, and the results themselves for small succeeded jobs."""
    job = record.to_job().model_dump(mode="json")
    base = (settings.public_url or settings.api_url).rstrip("/")
    results = None
    if event == "job.succeeded" and record.total <= settings.webhook_inline_results_max_pairs:
        with contextlib.suppress(JobNotFound):  # expired: the link alone
            results = [r.model_dump(mode="json", exclude_none=True) async for r in await open_results(client, record)]
    payload = event_payload(event, job, f"{base}/v1/jobs/{record.id}/results", results, at)
    return json.dumps(payload, separators=(",", ":"))


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds")


class Deliveries:
    """One webhook worker's deliveries: the dispatcher that claims them, and each one's attempt."""

    def __init__(self, client: Any, settings: Settings, concurrency: int) -> None:
        self.client = client
        self.settings = settings
        self.concurrency = concurrency
        self.run = moves.AsyncRunner(client)
        self.tasks: set[asyncio.Task[None]] = set()
        self.slot_freed = asyncio.Event()
        self.stopping = asyncio.Event()
        self._snapshot_at = 0.0

    async def deliver(self, claimed: Claimed) -> str:
        """One attempt of the claimed delivery; returns the webhook state afterwards."""
        settings = self.settings
        view = await self.run(JobHandle(claimed.job_id).read())
        record = view.record if view is not None else None
        if record is None or record.webhook_state != WebhookState.pending or not record.webhook_url:
            await self.run(webhook_queue.drop(claimed))
            return (record.webhook_state or "none") if record else "none"
        event, url = record.webhook_event, record.webhook_url
        number = record.webhook_attempt + 1
        now = datetime.now(UTC)
        secrets = webhook_secrets.signing_secrets(settings, await self.client.hget(keys.WEBHOOK_SECRETS, record.tenant))
        if claimed.paused_until is not None:
            result = delivery.Attempt(
                error=f"not sent: {claimed.destination} is paused until {_iso(claimed.paused_until)} after "
                f"failing {settings.webhook_breaker_failures} or more times in a row"
            )
        elif not secrets:  # the secret was deleted, or the farm-wide one unset since: retried on schedule
            result = delivery.Attempt(error=f"not sent: {webhook_secrets.missing_reason(settings, record.tenant)}")
        else:
            body = await build_body(self.client, settings, record, event, now.isoformat())
            result = await delivery.attempt(
                url,
                delivery.message_id(record.id, event),
                body,
                secrets,
                now,
                settings.webhook_allowlist,
                settings.webhook_timeout_s,
                settings.webhook_connect_timeout_s,
            )
        state, due = delivery.next_state(result, number, settings.retry_delays())
        entry = WebhookAttempt(
            attempt=number,
            at=now.isoformat(),
            status_code=result.status_code,
            error=result.error,
            duration_ms=result.duration_ms,
        )
        await self.run(JobHandle(record.id, record.tenant).webhook_attempt(entry, state, due, ATTEMPTS_KEPT,
                                                                           settings.result_ttl_s))  # fmt: skip
        sent = claimed.paused_until is None and bool(secrets)
        health = delivery.outcome(result) if sent else Outcome.none
        failures, paused = await self.run(webhook_queue.release(claimed, health, settings))
        metrics.WEBHOOK_DELIVERIES.labels(state.value, record.tenant).inc()
        if paused and failures == settings.webhook_breaker_failures:
            logger.warning("tenant %s: webhooks to %s paused until %s", record.tenant, claimed.destination,
                           _iso(paused))  # fmt: skip
        logger.info(
            "job %s %s: webhook attempt %d to %s: %s -> %s",
            record.id,
            event,
            number,
            claimed.destination,
            result.status_code if result.status_code is not None else result.error,
            state.value,
        )
        return state.value

    async def _one(self, claimed: Claimed) -> None:
        try:
            await self.deliver(claimed)
        except Exception:  # Redis away or full: the delivery is due again when its lease ends
            logger.exception("job %s: webhook delivery failed", claimed.job_id)
        finally:
            self.slot_freed.set()

    async def dispatch_once(self) -> int:
        """Claim what the free slots can take, and start each."""
        free = self.concurrency - len(self.tasks)
        if free <= 0:
            return 0
        claimed = await self.run(webhook_queue.claim(self.settings, free))
        for c in claimed:
            task = asyncio.create_task(self._one(c), name=f"webhook {c.job_id}")
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return len(claimed)

    async def export_snapshot(self) -> None:
        """The schedule's gauges, the farm's as a whole (every webhook worker exports the same values)."""
        now = time.time()
        in_flight = await self.client.zrangebyscore(keys.WEBHOOKS_IN_FLIGHT, now, "+inf")
        snap = webhook_queue.snapshot(
            in_flight, await self.client.hgetall(keys.WEBHOOK_BREAKER), now, BREAKER_FORGOTTEN_AFTER_S
        )
        if snap.stale:
            await self.client.hdel(keys.WEBHOOK_BREAKER, *snap.stale)
        due = {}
        for raw in await self.client.smembers(keys.WEBHOOK_TENANTS):
            tenant = raw.decode() if isinstance(raw, bytes) else raw
            due[tenant] = await self.client.zcount(keys.webhooks_due_key(tenant), "-inf", now)
        for gauge, values in (
            (metrics.WEBHOOK_IN_FLIGHT, snap.in_flight_by_destination),
            (metrics.WEBHOOK_TENANT_IN_FLIGHT, snap.in_flight_by_tenant),
            (metrics.WEBHOOK_PAUSED, snap.paused_by_tenant),
            (metrics.WEBHOOK_DUE, due),
        ):
            gauge.clear()
            for label, value in values.items():
                gauge.labels(label).set(value)

    async def run_forever(self) -> None:
        while not self.stopping.is_set():
            self.slot_freed.clear()
            try:
                await self.dispatch_once()
                if time.monotonic() - self._snapshot_at > SNAPSHOT_EVERY_S:
                    self._snapshot_at = time.monotonic()
                    await self.export_snapshot()
            except Exception as exc:  # Redis away or full: due deliveries wait for the next look
                logger.warning("webhook dispatch failed: %r", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.webhook_dispatch_interval_s):
                    await self._wake()
        if self.tasks:  # let deliveries under way end; any left are due again after their lease
            logger.info("webhooks: waiting for %d deliveries under way", len(self.tasks))
            await asyncio.wait(self.tasks, timeout=self.settings.webhook_timeout_s + 5)

    async def _wake(self) -> None:
        """Until a slot frees or the worker stops."""
        freed = asyncio.ensure_future(self.slot_freed.wait())
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({freed, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            freed.cancel()
            stop.cancel()


async def serve(settings: Settings, concurrency: int) -> int:
    client = async_redis_client(settings.redis_url, health_check_interval=30, socket_timeout=30)
    try:
        try:
            await redis_memory.check_at_start_async(client, settings.redis_allow_eviction, "rerankfarm webhooks")
        except redis_memory.EvictingRedis as exc:
            print(f"cannot start: {exc}", file=sys.stderr)
            return 2
        moved = await moves.AsyncRunner(client)(webhook_queue.migrate())
        if moved:
            logger.info("webhooks: %d pending deliveries moved to their tenants' due sets", moved)
        worker = Deliveries(client, settings, concurrency)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stopping.set)
        logger.info(
            "webhooks@%s ready: %d delivery slots, at most %d in flight per tenant and %d per destination",
            socket.gethostname(),
            concurrency,
            settings.webhook_max_in_flight_per_tenant,
            settings.webhook_max_in_flight_per_destination,
        )
        await worker.run_forever()
        logger.info("webhooks: stopped")
        return 0
    finally:
        await close_async(client)


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="rerankfarm webhooks", description=__doc__)
    parser.add_argument(
        "--concurrency", type=int, default=settings.webhook_concurrency, help="deliveries in flight (this process)"
    )
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.auth == "off" and settings.webhook_secret is None:
        logger.warning("RERANK_WEBHOOK_SECRET is not set (authentication is off): no webhook can be signed until it is")
    if settings.webhook_metrics_port:
        try:  # metrics must not stop the work: a port in use is logged
            start_http_server(settings.webhook_metrics_port)
        except OSError as exc:
            logger.warning("webhooks: no /metrics on port %d: %s", settings.webhook_metrics_port, exc)
    return asyncio.run(serve(settings, args.concurrency))


if __name__ == "__main__":
    sys.exit(main())
