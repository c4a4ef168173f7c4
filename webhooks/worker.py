"""The webhook worker (`rerankfarm webhooks`): its own Celery app on its own queue, never on a GPU worker's time.

A job's final-state script puts the job in the due set (`rerank:webhooks:due`, score = when the next attempt is
due). The dispatcher thread of each webhook worker claims due entries (moving them a lease into the future, so a
worker that dies mid-delivery only delays the event) and sends one `rerank.deliver_webhook` task per entry. A task
reads the job, makes one attempt (`webhooks.delivery`), records it, and then removes the entry (delivered, gone,
failed) or schedules the next attempt. Long schedules live in the sorted set, not in Celery countdowns (a countdown
message is held unacked by one worker for its whole wait).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import threading
import time
from datetime import UTC, datetime
from urllib.parse import urlsplit

import redis
from celery import Celery, signals
from prometheus_client import start_http_server

from schemas import keys, metrics
from schemas.errors import JobNotFound
from schemas.settings import Settings, get_settings
from schemas.webhooks import WebhookAttempt, WebhookState, event_payload
from store import job_state, redis_memory
from store.connect import redis_client
from store.job_state import JobRecord
from store.queueing import celery_config, worker_argv
from store.results import read_results
from webhooks import delivery
from workers.lease import keep_leases

logger = logging.getLogger(__name__)

ATTEMPTS_KEPT = 50

app = Celery("rerankfarm-webhooks")
app.conf.update(celery_config(get_settings()))
keep_leases(app)

# KEYS: due set. ARGV: now, lease until, max entries. Claims what is due by moving it to the lease's end.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return due
"""


def build_body(client: redis.Redis, settings: Settings, record: JobRecord, event: str, at: str) -> str:
    """The event's JSON: the job, a link to its results, and the results themselves for small succeeded jobs."""
    job = record.to_job().model_dump(mode="json")
    base = (settings.public_url or settings.api_url).rstrip("/")
    results = None
    if event == "job.succeeded" and record.total <= settings.webhook_inline_results_max_pairs:
        with contextlib.suppress(JobNotFound):  # expired: the link alone
            results = [r.model_dump(mode="json", exclude_none=True) for r in read_results(client, record)]
    payload = event_payload(event, job, f"{base}/v1/jobs/{record.id}/results", results, at)
    return json.dumps(payload, separators=(",", ":"))


def deliver(client: redis.Redis, settings: Settings, job_id: str) -> str:
    """One delivery attempt for the job's pending event; returns the webhook state afterwards."""
    run = job_state.Runner(client)
    view = run(job_state.read(job_id))
    record = view.record if view is not None else None
    if record is None or record.webhook_state != WebhookState.pending or not record.webhook_url:
        client.zrem(keys.WEBHOOKS_DUE, job_id)
        return (record.webhook_state or "none") if record else "none"
    if settings.webhook_secret is None:
        raise RuntimeError("RERANK_WEBHOOK_SECRET is not set: webhook events cannot be signed")
    event, url = record.webhook_event, record.webhook_url
    number = record.webhook_attempt + 1
    now = datetime.now(UTC)
    body = build_body(client, settings, record, event, now.isoformat())
    result = delivery.attempt(
        url,
        delivery.message_id(job_id, event),
        body,
        settings.webhook_secret.get_secret_value(),
        now,
        settings.webhook_allowlist,
        settings.webhook_timeout_s,
    )
    state, due = delivery.next_state(result, number, settings.retry_delays())
    entry = WebhookAttempt(
        attempt=number,
        at=now.isoformat(),
        status_code=result.status_code,
        error=result.error,
        duration_ms=result.duration_ms,
    )
    run(job_state.webhook_attempt(job_id, entry, state, due, ATTEMPTS_KEPT, settings.result_ttl_s))
    metrics.WEBHOOK_DELIVERIES.labels(state.value).inc()
    logger.info(
        "job %s %s: webhook attempt %d to %s: %s -> %s",
        job_id,
        event,
        number,
        urlsplit(url).hostname,
        result.status_code if result.status_code is not None else result.error,
        state.value,
    )
    return state.value


_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis_client(get_settings().redis_url, health_check_interval=30, socket_timeout=30)
    return _client


@app.task(name=keys.TASK_DELIVER_WEBHOOK, ignore_result=True)
def deliver_webhook(job_id: str) -> str:
    return deliver(_redis(), get_settings(), job_id)


class Dispatcher:
    """Sends a delivery task for every due entry of the due set."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = redis_client(settings.redis_url, socket_timeout=30)
        self._claim = self.client.register_script(_CLAIM)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="webhook-dispatcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def dispatch_once(self) -> int:
        now = time.time()
        due = self._claim(keys=[keys.WEBHOOKS_DUE], args=[now, now + self.settings.webhook_lease_s, 100])
        for job_id in due:
            app.send_task(keys.TASK_DELIVER_WEBHOOK, args=[job_id.decode()], queue=keys.QUEUE_WEBHOOKS)
        return len(due)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.dispatch_once()
            except Exception as exc:  # Redis away or full, the broker refusing: due entries wait for the next look
                logger.warning("webhook dispatch failed: %r", exc)
            self._stop.wait(self.settings.webhook_dispatch_interval_s)


_dispatcher: Dispatcher | None = None


@signals.worker_ready.connect
def _start_dispatcher(**_: object) -> None:
    """Only the webhook worker imports this module, so only it dispatches."""
    global _dispatcher
    if _dispatcher is None:
        _dispatcher = Dispatcher(get_settings())
        _dispatcher.start()


@signals.worker_shutdown.connect
def _stop_dispatcher(**_: object) -> None:
    if _dispatcher is not None:
        _dispatcher.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rerankfarm webhooks", description=__doc__)
    parser.add_argument("--concurrency", type=int, default=8, help="deliveries in flight")
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    try:
        redis_memory.check_at_start(_redis(), settings.redis_allow_eviction, "rerankfarm webhooks")
    except redis_memory.EvictingRedis as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2
    if settings.webhook_secret is None:
        logger.warning("RERANK_WEBHOOK_SECRET is not set: no webhook can be signed until it is")
    if settings.webhook_metrics_port:
        try:  # metrics must not stop the work: a port in use is logged
            start_http_server(settings.webhook_metrics_port)
        except OSError as exc:
            logger.warning("webhooks: no /metrics on port %d: %s", settings.webhook_metrics_port, exc)
    app.worker_main(worker_argv("webhooks@%h", [keys.QUEUE_WEBHOOKS], args.concurrency, args.loglevel, False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
