"""Uploaded files: bytes on disk under RERANK_FILES_DIR, records in Redis, each file its tenant's own.

An upload is copied to disk a block at a time (the multipart parser has already spooled it to a temporary file), so
a file of any size up to RERANK_MAX_FILE_BYTES passes through the API in constant memory. Files expire after
RERANK_FILE_TTL_S; the bytes of expired files are deleted on the next upload.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import anyio
import redis.asyncio as aioredis

from api.pagination import newest_first
from schemas import keys
from schemas.batches import FileObject
from schemas.errors import FileNotFound, InvalidRequest
from schemas.settings import Settings
from store.codec import as_str, decode_hash

logger = logging.getLogger(__name__)

BLOCK = 1 << 20  # bytes copied per step
FILE_ID_PREFIX = "file-"


class FileStore:
    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self.redis = client
        self.directory = settings.files_dir
        self.ttl_s = settings.file_ttl_s

    def path(self, file_id: str) -> Path:
        return self.directory / file_id

    async def save(self, tenant: str, filename: str, purpose: str, source: BinaryIO) -> FileObject:
        if purpose != "batch":
            raise InvalidRequest(f"purpose {purpose!r} is not served here: files are batch input (purpose `batch`)")
        await self._delete_expired()
        file_id = f"{FILE_ID_PREFIX}{uuid.uuid4().hex}"
        size = await anyio.to_thread.run_sync(self._write, file_id, source)
        if size == 0:
            self.path(file_id).unlink(missing_ok=True)
            raise InvalidRequest("the file is empty")
        now = int(time.time())
        record = FileObject(
            id=file_id, bytes=size, created_at=now, filename=filename, purpose=purpose, expires_at=now + self.ttl_s
        )
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.file_key(file_id), mapping={"tenant": tenant, "json": record.model_dump_json()})
            pipe.expire(keys.file_key(file_id), self.ttl_s)
            pipe.zadd(keys.tenant_files_key(tenant), {file_id: now})
            pipe.zadd(keys.FILES_EXPIRY, {file_id: now + self.ttl_s})
            await pipe.execute()
        logger.info("file %s stored: %d bytes, purpose %s", file_id, size, purpose)
        return record

    def _write(self, file_id: str, source: BinaryIO) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.path(file_id).with_suffix(".part")
        with partial.open("wb") as out:
            shutil.copyfileobj(source, out, BLOCK)
            size = out.tell()
        partial.rename(self.path(file_id))
        return size

    async def get(self, file_id: str, tenant: str) -> FileObject:
        if not file_id.startswith(FILE_ID_PREFIX):
            raise FileNotFound(file_id)
        raw = decode_hash(await self.redis.hgetall(keys.file_key(file_id)))
        if not raw or raw["tenant"] != tenant:
            raise FileNotFound(file_id)
        return FileObject.model_validate_json(raw["json"])

    async def lines(self, file_id: str, tenant: str) -> Iterator[bytes]:
        """The file's lines, read from disk as they are taken (call from a thread)."""
        await self.get(file_id, tenant)
        path = self.path(file_id)
        if not path.exists():
            raise FileNotFound(file_id)

        def read() -> Iterator[bytes]:
            with path.open("rb") as f:
                yield from f

        return read()

    async def recent(self, tenant: str, limit: int, after: str | None) -> tuple[list[FileObject], bool]:
        index = keys.tenant_files_key(tenant)
        return await newest_first(self.redis, index, limit, after, lambda i: self.get(i, tenant), FileNotFound)

    async def delete(self, file_id: str, tenant: str) -> None:
        await self.get(file_id, tenant)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.file_key(file_id))
            pipe.zrem(keys.tenant_files_key(tenant), file_id)
            pipe.zrem(keys.FILES_EXPIRY, file_id)
            await pipe.execute()
        self.path(file_id).unlink(missing_ok=True)
        logger.info("file %s deleted", file_id)

    async def _delete_expired(self) -> None:
        """Delete the bytes of files whose records have expired."""
        for raw in await self.redis.zrangebyscore(keys.FILES_EXPIRY, 0, time.time()):
            file_id = as_str(raw)
            if await self.redis.zrem(keys.FILES_EXPIRY, file_id):  # one replica deletes it
                self.path(file_id).unlink(missing_ok=True)
                logger.info("file %s expired", file_id)
