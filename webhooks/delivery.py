"""One webhook delivery attempt, as plain code: check the URL, sign the body (Standard Webhooks, one signature per
live secret of the tenant), POST it to the checked address without following redirects, and classify the answer
into the webhook's next state and its destination's health. No Redis: `webhooks.worker` reads the job, calls
`attempt`, and records what `next_state` and `outcome` say."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from standardwebhooks import Webhook

from schemas.webhooks import WebhookState
from store.webhook_queue import Outcome
from webhooks.ssrf import UnresolvableHost, UnsafeURL, resolve_checked


def message_id(job_id: str, event: str) -> str:
    """The webhook-id: the same on every attempt and redelivery of one event, so receivers can de-duplicate."""
    return f"msg_{job_id}_{event.removeprefix('job.')}"


@dataclass
class Attempt:
    """What one attempt gave: the receiver's status code, or the error that kept it from answering."""

    status_code: int | None = None
    error: str | None = None
    refused: bool = False  # the URL is refused by policy: retrying cannot help
    duration_ms: float = 0.0


def pinned_request(url: str, host: str, address: str) -> tuple[str, dict[str, str], dict[str, Any]]:
    """The URL rewritten to the checked address, with the Host header and TLS name of the original host."""
    parts = urlsplit(url)
    ip = f"[{address}]" if ":" in address else address
    netloc = ip + (f":{parts.port}" if parts.port else "")
    headers = {"host": parts.netloc.rsplit("@", 1)[-1]}
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    return urlunsplit(parts._replace(netloc=netloc)), headers, extensions


def sign(msg_id: str, at: datetime, body: str, secrets: Sequence[str]) -> str:
    """The `webhook-signature` header: one `v1,<base64>` per secret, space-separated (Standard Webhooks), so that a
    receiver still on the old secret verifies during a rotation's overlap."""
    return " ".join(Webhook(secret).sign(msg_id, at, body) for secret in secrets)


async def attempt(
    url: str,
    msg_id: str,
    body: str,
    secrets: Sequence[str],
    at: datetime,
    allowlist: str,
    timeout_s: float,
    connect_timeout_s: float,
) -> Attempt:
    """Send the signed body once. `timeout_s` bounds the whole attempt (name lookup, connect, send, the answer's
    status line and headers; its body is not read), `connect_timeout_s` the connection alone."""
    started = time.perf_counter()
    result = Attempt()
    try:
        async with asyncio.timeout(timeout_s):
            host, addresses = await asyncio.to_thread(resolve_checked, url, allowlist)
            target, headers, extensions = pinned_request(url, host, str(addresses[0]))
            headers.update(
                {
                    "content-type": "application/json",
                    "webhook-id": msg_id,
                    "webhook-timestamp": str(int(at.timestamp())),
                    "webhook-signature": sign(msg_id, at, body, secrets),
                    "user-agent": "rerankfarm-webhooks",
                }
            )
            timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
            async with (
                httpx.AsyncClient(timeout=timeout, follow_redirects=False) as http,
                http.stream("POST", target, content=body.encode(), headers=headers, extensions=extensions) as answer,
            ):
                result.status_code = answer.status_code
    except TimeoutError:
        result.error = f"no answer within {timeout_s:g}s"
    except UnresolvableHost as exc:  # may resolve later: retried
        result.error = str(exc)
    except UnsafeURL as exc:
        result.error, result.refused = str(exc), True
    except httpx.HTTPError as exc:
        result.error = f"{exc.__class__.__name__}: {exc}"[:500]
    result.duration_ms = round((time.perf_counter() - started) * 1000, 1)
    return result


def outcome(result: Attempt) -> Outcome:
    """What the attempt says of its destination, for the circuit breaker: it answered (2xx or 410), it failed, or
    nothing (refused by policy before any request)."""
    code = result.status_code
    if code is not None and (200 <= code < 300 or code == 410):
        return Outcome.ok
    return Outcome.none if result.refused else Outcome.failed


def next_state(result: Attempt, attempt_number: int, delays: list[float]) -> tuple[WebhookState, float | None]:
    """The webhook's state after attempt `attempt_number` (from 1), and when the next attempt is due (unix time):
    2xx delivered; 410 gone (no more attempts); refused by policy or out of delays: failed; else pending, after the
    next delay with +-10% jitter."""
    code = result.status_code
    if code is not None and 200 <= code < 300:
        return WebhookState.delivered, None
    if code == 410:
        return WebhookState.gone, None
    if result.refused or attempt_number - 1 >= len(delays):
        return WebhookState.failed, None
    return WebhookState.pending, time.time() + delays[attempt_number - 1] * random.uniform(0.9, 1.1)
