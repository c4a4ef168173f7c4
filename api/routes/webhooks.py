"""A tenant's webhook signing secrets: see which sign (never their values), and rotate (the new one shown once)."""

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import SettingsDep, StoreDep, TenantDep
from schemas import keys
from schemas.errors import AuthOff
from schemas.jobs import ErrorResponse
from schemas.settings import Settings
from store import webhook_secrets

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
_errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 409, 422, 503)}


class SecretInfo(BaseModel):
    id: str
    created_at: str
    expires_at: str | None = Field(None, description="When it stops signing; null: until the next rotation.")


class Secrets(BaseModel):
    secrets: list[SecretInfo] = Field(description="The secrets that sign this tenant's webhooks now, newest first.")


class Rotate(BaseModel):
    overlap_s: int | None = Field(
        None,
        ge=0,
        le=30 * 86400,
        description="Seconds the current secrets keep signing beside the new one (RERANK_WEBHOOK_SECRET_OVERLAP_S "
        "when omitted; 0 drops them now).",
    )


class Rotated(SecretInfo):
    secret: str = Field(description="The new secret (`whsec_` + base64). Shown this once: store it now.")
    signing: list[SecretInfo] = Field(description="Every secret that signs from now on, newest first.")


def _check_auth(settings: Settings) -> None:
    if settings.auth == "off":
        raise AuthOff(
            "authentication is off: every webhook is signed with the farm-wide RERANK_WEBHOOK_SECRET; "
            "tenants' own secrets need RERANK_AUTH=on"
        )


async def _signing(store: StoreDep, tenant: str) -> list[SecretInfo]:
    stored = await store.redis.hget(keys.WEBHOOK_SECRETS, tenant)
    return [SecretInfo(**s.describe()) for s in webhook_secrets.parse(stored)]


@router.get("/secret", responses=_errors)
async def list_secrets(store: StoreDep, tenant: TenantDep, settings: SettingsDep) -> Secrets:
    """The secrets that sign your webhooks (ids and times; the values are shown only when made)."""
    _check_auth(settings)
    return Secrets(secrets=await _signing(store, tenant))


@router.post("/secret/rotate", status_code=201, responses=_errors)
async def rotate_secret(
    store: StoreDep, tenant: TenantDep, settings: SettingsDep, body: Rotate | None = None
) -> Rotated:
    """Make a new signing secret, shown once. The current ones keep signing beside it for `overlap_s` (each
    delivery then carries one signature per secret), so receivers can switch without missing an event."""
    _check_auth(settings)
    overlap = settings.webhook_secret_overlap_s if body is None or body.overlap_s is None else body.overlap_s
    made, move = webhook_secrets.rotate(tenant, overlap)
    await store.run(move)
    return Rotated(**made.describe(), secret=made.secret, signing=await _signing(store, tenant))
