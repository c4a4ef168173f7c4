"""Webhook delivery as plain code, no worker: where a webhook may go (the SSRF policy), how one attempt's answer
decides what happens next, and the request sent to the checked address."""

from __future__ import annotations

import ipaddress
import time

import pytest

from schemas.webhooks import WebhookState
from webhooks.delivery import Attempt, message_id, next_state, pinned_request
from webhooks.ssrf import UnresolvableHost, UnsafeURL, parse_allowlist, resolve_checked

DELAYS = [5.0, 300.0]


@pytest.mark.parametrize(
    ("result", "number", "state"),
    [
        (Attempt(status_code=200), 1, WebhookState.delivered),
        (Attempt(status_code=204), 3, WebhookState.delivered),
        (Attempt(status_code=410), 1, WebhookState.gone),
        (Attempt(error="refused by policy", refused=True), 1, WebhookState.failed),
        (Attempt(status_code=500), 3, WebhookState.failed),  # the schedule is used up
        (Attempt(status_code=301), 1, WebhookState.pending),  # redirects are not followed: try again later
        (Attempt(status_code=199), 1, WebhookState.pending),
        (Attempt(status_code=300), 1, WebhookState.pending),
    ],
)
def test_the_answer_decides_the_next_state(result: Attempt, number: int, state: WebhookState) -> None:
    got, due = next_state(result, number, DELAYS)
    assert got is state
    assert (due is None) == (state is not WebhookState.pending)


@pytest.mark.parametrize(("number", "delay"), [(1, 5.0), (2, 300.0)])
def test_a_failed_attempt_is_retried_after_its_delay_with_ten_percent_jitter(number: int, delay: float) -> None:
    dues = [next_state(Attempt(error="timeout"), number, DELAYS)[1] for _ in range(50)]
    now = time.time()
    assert all(d is not None and delay * 0.9 - 1 <= d - now <= delay * 1.1 for d in dues)
    assert len({round(d or 0, 3) for d in dues}) > 1  # jittered, not all at once


def test_the_message_id_is_the_same_for_every_attempt_of_one_event() -> None:
    assert message_id("job_1", "job.succeeded") == "msg_job_1_succeeded" == message_id("job_1", "job.succeeded")
    assert message_id("job_1", "job.failed") != message_id("job_1", "job.succeeded")


def test_the_request_goes_to_the_checked_address_with_the_original_host() -> None:
    url, headers, extensions = pinned_request("https://hooks.example.com:8443/a?b=1", "hooks.example.com", "1.2.3.4")
    assert url == "https://1.2.3.4:8443/a?b=1"
    assert headers == {"host": "hooks.example.com:8443"} and extensions == {"sni_hostname": "hooks.example.com"}
    url, headers, extensions = pinned_request("http://h.example/x", "h.example", "2001:db8::1")
    assert url == "http://[2001:db8::1]/x" and headers == {"host": "h.example"} and extensions == {}


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/x", "http or https"),
        ("http:///x", "no host"),
        ("http://user:pw@example.com/", "credentials"),
        ("http://example.com:99999/", "invalid port"),
        ("http://127.0.0.1:9/", "non-public"),
        ("http://localhost/", "non-public"),
        ("http://10.1.2.3/", "non-public"),
        ("http://169.254.169.254/latest/meta-data", "non-public"),
        ("http://[::1]/", "non-public"),
        ("http://[::ffff:127.0.0.1]/", "non-public"),
        ("http://0.0.0.0/", "non-public"),
    ],
)
def test_the_policy_refuses_what_is_not_a_public_http_address(url: str, reason: str) -> None:
    with pytest.raises(UnsafeURL, match=reason):
        resolve_checked(url, "")


def test_the_allowlist_admits_named_hosts_and_networks_only() -> None:
    assert resolve_checked("http://127.0.0.1:8080/hook", "127.0.0.0/8")[0] == "127.0.0.1"
    host, addresses = resolve_checked("http://LOCALHOST/hook", "localhost")
    assert host == "localhost" and addresses
    with pytest.raises(UnsafeURL):
        resolve_checked("http://10.0.0.5/", "127.0.0.0/8, other.example")
    assert resolve_checked("http://8.8.8.8/", "")[1] == [ipaddress.ip_address("8.8.8.8")]  # public: no DNS needed
    assert parse_allowlist(" a.example , 10.0.0.0/8,, ") == ({"a.example"}, [ipaddress.ip_network("10.0.0.0/8")])


def test_a_host_that_does_not_resolve_is_retried_not_refused() -> None:
    with pytest.raises(UnresolvableHost):
        resolve_checked("http://no-such-host.invalid/", "")
