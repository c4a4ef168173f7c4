"""The playground page in a real browser (Debian's Chromium driven by Playwright) against a running farm."""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import random_text

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parents[2] / "test-artifacts"

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the browser tests: install Debian's chromium (.ci/run does)")
    pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield b
        b.close()


@pytest.fixture
def page(browser, live_api):  # type: ignore[no-untyped-def]
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(f"{live_api}/")
    yield page
    context.close()


def test_page_ranks_pasted_documents_like_the_api(page, live_api, worker) -> None:
    rng = random.Random(31)
    query = random_text(rng, 3, 5)
    docs = [random_text(rng, 4, 30) for _ in range(7)]
    page.fill("#query", query)
    page.fill("#documents", "\n".join(docs))
    page.fill("#top-n", "5")
    page.click("#rerank-btn")
    try:
        page.wait_for_selector("#results li", timeout=30_000)
    except Exception:
        raise AssertionError(f"no ranking; error shown: {page.inner_text('#error')!r}") from None
    shown = [int(i) for i in page.eval_on_selector_all("#results li", "els => els.map(e => e.dataset.index)")]
    api = httpx.post(f"{live_api}/v1/rerank", json={"query": query, "documents": docs, "top_n": 5}, timeout=60).json()
    assert shown == [r["index"] for r in api["results"]]
    summary = page.inner_text("#summary")
    assert "5 of 7 documents" in summary and "tokens" in summary and " ms" in summary
    assert page.inner_text("#results li:first-child .pos") == f"was #{shown[0] + 1}"
    assert page.get_attribute("#instruction", "placeholder").startswith("Given a web search query")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-ranking.png"), full_page=True)


def test_api_errors_are_shown_in_words(page, live_api) -> None:
    page.fill("#query", "w1")
    page.fill("#documents", "")
    page.click("#rerank-btn")
    page.wait_for_function("document.querySelector('#error').textContent.length > 0")
    assert "documents" in page.inner_text("#error") and "422" in page.inner_text("#error")
    page.fill("#documents", '["w1", ')
    page.click("#rerank-btn")
    page.wait_for_function("document.querySelector('#error').textContent.includes('JSON')")


def test_example_loads_with_one_click(page, live_api) -> None:
    page.click("#example-btn")
    assert page.input_value("#query") == "What is the capital of China?"
    assert "北京" in page.input_value("#documents")


def test_jobs_view_shows_progress_moving_then_results(page, live_api, worker) -> None:
    rng = random.Random(32)
    body = {
        "requests": [
            {"query": random_text(rng, 2, 4), "documents": [random_text(rng, 150, 300) for _ in range(150)]}
            for _ in range(4)
        ]
    }
    job = httpx.post(f"{live_api}/v1/jobs", json=body, timeout=60).json()
    row = f"#jobs tr[data-job-id='{job['id']}']"
    page.wait_for_selector(row, timeout=15_000)
    seen: list[int] = []
    deadline = time.monotonic() + 120
    while page.get_attribute(row, "data-status") != "succeeded":
        assert time.monotonic() < deadline, seen
        value = int(float(page.eval_on_selector(f"{row} progress", "p => p.value")))
        if not seen or value != seen[-1]:
            seen.append(value)
        time.sleep(0.2)
    assert len([v for v in seen if 0 < v < 600]) >= 1, seen  # an intermediate value was shown
    assert seen == sorted(seen)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-jobs.png"), full_page=True)
    with page.expect_download() as download:
        page.click(f"{row} .results-link")
    path = download.value.path()
    assert path is not None and f'"id": "{job["id"]}"' in Path(path).read_text()
