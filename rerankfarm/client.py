"""A client for services that submit work to the farm, sync and async.

    from rerankfarm import RerankFarm

    with RerankFarm("http://rerank.internal:8000", api_key="rk_...") as farm:
        job = farm.submit([{"custom_id": "q1", "query": "capital of China?", "documents": ["Beijing", "Paris"]}])
        farm.wait(job["id"], timeout=600)
        for entry in farm.iter_results(job["id"]):
            print(entry["custom_id"], entry["results"][0])

`AsyncRerankFarm` has the same methods as coroutines (`iter_results` is an async generator). The URL defaults to
RERANK_API_URL, the key to RERANK_API_KEY.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any, Generic, NamedTuple, TypeVar

import httpx
from tenacity import AsyncRetrying, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from schemas.jobs import JobStatus

R = TypeVar("R")  # what a call returns: the answer, or an awaitable of it
H = TypeVar("H", httpx.Client, httpx.AsyncClient)


class RerankFarmError(Exception):
    """An error answer of the farm: HTTP status, error code and message (and e.g. the job id of a 504)."""

    def __init__(self, status: int, code: str, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, dict(details or {})


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        code, message = error.pop("code", "error"), error.pop("message", response.text)
    except (ValueError, KeyError, TypeError):
        code, message, error = "error", response.text, {}
    raise RerankFarmError(response.status_code, code, message, error)


def _answer(response: httpx.Response) -> dict[str, Any]:
    _raise_for(response)
    result: dict[str, Any] = response.json()
    return result


def _headers(api_key: str | None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get("RERANK_API_KEY")
    return {"authorization": f"Bearer {key}"} if key else {}


def _base_url(url: str | None) -> str:
    return (url or os.environ.get("RERANK_API_URL") or "http://127.0.0.1:8000").rstrip("/")


class _Call(NamedTuple):
    """One HTTP call of the farm's API, built once for both clients. A submission carries an Idempotency-Key: it is
    sent again on a timeout, a dropped connection or a 5xx (`_retrying`), and the farm answers a retry with the job
    the first send created."""

    method: str
    path: str
    json: Any = None
    idempotency_key: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Idempotency-Key": self.idempotency_key} if self.idempotency_key else {}


def _transient(exc: BaseException) -> bool:
    """Worth sending again with the same Idempotency-Key: no answer (timeout, connection lost), a 5xx, or the farm
    still handling the first send (409 idempotency_in_progress)."""
    if isinstance(exc, httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError):
        return True
    if isinstance(exc, RerankFarmError):
        return exc.status >= 500 or exc.code == "idempotency_in_progress"
    return False


SUBMIT_ATTEMPTS = 5  # sends of one submission at most (backoff 0.5 s, 1 s, 2 s ... with jitter, 10 s at most)


def _retrying(call: _Call) -> dict[str, Any]:
    """tenacity's arguments for a call: a submission is sent up to SUBMIT_ATTEMPTS times, anything else once."""
    return {
        "retry": retry_if_exception(_transient),
        "stop": stop_after_attempt(SUBMIT_ATTEMPTS if call.idempotency_key else 1),
        "wait": wait_exponential_jitter(multiplier=0.5, max=10),
        "reraise": True,
    }


def _job_body(
    requests: list[dict[str, Any]],
    priority: int | None,
    metadata: dict[str, str] | None,
    webhook: dict[str, Any] | None,
    model: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"requests": requests}
    if model is not None:
        body["model"] = model
    if priority is not None:
        body["priority"] = priority
    if metadata is not None:
        body["metadata"] = metadata
    if webhook is not None:
        body["webhook"] = webhook
    return body


