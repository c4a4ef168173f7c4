"""Dependencies: services are created in the lifespan, kept on app.state and read through these aliases."""

from typing import Annotated

from fastapi import Depends, Request

from api.job_store import JobStore
from schemas.settings import Settings


def get_store(request: Request) -> JobStore:
    store: JobStore = request.app.state.store
    return store


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


StoreDep = Annotated[JobStore, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
