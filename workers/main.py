"""One worker process: load the engine, then consume chunks with Celery.

Pool: `threads` (`store.queueing.worker_argv` says why). Several chunks are in flight at once (`--concurrency`),
each submits its prompts to the engine, whose own scheduler batches the pairs of every chunk in flight.
"""

from __future__ import annotations

import argparse
import logging
import sys

from celery import signals
from prometheus_client import start_http_server

from schemas.errors import EngineLoadError
from schemas.keys import bulk_queue
from schemas.settings import get_settings
from store import redis_memory
from store.connect import redis_client
from store.queueing import worker_argv
from workers import runtime
from workers.launcher import guard_group
from workers.recovery import Recovery

logger = logging.getLogger("workers")
JSON_FIELDS = "%(created)f %(levelname)s %(name)s %(message)s"  # RERANK_LOG_FORMAT=json: each line's fields
_heartbeat: runtime.Heartbeat | None = None
_recovery: Recovery | None = None


@signals.worker_ready.connect
def _on_ready(sender: object = None, **_: object) -> None:
    global _heartbeat, _recovery
    from workers.celery_app import app

    hostname = getattr(sender, "hostname", "unknown")
    rt = runtime.get()
    _heartbeat = runtime.Heartbeat(rt, hostname)
    _heartbeat.start()
    _recovery = Recovery(rt.settings, app, rt.redis)
    _recovery.start()
    logger.info("worker %s consuming", hostname)


@signals.after_setup_logger.connect
def _log_format(logger: logging.Logger, **_: object) -> None:
    """RERANK_LOG_FORMAT=json: Celery's handlers (it sets up the root logger) write JSON lines."""
    if get_settings().log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        for handler in logger.handlers:
            handler.setFormatter(JsonFormatter(JSON_FIELDS))


@signals.worker_shutdown.connect
def _on_shutdown(**_: object) -> None:
    if _recovery is not None:
        _recovery.stop()
    if _heartbeat is not None:
        _heartbeat.stop()
    runtime.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.main", description=__doc__)
    parser.add_argument("--name", default="cpu", help="node name; the Celery hostname is NAME@host")
    parser.add_argument("--concurrency", type=int, default=None, help="chunks in flight (RERANK_WORKER_CONCURRENCY)")
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument("--metrics-port", type=int, default=0, help="serve /metrics on this port (0: off)")
    args = parser.parse_args(argv)
    guard_group()  # before any thread: the worker's engine processes end with it
    logging.basicConfig(level=args.loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    logger.info(
        "worker %s: redis=%s model=%s (%s)",
        args.name,
        settings.redacted_redis_url(),
        settings.served_name,
        settings.model,
    )
    try:
        with redis_client(settings.redis_url, socket_timeout=10) as client:
            redis_memory.check_at_start(client, settings.redis_allow_eviction, f"rerankfarm worker {args.name}")
    except redis_memory.EvictingRedis as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 2
    try:
        runtime.start(settings)
    except EngineLoadError as exc:
        print(f"rerankfarm worker {args.name}: cannot start: {exc.message}", file=sys.stderr)
        return 2
    if args.metrics_port:
        try:  # metrics must not stop the work: a port in use is logged
            start_http_server(args.metrics_port)
        except OSError as exc:
            logger.warning("worker %s: no /metrics on port %d: %s", args.name, args.metrics_port, exc)
    from workers.celery_app import app
    from workers.interactive import consume_interactive

    concurrency = args.concurrency or settings.worker_concurrency
    # Celery's pool takes bulk chunks; interactive chunks have a consumer of their own (workers.interactive).
    consume_interactive(app)
    queues = [bulk_queue(settings.served_name)]  # this worker's model's
    app.worker_main(worker_argv(f"{args.name}@%h", queues, concurrency, args.loglevel, task_events=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
