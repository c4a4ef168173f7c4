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
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import httpx

FINAL = ("succeeded", "failed", "cancelled")


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


def _headers(api_key: str | None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get("RERANK_API_KEY")
    return {"authorization": f"Bearer {key}"} if key else {}


def _base_url(url: str | None) -> str:
    return (url or os.environ.get("RERANK_API_URL") or "http://127.0.0.1:8000").rstrip("/")


def _job_body(
    requests: list[dict[str, Any]],
    priority: int | None,
    metadata: dict[str, str] | None,
    webhook: dict[str, Any] | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"requests": requests}
    if priority is not None:
        body["priority"] = priority
    if metadata is not None:
        body["metadata"] = metadata
    if webhook is not None:
        body["webhook"] = webhook
    return body


def verify_webhook(secret: str, body: bytes | str, headers: Mapping[str, str]) -> dict[str, Any]:
    """The event of a webhook delivery, after checking its Standard Webhooks signature (raises if it fails)."""
    from standardwebhooks import Webhook

    event: dict[str, Any] = Webhook(secret).verify(body, dict(headers))
    return event


class RerankFarm:
    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        http: httpx.Client | None = None,
    ) -> None:
        self.http = http or httpx.Client(base_url=_base_url(url), headers=_headers(api_key), timeout=timeout)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        _raise_for(response)
        return response.json()

    def submit(
        self,
        requests: list[dict[str, Any]],
        priority: int | None = None,
        metadata: dict[str, str] | None = None,
        webhook: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Submit a bulk job; returns it, queued."""
        result: dict[str, Any] = self._call("POST", "/v1/jobs", json=_job_body(requests, priority, metadata, webhook))
        return result

    def job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/jobs/{job_id}")
        return result

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        poll: float = 0.5,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the job is final and return it; TimeoutError after `timeout` seconds (the job goes on)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job["status"] in FINAL:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout}s")
            time.sleep(poll)

    def results(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/jobs/{job_id}/results")
        return result

    def iter_results(self, job_id: str) -> Iterator[dict[str, Any]]:
        """One request's results at a time, streamed (JSON Lines), in submission order."""
        with self.http.stream("GET", f"/v1/jobs/{job_id}/results", params={"format": "jsonl"}) as response:
            if not response.is_success:
                response.read()
                _raise_for(response)
            for line in response.iter_lines():
                if line:
                    yield json.loads(line)

    def cancel(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/v1/jobs/{job_id}/cancel")
        return result

    def rerank(self, query: str, documents: list[str | dict[str, Any]], **options: Any) -> dict[str, Any]:
        """The interactive call: one query, its documents ranked in the answer."""
        result: dict[str, Any] = self._call(
            "POST", "/v1/rerank", json={"query": query, "documents": documents, **options}
        )
        return result

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RerankFarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRerankFarm:
    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.http = http or httpx.AsyncClient(base_url=_base_url(url), headers=_headers(api_key), timeout=timeout)

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.http.request(method, path, **kwargs)
        _raise_for(response)
        return response.json()

    async def submit(
        self,
        requests: list[dict[str, Any]],
        priority: int | None = None,
        metadata: dict[str, str] | None = None,
        webhook: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            "POST", "/v1/jobs", json=_job_body(requests, priority, metadata, webhook)
        )
        return result

    async def job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", f"/v1/jobs/{job_id}")
        return result

    async def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.5) -> dict[str, Any]:
        async def until_final() -> dict[str, Any]:
            while (job := await self.job(job_id))["status"] not in FINAL:
                await asyncio.sleep(poll)
            return job

        try:
            return await asyncio.wait_for(until_final(), timeout)
        except TimeoutError:
            raise TimeoutError(f"job {job_id} did not finish within {timeout}s") from None

    async def results(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", f"/v1/jobs/{job_id}/results")
        return result

    async def iter_results(self, job_id: str) -> AsyncIterator[dict[str, Any]]:
        async with self.http.stream("GET", f"/v1/jobs/{job_id}/results", params={"format": "jsonl"}) as response:
            if not response.is_success:
                await response.aread()
                _raise_for(response)
            async for line in response.aiter_lines():
                if line:
                    yield json.loads(line)

    async def cancel(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("POST", f"/v1/jobs/{job_id}/cancel")
        return result

    async def rerank(self, query: str, documents: list[str | dict[str, Any]], **options: Any) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            "POST", "/v1/rerank", json={"query": query, "documents": documents, **options}
        )
        return result

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncRerankFarm:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
