"""Scoring engines. Each turns (query, document, instruction) into token ids and token ids into P(yes)."""

from workers.engines.base import Engine, Pair, load_engine

__all__ = ["Engine", "Pair", "load_engine"]
