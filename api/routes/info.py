from importlib.metadata import version

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import SettingsDep, StoreDep
from api.shapes import TeiInfo
from workers.models.qwen3_reranker import DEFAULT_INSTRUCTION

router = APIRouter(tags=["info"])


class ServedModelInfo(BaseModel):
    name: str
    live: bool = Field(description="A worker of it is alive now; false: restarting (or, the default, not up yet).")
    aliases: list[str] = Field(default_factory=list, description="Other names that reach it (RERANK_MODEL_ALIASES).")


class Info(BaseModel):
    model: str = Field(description="The default model: requests that name none go to it.")
    models: list[ServedModelInfo] = Field(description="Every model served: the default, then those of live workers.")
    default_instruction: str
    max_documents_per_rerank: int
    max_documents_per_request: int
    max_pairs_per_job: int
    interactive_timeout_s: float


async def _served(store: StoreDep, settings: SettingsDep) -> list[ServedModelInfo]:
    served = await store.models.served()
    aliases = settings.model_aliases
    return [
        ServedModelInfo(name=m.name, live=m.live, aliases=sorted(a for a, n in aliases.items() if n == m.name))
        for m in served
    ]


@router.get("/v1/info")
async def info(store: StoreDep, settings: SettingsDep) -> Info:
    """What this farm serves: its models, the default instruction (Qwen3-Reranker) and limits."""
    return Info(
        model=settings.default_served,
        models=await _served(store, settings),
        default_instruction=DEFAULT_INSTRUCTION,
        max_documents_per_rerank=settings.max_documents_per_rerank,
        max_documents_per_request=settings.max_documents_per_request,
        max_pairs_per_job=settings.max_pairs_per_job,
        interactive_timeout_s=settings.interactive_timeout_s,
    )


@router.get("/info")
async def tei_info(settings: SettingsDep) -> TeiInfo:
    """What this farm serves, in text-embeddings-inference's shape (one model: TEI's calls name none, so the
    default): a reranker (Dify reads `model_type`)."""
    return TeiInfo(
        model_id=settings.default_served,
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
async def models(store: StoreDep) -> ModelList:
    """The models this farm serves, as OpenAI-compatible clients list them: the default first, then those of live
    workers (and of workers restarting, for RERANK_MODEL_GRACE_S)."""
    return ModelList(data=[ModelCard(id=m.name) for m in await store.models.served()])
