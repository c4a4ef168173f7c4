from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import StoreDep, get_tenant
from schemas import metrics
from store import redis_memory

router = APIRouter(include_in_schema=False)


@router.get("/metrics")
async def prometheus_metrics(request: Request, store: StoreDep) -> Response:
    """Prometheus metrics of this API process, with queue depths, backlogs and live workers read from Redis now."""
    settings = request.app.state.settings
    if not settings.metrics_public:
        await get_tenant(request)
    for (queue, model), depth in (await store.queue_depths()).items():
        metrics.QUEUE_DEPTH.labels(queue, model).set(depth)
    metrics.BACKLOG_CHUNKS.clear()  # tenants with nothing waiting drop out
    metrics.BACKLOG_PAIRS.clear()
    for model, waiting in (await store.backlogs()).items():
        for tenant, (chunks, pairs) in waiting.tenants.items():
            if chunks:
                metrics.BACKLOG_CHUNKS.labels(model, tenant).set(chunks)
                metrics.BACKLOG_PAIRS.labels(model, tenant).set(pairs)
    metrics.WORKERS_ALIVE.set(len(await store.live_workers()))
    redis_memory.export(await redis_memory.aread_memory(store.redis))
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
