from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import StoreDep
from store import redis_memory

router = APIRouter(tags=["health"])


@router.get("/healthz")
@router.get("/health", include_in_schema=False)  # TEI's and vLLM's path
async def healthz() -> dict[str, str]:
    """The API process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Redis unreachable or evicting, or no worker alive"}})
async def readyz(store: StoreDep) -> JSONResponse:
    """Ready when Redis answers, cannot evict the farm's keys (`maxmemory-policy noeviction`, or no maxmemory) and at
    least one worker is alive (its heartbeat is fresh)."""
    try:
        await store.redis.ping()
        memory = await redis_memory.aread_memory(store.redis)
        workers = await store.live_workers()
    except Exception as exc:  # any Redis failure means not ready
        return JSONResponse({"status": "unavailable", "reason": f"redis unreachable: {exc.__class__.__name__}"}, 503)
    problem = memory.policy_problem()
    if problem is not None and not store.settings.redis_allow_eviction:
        return JSONResponse({"status": "unavailable", "reason": problem}, 503)
    if not workers:
        return JSONResponse({"status": "unavailable", "reason": "no worker alive", "workers": []}, 503)
    engines = {w["hostname"]: f"{w.get('engine')} on {w.get('device')}" for w in workers}
    return JSONResponse({"status": "ready", "workers": [w["hostname"] for w in workers], "engines": engines})
