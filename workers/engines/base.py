"""What every engine shares: prompts in as token ids (built by `workers.prompts`), P(yes) out, and how it wants to be
fed. Engines know nothing of Celery, Redis or prompts; the batcher (`workers.batcher`) feeds them."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Feed:
    """How an engine wants its work: the batcher plans calls from this and nothing else."""

    max_batch_tokens: int
    """Token budget of one engine call."""
    padded: bool
    """True: a call costs longest prompt x prompts (the transformers engine pads its batch); False: the sum of the
    prompts' lengths (vLLM packs tokens without padding)."""
    calls_in_flight: int = 1
    """Engine calls the batcher keeps going at once. 1: one blocking call at a time. 2 or more: the next call is
    already queued inside the engine while one runs, so the engine never waits for Python to plan the next one."""
    express: bool = False
    """True: the engine takes one more call at any time, which the batcher keeps for its top priority (interactive
    pairs), so they never wait for a bulk call to end; the engine's own scheduler puts them first (vLLM: priority
    scheduling). False: every call waits for a feeder (`calls_in_flight`)."""


class Engine(Protocol):
    """Loaded once per worker process, before it consumes. `score` may be called from `feed.calls_in_flight`
    threads at once; an engine that is not thread-safe says 1."""

    name: str
    device: str
    feed: Feed

    def score(
        self,
        batch: Sequence[Sequence[int]],
        priority: int = 0,
        abandoned: Sequence[threading.Event] | None = None,
    ) -> list[float]:
        """P(yes) for each prompt; the same value whatever else is in the batch. `priority`: higher is more urgent
        (interactive above bulk), for engines that schedule several calls. `abandoned[i]` set means nobody wants
        prompt i any more: an engine that can drop queued work does, and returns NaN for it."""
        ...

    def health(self) -> str | None:
        """None while the engine can score; else why it cannot (its engine process died, say)."""
        ...

    def close(self) -> None:
        """Free the engine (its processes, its memory); scoring after this fails."""
        ...
