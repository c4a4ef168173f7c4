"""Webhook delivery, on its own queue and its own worker (`rerankfarm webhooks`), never on a GPU worker's time.

A job's final-state script puts the job in the due set (`rerank:webhooks:due`, score = when the next attempt is
due). The dispatcher thread of each webhook worker claims due entries (moving them a lease into the future, so a
worker that dies mid-delivery only delays the event) and sends one `rerank.deliver_webhook` task per entry. A task
makes one attempt: check the URL again (DNS may have changed), sign with Standard Webhooks (the webhook-id is the
same on every attempt, so receivers can de-duplicate), POST to the checked address without following redirects,
record the attempt, and then remove the entry (2xx: delivered; 410: gone) or schedule the next attempt from
RERANK_WEBHOOK_RETRY_DELAYS with +-10% jitter (no attempt left: failed). Long schedules live in the sorted set,
not in Celery countdowns, which loop on Redis when they outlast the visibility timeout.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import redis
from celery import signals
from standardwebhooks import Webhook

from schemas import keys
from schemas.jobs import assemble_results, decode_record, job_from_record
from schemas.settings import Settings, get_settings
from schemas.webhooks import UnresolvableHost, UnsafeURL, WebhookState, event_payload, resolve_checked
from workers.celery_app import app

logger = logging.getLogger(__name__)

ATTEMPTS_KEPT = 50

# KEYS: due set. ARGV: now, lease until, max entries. Claims what is due by moving it to the lease's end.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return due
"""


def message_id(job_id: str, event: str) -> str:
    return f"msg_{job_id}_{event.removeprefix('job.')}"


def build_body(client: redis.Redis, settings: Settings, record: dict[str, str], event: str, at: str) -> str:
    job = job_from_record(record, {}).model_dump(mode="json")
    base = (settings.public_url or settings.api_url).rstrip("/")
    results = None
    if event == "job.succeeded" and int(record["total"]) <= settings.webhook_inline_results_max_pairs:
        job_id = record["id"]
        raw_input = client.get(keys.job_input_key(job_id))
        raw_chunks = client.hgetall(keys.job_scores_key(job_id))
        if raw_input is not None and len(raw_chunks) == int(record["chunks_total"]):
            results = assemble_results(job_id, int(record["chunks_total"]), raw_input, raw_chunks)
            results = results.model_dump(mode="json", exclude_none=True)["data"]
    payload = event_payload(event, job, f"{base}/v1/jobs/{record['id']}/results", results, at)
    return json.dumps(payload, separators=(",", ":"))


def _pinned_request(url: str, host: str, address: str) -> tuple[str, dict[str, str], dict[str, Any]]:
    """The URL rewritten to the checked address, with the Host header and TLS name of the original host."""
    parts = urlsplit(url)
    ip = f"[{address}]" if ":" in address else address
    netloc = ip + (f":{parts.port}" if parts.port else "")
    headers = {"host": parts.netloc.rsplit("@", 1)[-1]}
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    return urlunsplit(parts._replace(netloc=netloc)), headers, extensions


