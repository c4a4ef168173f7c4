from fastapi import APIRouter
from pydantic import BaseModel

from api.deps import SettingsDep
from schemas.prompt import DEFAULT_INSTRUCTION

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