class _Calls(Generic[R, H]):
    """The calls both clients make. `_send` returns the answer (sync) or an awaitable of it (async), so each
    method is written once and returns whichever its client gives."""

    _http_class: type[H]

    def __init__(
        self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0, http: H | None = None
    ) -> None:
        self.http: H = http or self._http_class(base_url=_base_url(url), headers=_headers(api_key), timeout=timeout)

    def _send(self, call: _Call) -> R:
        raise NotImplementedError

    def submit(
        self,
        requests: list[dict[str, Any]],
        priority: int | None = None,
        metadata: dict[str, str] | None = None,
        webhook: dict[str, Any] | None = None,
        model: str | None = None,
        idempotency_key: str | None = None,
    ) -> R:
        """Submit a bulk job (to `model`, a served model's name, or the farm's default); returns it, queued. Sent
        again on a timeout or a 5xx with the same `idempotency_key` (a new UUID unless given), so a retry never makes
        a second job."""
        body = _job_body(requests, priority, metadata, webhook, model)
        return self._send(_Call("POST", "/v1/jobs", body, idempotency_key or str(uuid.uuid4())))

    def job(self, job_id: str) -> R:
        return self._send(_Call("GET", f"/v1/jobs/{job_id}"))

    def results(self, job_id: str) -> R:
        return self._send(_Call("GET", f"/v1/jobs/{job_id}/results"))

    def cancel(self, job_id: str) -> R:
        return self._send(_Call("POST", f"/v1/jobs/{job_id}/cancel"))

    def rerank(self, query: str, documents: list[str | dict[str, Any]], **options: Any) -> R:
        """The interactive call: one query, its documents ranked in the answer (`model=...` among the options)."""
        return self._send(_Call("POST", "/v1/rerank", {"query": query, "documents": documents, **options}))

    def webhook_secrets(self) -> R:
        """The secrets that sign your tenant's webhooks now: ids and times, never the values."""
        return self._send(_Call("GET", "/v1/webhooks/secret"))

    def rotate_webhook_secret(self, overlap_s: int | None = None) -> R:
        """A new signing secret for your tenant's webhooks (its `secret` is shown this once); the older ones keep
        signing beside it for `overlap_s` seconds (the farm's default: 1 day). Sent once: a retry would make
        another."""
        return self._send(_Call("POST", "/v1/webhooks/secret/rotate", {"overlap_s": overlap_s}))


def verify_webhook(secret: str, body: bytes | str, headers: Mapping[str, str]) -> dict[str, Any]:
    """The event of a webhook delivery, after checking its Standard Webhooks signature against `secret`, your
    tenant's signing secret (during a rotation, the old or the new one: the delivery carries a signature of each);
    raises if no signature matches, or the body was altered, or the timestamp is stale."""
    from standardwebhooks import Webhook

    event: dict[str, Any] = Webhook(secret).verify(body, dict(headers))
    return event


class RerankFarm(_Calls[dict[str, Any], httpx.Client]):
    _http_class = httpx.Client

    def _send(self, call: _Call) -> dict[str, Any]:
        for attempt in Retrying(**_retrying(call)):
            with attempt:
                return _answer(self.http.request(call.method, call.path, json=call.json, headers=call.headers))
        raise AssertionError("unreachable: tenacity reraises")

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        poll: float = 0.5,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the job is final and return it; TimeoutError after `timeout` seconds (the job goes on).
        `on_progress` sees the job at every poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_progress is not None:
                on_progress(job)
            if JobStatus(job["status"]).final:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout}s")
            time.sleep(poll)

    def iter_results(self, job_id: str) -> Iterator[dict[str, Any]]:
        """One request's results at a time, streamed (JSON Lines), in submission order."""
        with self.http.stream("GET", f"/v1/jobs/{job_id}/results", params={"format": "jsonl"}) as response:
            if not response.is_success:
                response.read()
                _raise_for(response)
            for line in response.iter_lines():
                if line:
                    yield json.loads(line)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RerankFarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRerankFarm(_Calls[Awaitable[dict[str, Any]], httpx.AsyncClient]):
    _http_class = httpx.AsyncClient

    async def _send(self, call: _Call) -> dict[str, Any]:
        async for attempt in AsyncRetrying(**_retrying(call)):
            with attempt:
                return _answer(await self.http.request(call.method, call.path, json=call.json, headers=call.headers))
        raise AssertionError("unreachable: tenacity reraises")

    async def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.5) -> dict[str, Any]:
        async def until_final() -> dict[str, Any]:
            while not JobStatus((job := await self.job(job_id))["status"]).final:
                await asyncio.sleep(poll)
            return job

        try:
            return await asyncio.wait_for(until_final(), timeout)
        except TimeoutError:
            raise TimeoutError(f"job {job_id} did not finish within {timeout}s") from None

    async def iter_results(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        async with self.http.stream("GET", f"/v1/jobs/{job_id}/results", params={"format": "jsonl"}) as response:
            if not response.is_success:
                await response.aread()
                _raise_for(response)
            async for line in response.aiter_lines():
                if line:
                    yield json.loads(line)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncRerankFarm:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
