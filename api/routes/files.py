"""Files, as the OpenAI SDK uploads and reads them: batch input in, batch output out."""

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Form, Query, Response, UploadFile
from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool

from api.batch_store import batch_of_output
from api.deps import BatchesDep, FilesDep, IdempotencyDep, IdempotencyKey, TenantDep, replayed
from schemas.batches import FileDeleted, FileList, FileObject
from schemas.jobs import ErrorResponse
from store.idempotency import content_hash

router = APIRouter(prefix="/v1/files", tags=["batches"])
_errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 422)}


@router.post("", responses=_errors)
async def upload_file(
    file: UploadFile,
    purpose: Annotated[str, Form()],
    files: FilesDep,
    tenant: TenantDep,
    response: Response,
    idempotency: IdempotencyDep,
    idempotency_key: IdempotencyKey = None,
) -> FileObject:
    """Upload a JSONL file of batch requests (multipart: `purpose=batch`, `file`); up to RERANK_MAX_FILE_BYTES,
    streamed to disk. A retry with the same `Idempotency-Key` and the same file answers the file stored first."""
    filename = file.filename or "upload.jsonl"
    body = ""
    if idempotency_key is not None:  # the retry's file must be the same bytes
        body = f"{purpose}\0{filename}\0{await anyio.to_thread.run_sync(content_hash, file.file)}"
    stored, again = await idempotency.once(
        tenant,
        "files",
        idempotency_key,
        body,
        create=lambda _: files.save(tenant, filename, purpose, file.file),
        replay=lambda file_id: files.get(file_id, tenant),
        resource_id=lambda record: record.id,
    )
    if again:
        replayed(response)
    return stored


@router.get("", responses=_errors)
async def list_files(
    files: FilesDep,
    tenant: TenantDep,
    limit: int = Query(20, ge=1, le=10_000),
    after: str | None = Query(None, description="A file id: list the files uploaded before it."),
) -> FileList:
    """The tenant's uploaded files, newest first."""
    data, more = await files.recent(tenant, limit, after)
    return FileList.of(data, more)


@router.get("/{file_id}", responses=_errors)
async def get_file(file_id: str, files: FilesDep, batches: BatchesDep, tenant: TenantDep) -> FileObject:
    """An uploaded file's record, or a batch's output file."""
    if batch_of_output(file_id) is not None:
        return await batches.output_file(file_id, tenant)
    return await files.get(file_id, tenant)


@router.get(
    "/{file_id}/content",
    responses={**_errors, 200: {"content": {"application/jsonl": {}}, "description": "The file's lines"}},
    response_class=StreamingResponse,
)
async def file_content(file_id: str, files: FilesDep, batches: BatchesDep, tenant: TenantDep) -> StreamingResponse:
    """The file's bytes: an upload as it was sent; a batch's output one JSON line per input line, in input order
    (409 until the batch has completed)."""
    if batch_of_output(file_id) is not None:
        return StreamingResponse(await batches.output(file_id, tenant), media_type="application/jsonl")
    lines = await files.lines(file_id, tenant)
    return StreamingResponse(iterate_in_threadpool(lines), media_type="application/jsonl")


@router.delete("/{file_id}", responses=_errors)
async def delete_file(file_id: str, files: FilesDep, tenant: TenantDep) -> FileDeleted:
    """Delete an uploaded file (batches already created from it are not affected)."""
    await files.delete(file_id, tenant)
    return FileDeleted(id=file_id)
