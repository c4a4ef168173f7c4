from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import StoreDep
from schemas.errors import Unavailable
from schemas.jobs import ErrorResponse
from store import redis_memory

router = APIRouter(tags=["health"])


@router.get("/healthz")
@router.get("/health", include_in_schema=False)  # TEI's and vLLM's path
async def healthz() -> dict[str, str]:
    """The API process is up."""
    return {"status": "ok"}


class Ready(BaseModel):
    status: str = "ready"
    workers: list[str] = Field(description="The live workers' hostnames.")
    engines: dict[str, str] = Field(description="Each live worker's engine and device, e.g. `vllm on cuda:0`.")


@router.get(
    "/readyz",
    responses={503: {"model": ErrorResponse, "description": "Redis unreachable or evicting, or no worker alive"}},
)
async def readyz(store: StoreDep) -> Ready:
    """Ready when Redis answers, cannot evict the farm's keys (`maxmemory-policy noeviction`, or no maxmemory) and at
    least one worker is alive (its heartbeat is fresh); else 503 `unavailable` with the reason, through the error
    table."""
    try:
        await store.redis.ping()
        memory = await redis_memory.aread_memory(store.redis)
        workers = await store.live_workers()
    except Exception as exc:  # any Redis failure means not ready
        raise Unavailable(f"redis unreachable: {exc.__class__.__name__}") from exc
    problem = memory.policy_problem()
    if problem is not None and not store.settings.redis_allow_eviction:
        raise Unavailable(problem)
    if not workers:
        raise Unavailable("no worker alive")
    engines = {w["hostname"]: f"{w.get('engine')} on {w.get('device')}" for w in workers}
    return Ready(workers=[w["hostname"] for w in workers], engines=engines)
