"""The playground page: plain HTML/CSS/JS shipped in the package, served by the API."""

import json
from functools import cache
from importlib import resources
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, RedirectResponse

router = APIRouter(include_in_schema=False)


@cache
def _page() -> str:
    return resources.files("api").joinpath("static/playground.html").read_text("utf-8")


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/playground")


@router.get("/playground")
async def playground() -> HTMLResponse:
    return HTMLResponse(_page())


@router.get("/playground/example.json")
async def example() -> dict[str, Any]:
    """The example bulk job (several languages) that `rerankfarm up` runs."""
    text = resources.files("rerankfarm").joinpath("data/example_job.json").read_text("utf-8")
    data: dict[str, Any] = json.loads(text)
    return data
