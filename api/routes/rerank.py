"""The interactive calls' routes: Cohere, Jina, vLLM, TEI, Voyage and OpenAI-compatible clients work against them
unchanged. Thin, as vLLM's `api_router.py`: what each client sends and expects back is `api.shapes` (its
`protocol.py`), answering a call is `api.serving` (its `serving.py`)."""

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request, Response

from api import serving
from api.deps import SettingsDep, StoreDep, TenantDep
from api.shapes import (
    RerankBody,
    RerankResponse,
    ScoreCall,
    ScoreResponse,
    TeiError,
    TeiRank,
    VoyageError,
    VoyageResponse,
    shape_of,
)
from schemas.jobs import ErrorResponse

router = APIRouter(tags=["rerank"])

_error_shapes: dict[str, Any] = {
    "content": {
        "application/json": {
            "schema": {
                "anyOf": [
                    {"$ref": "#/components/schemas/ErrorResponse"},
                    {"$ref": "#/components/schemas/TeiError"},
                    {"$ref": "#/components/schemas/VoyageError"},
                ]
            }
        }
    }
}
_errors: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 502, 503, 504)
}
_shaped_errors: dict[int | str, dict[str, Any]] = {
    code: {"description": "The error, in the shape of the call", **_error_shapes}
    for code in (400, 401, 404, 413, 422, 429, 502, 503, 504)
}
# The error shapes are referenced above; listing them once as a response adds them to the schema's components.
_shaped_errors["default"] = {"model": TeiError | VoyageError, "description": "TEI and Voyage error shapes"}


async def note_shape(request: Request) -> None:
    """Record the call's shape before anything can fail, so that every error is answered in it."""
    try:
        body = await request.json()
    except ValueError:
        body = None
    request.state.shape = shape_of(request.url.path, body, request.headers)


_Body = Annotated[RerankBody, Body()]
_RerankAnswer = RerankResponse | VoyageResponse | list[TeiRank]
_rerank_route = {
    "responses": _shaped_errors,
    "response_model": _RerankAnswer,
    "dependencies": [Depends(note_shape)],
    "response_model_exclude_none": True,
}
_score_route = {
    "responses": _errors,
    "response_model": ScoreResponse,
    "dependencies": [Depends(note_shape)],
    "response_model_exclude_none": True,
}


@router.post("/v1/rerank", **_rerank_route)  # type: ignore[arg-type]
@router.post("/rerank", **_rerank_route)  # type: ignore[arg-type]
async def rerank_v1(
    request: Request, response: Response, call: _Body, store: StoreDep, settings: SettingsDep, tenant: TenantDep
) -> Any:
    """Rerank documents for one query and answer in this response: the Cohere v1, Jina and vLLM shape, the Voyage
    shape when the body has `top_k`, the TEI shape (a bare array, best first) when it has `texts`. `/rerank` is the
    root path TEI and vLLM clients call."""
    return await serving.rerank(request, response, call, store, settings, tenant, return_documents=True)


@router.post("/v2/rerank", **_rerank_route)  # type: ignore[arg-type]
async def rerank_v2(
    request: Request, response: Response, call: _Body, store: StoreDep, settings: SettingsDep, tenant: TenantDep
) -> Any:
    """Rerank, Cohere v2 shape: documents are returned only when `return_documents` is true."""
    return await serving.rerank(request, response, call, store, settings, tenant, return_documents=False)


@router.post("/v1/score", **_score_route)  # type: ignore[arg-type]
@router.post("/score", include_in_schema=False, **_score_route)  # type: ignore[arg-type]
async def score(
    request: Request, response: Response, call: ScoreCall, store: StoreDep, settings: SettingsDep, tenant: TenantDep
) -> Any:
    """vLLM's score call (also on /score): `text_1`/`text_2` (or `queries`/`documents`), one query against many
    documents or paired one to one; scores in pair order."""
    return await serving.rerank(request, response, call, store, settings, tenant, return_documents=False)
