"""Webhook signing secrets: one set per tenant, so a tenant's receiver can tell the farm's events from another
tenant's forgeries (with one farm-wide secret, every tenant holding it could sign for the farm).

Redis: `rerank:webhooks:secrets` hash, tenant -> JSON list of the tenant's secrets, newest first, each
`{id, secret, created_at, expires_at}`. HMAC signing needs the secret itself, so the secret is what is stored (as
Svix and Stripe store theirs); it is shown once, when made, and never logged or listed. Every secret not yet expired
signs each delivery: after a rotation the old one keeps signing beside the new one for a window (`expires_at`), and
`webhook-signature` carries both signatures, as Standard Webhooks allows, so receivers switch without losing one
event.

With authentication off there is one tenant and the farm-wide RERANK_WEBHOOK_SECRET signs (`signing_secrets`).
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from schemas import keys
from schemas.settings import Settings
from store.moves import Move

MAX_KEPT = 5  # a tenant's secrets kept at once (the newest, and old ones still in their overlap window)

# KEYS: the secrets hash. ARGV: tenant, the new secret (JSON), now (unix), overlap seconds, '1' to make it only
# when the tenant has no live secret, most kept. The tenant's older secrets stop signing at now + overlap at the
# latest (sooner if their own window ends sooner); expired ones go. Returns 1 when the new secret was stored, 0 when
# the tenant had one already (only-if-none).
_ROTATE = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local now = tonumber(ARGV[3])
local old = raw and cjson.decode(raw) or {}
local live = {}
for _, s in ipairs(old) do
  if s.expires_at == nil or s.expires_at == cjson.null or tonumber(s.expires_at) > now then table.insert(live, s) end
end
if ARGV[5] == '1' and #live > 0 then return 0 end
local kept = {cjson.decode(ARGV[2])}
for _, s in ipairs(live) do
  local ends = now + tonumber(ARGV[4])
  if s.expires_at == nil or s.expires_at == cjson.null or tonumber(s.expires_at) > ends then s.expires_at = ends end
  if tonumber(s.expires_at) > now and #kept < tonumber(ARGV[6]) then table.insert(kept, s) end
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(kept))
return 1
"""


@dataclass(frozen=True)
class SigningSecret:
    id: str
    secret: str
    created_at: str
    expires_at: float | None = None  # unix time; None: signs until the next rotation

    def live(self, now: float) -> bool:
        return self.expires_at is None or self.expires_at > now

    def describe(self) -> dict[str, Any]:
        """What may be shown again: everything but the secret."""
        expires = datetime.fromtimestamp(self.expires_at, UTC).isoformat() if self.expires_at else None
        return {"id": self.id, "created_at": self.created_at, "expires_at": expires}


def new_secret() -> SigningSecret:
    """A Standard Webhooks secret: `whsec_` + base64 of 24 random bytes."""
    value = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    return SigningSecret(f"whs_{uuid.uuid4().hex[:12]}", value, datetime.now(UTC).isoformat())


def rotate(tenant: str, overlap_s: int, only_if_none: bool = False) -> tuple[SigningSecret, Move[bool]]:
    """A new secret for the tenant, and the move that stores it: the tenant's other secrets keep signing for
    `overlap_s` more seconds at most, then go. With `only_if_none`, the move stores nothing (False) when the tenant
    has a live secret already."""
    made = new_secret()
    entry = json.dumps({"id": made.id, "secret": made.secret, "created_at": made.created_at, "expires_at": None})
    args: list[str | int | float] = [tenant, entry, time.time(), overlap_s, "1" if only_if_none else "0", MAX_KEPT]
    return made, Move(_ROTATE, [keys.WEBHOOK_SECRETS], args, lambda reply: bool(int(reply)))


def parse(raw: str | bytes | None, now: float | None = None) -> list[SigningSecret]:
    """A tenant's live secrets, newest first, from its stored JSON (`HGET rerank:webhooks:secrets <tenant>`)."""
    if not raw:
        return []
    now = time.time() if now is None else now
    found = [SigningSecret(**entry) for entry in json.loads(raw)]
    return [s for s in found if s.live(now)]


def signing_secrets(settings: Settings, stored: str | bytes | None) -> list[str]:
    """The secrets that sign a tenant's delivery (all of them, one signature each): the tenant's own live ones; the
    farm-wide RERANK_WEBHOOK_SECRET when authentication is off (one tenant, no keys)."""
    if settings.auth == "off":
        return [settings.webhook_secret.get_secret_value()] if settings.webhook_secret is not None else []
    return [s.secret for s in parse(stored)]


def missing_reason(settings: Settings, tenant: str) -> str:
    """Why a job of this tenant cannot have webhooks: no secret would sign them."""
    if settings.auth == "off":
        return "this farm sends no webhooks: RERANK_WEBHOOK_SECRET is not set (authentication is off)"
    return (
        f"tenant {tenant!r} has no webhook signing secret: make one with `POST /v1/webhooks/secret/rotate` "
        "(or `rerankfarm keys webhook-secret TENANT`); it is shown once"
    )
