from importlib.metadata import version

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import SettingsDep, StoreDep
from api.shapes import TeiInfo

router = APIRouter(tags=["info"])


class ServedModelInfo(BaseModel):
    name: str
    live: bool = Field(description="A worker of it is alive now; false: restarting (or, the default, not up yet).")
    aliases: list[str] = Field(default_factory=list, description="Other names that reach it (RERANK_MODEL_ALIASES).")
    instruction: str | None = Field(
        None,
        description="The instruction its pairs get when a request names none, as its live workers announce it; "
        "null for a model that takes no instruction (a cross-encoder) or while none of its workers is alive.",
    )


class Info(BaseModel):
    model: str = Field(description="The default model: requests that name none go to it.")
    models: list[ServedModelInfo] = Field(description="Every model served: the default, then those of live workers.")
    default_instruction: str | None = Field(description="The default model's `instruction` (see `models`).")
    max_documents_per_rerank: int
    max_documents_per_request: int
    max_pairs_per_job: int
    interactive_timeout_s: float


async def _served(store: StoreDep, settings: SettingsDep) -> list[ServedModelInfo]:
    served = await store.models.served()
    aliases = settings.model_aliases
    instructions = {w.get("model"): w.get("instruction") for w in await store.live_workers()}
    return [
        ServedModelInfo(
            name=m.name,
            live=m.live,
            aliases=sorted(a for a, n in aliases.items() if n == m.name),
            instruction=instructions.get(m.name),
        )
        for m in served
    ]


@router.get("/v1/info")
async def info(store: StoreDep, settings: SettingsDep) -> Info:
    """What this farm serves: its models (each with its instruction, learnt from its workers) and limits."""
    served = await _served(store, settings)
    return Info(
        model=settings.default_served,
        models=served,
        default_instruction=served[0].instruction,
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
