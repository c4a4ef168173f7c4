"""API keys: `rk_` + 43 random URL-safe characters, shown once; only their SHA-256 is stored.

Redis: `rerank:apikeys` hash, sha256 hex -> JSON {id, tenant, prefix, created_at}; `rerank:apikey_ids` hash,
key id -> sha256 hex (for listing and revoking by id).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import uuid
from datetime import UTC, datetime
from typing import Any

import redis

from schemas.keys import NAMESPACE

API_KEYS = f"{NAMESPACE}:apikeys"
API_KEY_IDS = f"{NAMESPACE}:apikey_ids"
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(client: redis.Redis, tenant: str) -> tuple[str, dict[str, Any]]:
    """A new key for the tenant: the key itself (to show once) and what is stored about it."""
    if not TENANT_NAME.match(tenant):
        raise ValueError("tenant names are 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
    key = "rk_" + secrets.token_urlsafe(32)
    info = {
        "id": f"key_{uuid.uuid4().hex[:12]}",
        "tenant": tenant,
        "prefix": key[:8],
        "created_at": datetime.now(UTC).isoformat(),
    }
    digest = hash_key(key)
    with client.pipeline(transaction=True) as pipe:
        pipe.hset(API_KEYS, digest, json.dumps(info))
        pipe.hset(API_KEY_IDS, info["id"], digest)
        pipe.execute()
    return key, info


def list_keys(client: redis.Redis) -> list[dict[str, Any]]:
    return sorted((json.loads(v) for v in client.hvals(API_KEYS)), key=lambda i: i["created_at"])


def revoke_key(client: redis.Redis, key_id: str) -> bool:
    digest = client.hget(API_KEY_IDS, key_id)
    if digest is None:
        return False
    with client.pipeline(transaction=True) as pipe:
        pipe.hdel(API_KEYS, digest)
        pipe.hdel(API_KEY_IDS, key_id)
        pipe.execute()
    return True
