"""The tests' one way to put a job in Redis: as the API creates it, through `store.job_state.create` (its record, input
summary, chunks' inputs and its tenant's in-flight slot, in one transaction), with any record field set."""

from __future__ import annotations

import uuid
from typing import Any

from schemas import keys
from store import job_state
from store.codec import now_iso
from store.job_state import JobInput, JobRecord, NewJob


def create_job(
    client: Any,
    job_id: str | None = None,
    chunks: int = 2,
    pairs_per_chunk: int = 2,
    chunk_inputs: dict[int, str] | None = None,
    ttl_s: int = 3600,
    **fields: Any,
) -> JobRecord:
    """A bulk job of `chunks` chunks of `pairs_per_chunk` pairs (priority 5, tenant "default", queued unless `fields`
    say otherwise), on a sync Redis client (fakeredis or real). No chunk is sent: tests send what they need."""
    record = JobRecord(
        id=job_id or f"job_{uuid.uuid4().hex}",
        priority=fields.pop("priority", 5),
        created_at=now_iso(),
        total=fields.pop("total", chunks * pairs_per_chunk),
        chunks_total=chunks,
        chunk_size=pairs_per_chunk,
        request_count=1,
        **fields,
    )
    with client.pipeline(transaction=True) as pipe:
        job_state.create(pipe, NewJob(record, JobInput(requests=[]).model_dump_json(), chunk_inputs or {}), ttl_s)
        if record.final:  # made as a job that ended: no in-flight slot
            pipe.srem(keys.tenant_inflight_key(record.tenant), record.id)
        pipe.execute()
    return record
