"""How the farm's values read and write in Redis, for every store module: replies as text (clients may or may not
decode responses), hashes as dicts of text, time stamps as ISO 8601 in UTC."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any


def now_iso() -> str:
    """The time stamps of records (jobs, batches, keys, heartbeats): ISO 8601, UTC."""
    return datetime.now(UTC).isoformat()


def as_str(value: object) -> str:
    """A Redis reply as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_hash(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {as_str(k): as_str(v) for k, v in raw.items()}
