"""Recovery of lost chunks: every scoring worker looks for what the broker lost, and a chunk is sent again once.

Every scoring worker runs a `Recovery` thread, which looks at the chunk ledger as it starts and then every
`LOOK_INTERVAL_S` seconds (`store.chunk_ledger.Ledger.find_lost`) and sends again each chunk that nobody vouched for
in two leases (`2 * RERANK_VISIBILITY_TIMEOUT_S`) and that is not waiting in its queue, through the dispatcher
(`store.dispatch`: a chunk sent RERANK_CHUNK_MAX_RETRIES + 1 times fails its job, `chunk_lost`). Each look also ends
the jobs past their deadline and feeds the model's lanes from its backlog (`store.backlog`), for lanes no take has fed.

There is no lock: the ledger's re-send is a compare-and-set on the chunk's send count, so when several workers find
the same lost chunk, one sends it and the others are told 'raced'. (A lock held by one worker at a time starved
recovery in the chaos run: with workers SIGKILLed every few seconds, the lock's holder kept dying before another
could take it, and 4 jobs of 3,000 waited for ever.) The workers' looks are spread over the interval at random.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading

import redis
from celery import Celery

from schemas.settings import Settings
from store import job_state, moves
from store.chunk_ledger import Lost
from store.dispatch import Dispatcher
from store.queueing import SWEEP_INTERVAL_S, job_lane

logger = logging.getLogger(__name__)

LOOK_INTERVAL_S = SWEEP_INTERVAL_S  # as often as kombu's sweep restores the messages whose lease ran out


class Recovery:
    def __init__(self, settings: Settings, app: Celery, client: redis.Redis) -> None:
        self.app = app
        self.client = client
        self.run = moves.Runner(client)
        self.dispatcher = Dispatcher(client, app, settings)
        self.ledger = self.dispatcher.ledger
        self.model = settings.served_name
        self.grace_s = 2.0 * settings.visibility_timeout_s
        self.period_s = float(LOOK_INTERVAL_S)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recovery", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def look_once(self, now: float | None = None) -> int:
        """One look at the ledger, at the jobs past their deadline (each ends `expired`) and at the model's backlog
        (its lanes fed). Returns how many chunks this look sent again."""
        for job in self.run(job_state.overdue(now)):
            self.run(job.expire())
        self.dispatcher.feed(self.model)  # lanes no take has fed (idle workers, a feeder that died)
        found = self.ledger.find_lost(self.grace_s, job_lane, now=now)
        sent = 0
        for lost in found.lost:
            sent += self._recover(lost)
        if found.lost or found.closed:
            logger.info(
                "recovery: %d lost chunk(s), %d sent again, %d waiting in their queue, %d closed",
                len(found.lost),
                sent,
                found.waiting,
                found.closed,
            )
        return sent

    def _recover(self, lost: Lost) -> int:
        reason = f"lost (last held by {lost.holder or 'no worker'})"
        return int(self.dispatcher.send_again(lost.ref, "lost", reason) == "sent")

    def _run(self) -> None:
        # A look as it starts (a worker that dies young has still looked once), then every period, the workers'
        # looks spread over it at random.
        waits = itertools.chain([0.0, random.uniform(0, self.period_s)], itertools.repeat(self.period_s))
        for wait in waits:
            if self._stop.wait(wait):
                return
            try:
                self.look_once()
            except Exception as exc:  # Redis or the broker away: look again next period
                logger.warning("recovery look failed: %r", exc)