def deliver(client: redis.Redis, settings: Settings, job_id: str) -> str:
    """One delivery attempt for the job's pending event; returns the webhook state afterwards."""
    record = decode_record(client.hgetall(keys.job_key(job_id)))
    if not record or record.get("webhook_state") != WebhookState.pending or not record.get("webhook_url"):
        client.zrem(keys.WEBHOOKS_DUE, job_id)
        return record.get("webhook_state", "none") if record else "none"
    if settings.webhook_secret is None:
        raise RuntimeError("RERANK_WEBHOOK_SECRET is not set: webhook events cannot be signed")
    event, url = record["webhook_event"], record["webhook_url"]
    attempt = int(record.get("webhook_attempt", 0)) + 1
    now = datetime.now(UTC)
    entry: dict[str, Any] = {"attempt": attempt, "at": now.isoformat(), "status_code": None, "error": None}
    started = time.perf_counter()
    try:
        host, addresses = resolve_checked(url, settings.webhook_allowlist)
        body = build_body(client, settings, record, event, now.isoformat())
        msg_id = message_id(job_id, event)
        signature = Webhook(settings.webhook_secret.get_secret_value()).sign(msg_id, now, body)
        target, headers, extensions = _pinned_request(url, host, str(addresses[0]))
        headers.update(
            {
                "content-type": "application/json",
                "webhook-id": msg_id,
                "webhook-timestamp": str(int(now.timestamp())),
                "webhook-signature": signature,
                "user-agent": "rerankfarm-webhooks",
            }
        )
        with httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False) as http:
            response = http.post(target, content=body.encode(), headers=headers, extensions=extensions)
        entry["status_code"] = response.status_code
    except UnresolvableHost as exc:
        entry["error"] = str(exc)
    except UnsafeURL as exc:  # refused by policy: retrying cannot help
        entry["error"], entry["refused"] = str(exc), True
    except httpx.HTTPError as exc:
        entry["error"] = f"{exc.__class__.__name__}: {exc}"[:500]
    entry["duration_ms"] = round((time.perf_counter() - started) * 1000, 1)

    code = entry["status_code"]
    delays = settings.retry_delays()
    if code is not None and 200 <= code < 300:
        state, due = WebhookState.delivered, None
    elif code == 410:
        state, due = WebhookState.gone, None
    elif entry.pop("refused", False):
        state, due = WebhookState.failed, None
    elif attempt - 1 < len(delays):
        state, due = WebhookState.pending, time.time() + delays[attempt - 1] * random.uniform(0.9, 1.1)
    else:
        state, due = WebhookState.failed, None
    with client.pipeline(transaction=True) as pipe:
        pipe.rpush(keys.job_webhook_attempts_key(job_id), json.dumps(entry))
        pipe.ltrim(keys.job_webhook_attempts_key(job_id), -ATTEMPTS_KEPT, -1)
        pipe.expire(keys.job_webhook_attempts_key(job_id), settings.result_ttl_s)
        pipe.hset(keys.job_key(job_id), mapping={"webhook_state": state.value, "webhook_attempt": attempt})
        if due is None:
            pipe.zrem(keys.WEBHOOKS_DUE, job_id)
        else:
            pipe.zadd(keys.WEBHOOKS_DUE, {job_id: due})
        pipe.execute()
    logger.info(
        "job %s %s: webhook attempt %d to %s: %s -> %s",
        job_id,
        event,
        attempt,
        urlsplit(url).hostname,
        code if code is not None else entry["error"],
        state.value,
    )
    return state.value


_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(get_settings().redis_url, health_check_interval=30, socket_timeout=30)
    return _client


@app.task(name=keys.TASK_DELIVER_WEBHOOK, ignore_result=True)
def deliver_webhook(job_id: str) -> str:
    return deliver(_redis(), get_settings(), job_id)


class Dispatcher:
    """Sends a delivery task for every due entry of the due set."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = redis.Redis.from_url(settings.redis_url, socket_timeout=30)
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
            except redis.RedisError as exc:
                logger.warning("webhook dispatch failed: %r", exc)
            self._stop.wait(self.settings.webhook_dispatch_interval_s)


_dispatcher: Dispatcher | None = None


@signals.worker_ready.connect
def _start_dispatcher(sender: object = None, **_: object) -> None:
    global _dispatcher
    if _dispatcher is None and getattr(app, "_rerank_webhook_worker", False):
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
    if settings.webhook_secret is None:
        logger.warning("RERANK_WEBHOOK_SECRET is not set: no webhook can be signed until it is")
    app._rerank_webhook_worker = True  # the dispatcher runs in webhook workers only
    if settings.webhook_metrics_port:
        from prometheus_client import start_http_server

        try:
            start_http_server(settings.webhook_metrics_port)
        except OSError as exc:  # metrics must never keep webhooks from being delivered
            logger.warning("webhooks: no /metrics on port %d: %s", settings.webhook_metrics_port, exc)
    app.worker_main(
        [
            "worker",
            "--pool",
            "threads",
            "--concurrency",
            str(args.concurrency),
            "--hostname",
            "webhooks@%h",
            "--queues",
            keys.QUEUE_WEBHOOKS,
            "--loglevel",
            args.loglevel,
            "--without-mingle",
            "--without-gossip",
        ]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
