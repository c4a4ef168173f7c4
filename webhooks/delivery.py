"""One webhook delivery attempt, as plain code: check the URL, sign the body (Standard Webhooks), POST it to the checked
address without following redirects, and classify the answer into the webhook's next state. No Redis, no Celery:
`webhooks.worker` reads the job, calls `attempt`, and records what `next_state` says."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from standardwebhooks import Webhook

from schemas.webhooks import WebhookState
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


def attempt(url: str, msg_id: str, body: str, secret: str, at: datetime, allowlist: str, timeout_s: float) -> Attempt:
    """Send the signed body once."""
    started = time.perf_counter()
    result = Attempt()
    try:
        host, addresses = resolve_checked(url, allowlist)
        target, headers, extensions = pinned_request(url, host, str(addresses[0]))
        headers.update(
            {
                "content-type": "application/json",
                "webhook-id": msg_id,
                "webhook-timestamp": str(int(at.timestamp())),
                "webhook-signature": Webhook(secret).sign(msg_id, at, body),
                "user-agent": "rerankfarm-webhooks",
            }
        )
        with httpx.Client(timeout=timeout_s, follow_redirects=False) as http:
            response = http.post(target, content=body.encode(), headers=headers, extensions=extensions)
        result.status_code = response.status_code
    except UnresolvableHost as exc:  # may resolve later: retried
        result.error = str(exc)
    except UnsafeURL as exc:
        result.error, result.refused = str(exc), True
    except httpx.HTTPError as exc:
        result.error = f"{exc.__class__.__name__}: {exc}"[:500]
    result.duration_ms = round((time.perf_counter() - started) * 1000, 1)
    return result


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
