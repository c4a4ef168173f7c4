"""Dependencies: services are created in the lifespan, kept on app.state and read through these aliases."""

import json
from typing import Annotated

from fastapi import Depends, Header, Request, Response

from api.batch_store import BatchStore
from api.file_store import FileStore
from api.job_store import JobStore
from schemas.errors import Unauthorized
from schemas.settings import Settings
from store.api_keys import API_KEYS, hash_key
from store.idempotency import REPLAYED_HEADER, Idempotency

DEFAULT_TENANT = "default"  # the one tenant when authentication is off


def get_store(request: Request) -> JobStore:
    store: JobStore = request.app.state.store
    return store


def get_files(request: Request) -> FileStore:
    files: FileStore = request.app.state.files
    return files


def get_batches(request: Request) -> BatchStore:
    batches: BatchStore = request.app.state.batches
    return batches


def get_idempotency(request: Request) -> Idempotency:
    idempotency: Idempotency = request.app.state.idempotency
    return idempotency


def replayed(response: Response) -> None:
    """Answer a retried submission: 200 (nothing new was accepted) with `Idempotent-Replayed: true`."""
    response.status_code = 200
    response.headers[REPLAYED_HEADER] = "true"


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_tenant(request: Request) -> str:
    """The caller's tenant, from `Authorization: Bearer <key>`; 401 without a valid key (unless auth is off)."""
    settings: Settings = request.app.state.settings
    if settings.auth == "off":
        return DEFAULT_TENANT
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("an API key is required: send `Authorization: Bearer <key>` (see `rerankfarm keys create`)")
    store: JobStore = request.app.state.store
    info = await store.redis.hget(API_KEYS, hash_key(token.strip()))
    if info is None:
        raise Unauthorized("invalid or revoked API key")
    tenant: str = json.loads(info)["tenant"]
    return tenant


StoreDep = Annotated[JobStore, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
TenantDep = Annotated[str, Depends(get_tenant)]
FilesDep = Annotated[FileStore, Depends(get_files)]
BatchesDep = Annotated[BatchStore, Depends(get_batches)]
IdempotencyDep = Annotated[Idempotency, Depends(get_idempotency)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="A unique key per submission (e.g. a UUID): a retry with the same key and body within "
        "RERANK_IDEMPOTENCY_TTL_S answers what the first request created (200, `Idempotent-Replayed: true`) "
        "instead of creating it again.",
    ),
]
