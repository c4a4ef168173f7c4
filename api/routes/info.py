from importlib.metadata import version

from fastapi import APIRouter
from pydantic import BaseModel

from api.deps import SettingsDep
from api.shapes import TeiInfo
from workers.models.qwen3_reranker import DEFAULT_INSTRUCTION

router = APIRouter(tags=["info"])


class Info(BaseModel):
    model: str
    default_instruction: str
    max_documents_per_rerank: int
    max_documents_per_request: int
    max_pairs_per_job: int
    interactive_timeout_s: float


@router.get("/v1/info")
async def info(settings: SettingsDep) -> Info:
    """What this farm serves: model, default instruction and limits."""
    return Info(
        model=settings.model,
        default_instruction=DEFAULT_INSTRUCTION,
        max_documents_per_rerank=settings.max_documents_per_rerank,
        max_documents_per_request=settings.max_documents_per_request,
        max_pairs_per_job=settings.max_pairs_per_job,
        interactive_timeout_s=settings.interactive_timeout_s,
    )


@router.get("/info")
async def tei_info(settings: SettingsDep) -> TeiInfo:
    """What this farm serves, in text-embeddings-inference's shape: a reranker (Dify reads `model_type`)."""
    return TeiInfo(
        model_id=settings.model,
        max_concurrent_requests=settings.max_jobs_in_flight_per_tenant,
        max_input_length=settings.max_length,
        max_batch_tokens=settings.max_batch_tokens,
        max_client_batch_size=settings.max_documents_per_rerank,
        version=version("rerankfarm"),
        model_dtype=settings.dtype,
    )


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "rerankfarm"


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


@router.get("/v1/models")
async def models(settings: SettingsDep) -> ModelList:
    """The one model this farm serves, as OpenAI-compatible clients list models (vLLM serves the same)."""
    return ModelList(data=[ModelCard(id=settings.model)])
