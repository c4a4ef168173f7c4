"""The lease on held messages, against kombu's real Redis transport: what `workers.lease` relies on.

kombu records a taken message's delivery time in `unacked_index` and its sweep (`restore_visible`) queues again
what is older than the visibility timeout. Renewing moves the time forward; a message acked meanwhile is not
brought back by a late renewal.
"""

from __future__ import annotations

import time

import pytest
import redis
from kombu import Connection, Exchange, Queue

from schemas.settings import Settings
from store.queueing import UNACKED_INDEX_KEY, UNACKED_KEY, celery_config
from workers.lease import renew

pytestmark = pytest.mark.integration

LEASE_S = 2


@pytest.fixture
def url(fresh_url) -> str:
    return fresh_url


def _transport_options(url: str) -> dict:
    options = celery_config(Settings(redis_url=url))["broker_transport_options"]
    return {**options, "visibility_timeout": LEASE_S}


def _take(url: str, queue: Queue):
    """Publish one message and take it without acking it, as a worker does; returns (connection, message)."""
    connection = Connection(url, transport_options=_transport_options(url))
    with connection.Producer() as producer:
        producer.publish({"n": 1}, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue])
    simple = connection.SimpleQueue(queue, no_ack=False)
    message = simple.get(timeout=5)
    return connection, simple, message


def _sweep(connection: Connection) -> None:
    connection.default_channel.qos.restore_visible(num=100, interval=1)


def test_a_renewed_message_stays_taken_and_an_abandoned_one_is_queued_again(url: str) -> None:
    queue = Queue("lease-test", Exchange("lease-test"), routing_key="lease-test")
    connection, simple, message = _take(url, queue)
    client = redis.Redis.from_url(url)
    tag = message.delivery_tag
    assert client.hexists(UNACKED_KEY, tag)
    try:
        for _ in range(4):  # twice the lease, renewed every half lease: never queued again
            time.sleep(LEASE_S / 2)
            assert renew(client, [tag]) == 1
            _sweep(connection)
            assert client.llen("lease-test") == 0
            assert client.hexists(UNACKED_KEY, tag)
        time.sleep(LEASE_S + 0.2)  # no renewal for longer than the lease: the sweep gives it back
        _sweep(connection)
        assert client.llen("lease-test") == 1
        assert not client.hexists(UNACKED_KEY, tag)
        assert renew(client, [tag]) == 0  # a late renewal does not bring the restored message back into the index
        assert client.zscore(UNACKED_INDEX_KEY, tag) is None
    finally:
        simple.close()
        connection.release()


def test_renewing_an_acked_message_does_nothing(url: str) -> None:
    queue = Queue("lease-test-ack", Exchange("lease-test-ack"), routing_key="lease-test-ack")
    connection, simple, message = _take(url, queue)
    client = redis.Redis.from_url(url)
    try:
        message.ack()
        assert renew(client, [message.delivery_tag, "no-such-tag"]) == 0
        assert client.zcard(UNACKED_INDEX_KEY) == 0
        assert renew(client, []) == 0
    finally:
        simple.close()
        connection.release()
