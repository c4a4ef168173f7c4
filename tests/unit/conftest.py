"""Fixtures of the unit tests: fakeredis (with Lua) and a move runner on it, for the pure logic of the moves."""

from __future__ import annotations

import fakeredis
import pytest

from store import moves


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture
def run(r: fakeredis.FakeRedis) -> moves.Runner:
    return moves.Runner(r)
