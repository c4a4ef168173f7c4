"""Interactive chunks on a consumer of their own, so that they never wait for a Celery slot held by a bulk chunk.

Celery's pool slots are shared by every queue a worker consumes: with its slots full of bulk chunks (each held until
scored, seconds on a busy engine), a worker takes no interactive chunk until one of them ends. This consumer step reads
the interactive queue on a channel of its own (its own prefetch, `RERANK_INTERACTIVE_SLOTS`) and runs each chunk on a
small thread pool of its own, through the same `workers.tasks.score` as the Celery task; the engine then serves its
pairs ahead of bulk pairs (INTERACTIVE_PRIORITY). Messages are Celery task messages (the API sends them with
`send_task`), acked once their scores are stored, held under the same lease as Celery's (`workers.lease`). They are not
Celery tasks on this side: Flower shows the queue (its length, through `active_queues`, extended here), not these chunks
as tasks."""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery, bootsteps
from celery.worker import control
from kombu import Consumer, Exchange, Message, Queue

from schemas import keys
from schemas.chunks import ChunkRef
from schemas.settings import get_settings
from workers import tasks
from workers.lease import held_elsewhere

logger = logging.getLogger(__name__)

STOP_WAIT_S = 30  # a stopping worker finishes the interactive chunks in hand for up to this long


def interactive_kombu_queue(model: str) -> Queue:
    """A model's interactive queue as Celery declares it for `send_task(queue=...)`: a direct exchange of the same
    name."""
    name = keys.interactive_queue(model)
    return Queue(name, Exchange(name), routing_key=name)


class InteractiveConsumer(bootsteps.ConsumerStep):
    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.slots = get_settings().interactive_slots
        self.pool = concurrent.futures.ThreadPoolExecutor(self.slots, thread_name_prefix="interactive")
        self.in_hand: set[concurrent.futures.Future[None]] = set()
        self.hostname = "unknown"
        self.hub: Any = None  # the consumer's event loop (kombu's Hub)
        self.stopping = False

    def start(self, c: Any) -> None:
        self.hostname = c.hostname
        self.hub = c.hub
        super().start(c)

    def on_event_loop(self, settle: Callable[[], None]) -> None:
        """Ack or requeue on the consumer's event loop, and wake it. kombu's Redis channel asks for the next
        messages (BRPOP) only on a turn of that loop, once the channel has room under its prefetch: settled from a
        pool thread, the loop slept on until its next timer, up to a second with a call's next chunks waiting."""
        if self.hub is None or self.stopping:  # no event loop (a green pool), or it has stopped turning: here
            settle()
            return

        def settle_on_loop() -> None:
            try:
                settle()
            except Exception as exc:  # the channel went away (worker stopping): kombu restores what was not acked
                logger.warning("interactive chunk not settled: %r", exc)

        self.hub.call_soon(settle_on_loop)

    def get_consumers(self, channel: Any) -> list[Consumer]:
        consumer = Consumer(
            channel,
            queues=[interactive_kombu_queue(get_settings().served_name)],
            callbacks=[self.on_message],
            accept=["json"],
            prefetch_count=self.slots,
        )
        return [consumer]

    def on_message(self, body: Any, message: Message) -> None:
        """On the consumer's event loop: hand the chunk to a pool thread at once."""
        held_elsewhere[str(message.delivery_tag)] = None  # its lease is renewed from now on; its chunk's once read
        future = self.pool.submit(self.run, body, message)
        self.in_hand.add(future)
        future.add_done_callback(self.in_hand.discard)

    def run(self, body: Any, message: Message) -> None:
        tag = str(message.delivery_tag)
        try:
            try:
                args, _kwargs, _embed = body  # Celery's message protocol 2
                ref = ChunkRef.model_validate(args[0])
            except (TypeError, ValueError, IndexError, KeyError):
                logger.error("interactive message dropped: not a chunk message: %.200r", body)
                message.ack()
                return
            held_elsewhere[tag] = ref
            try:
                tasks.score(ref.model_dump(), self.hostname)  # a bug fails the job there: the caller learns it
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                logger.warning("interactive chunk given back: Redis unavailable (%r)", exc)
                self.on_event_loop(message.requeue)
                return
            self.on_event_loop(message.ack)
        except Exception as exc:  # the channel went away (worker stopping): kombu restores what was not acked
            logger.warning("interactive chunk not acked: %r", exc)
        finally:
            held_elsewhere.pop(tag, None)

    def stop(self, c: Any) -> None:
        self.stopping = True  # the event loop no longer turns: chunks finishing now are settled by their thread
        concurrent.futures.wait(list(self.in_hand), timeout=STOP_WAIT_S)
        super().stop(c)

    def shutdown(self, c: Any) -> None:
        self.stopping = True
        concurrent.futures.wait(list(self.in_hand), timeout=STOP_WAIT_S)
        super().shutdown(c)
        self.pool.shutdown(wait=False)


def consume_interactive(app: Celery) -> None:
    app.steps["consumer"].add(InteractiveConsumer)


@control.inspect_command()
def active_queues(state: Any) -> list[dict[str, Any]]:
    """Celery's `active_queues` (what Flower lists and measures), with the queue this step consumes."""
    consumer = state.consumer.task_consumer
    queues = [dict(queue.as_dict(recurse=True)) for queue in consumer.queues] if consumer else []
    return [*queues, dict(interactive_kombu_queue(get_settings().served_name).as_dict(recurse=True))]
