"""schemathesis against the OpenAPI schema of a running farm: no 5xx, and every response as documented."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CheckContext
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.main import create_app
from schemas.settings import Settings
from tests.integration.conftest import farm_settings, serve

pytestmark = pytest.mark.integration


# The schema is the app's own; building it needs no Redis. Requests go to a live farm (fixture below).
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())


@pytest.fixture(scope="module")
def fuzzed_api(redis_url, tiny_model_dir, worker) -> Iterator[str]:
    # Small limits keep fuzzed jobs cheap for a CPU worker; the limits themselves are part of what is fuzzed.
    small = farm_settings(
        redis_url,
        tiny_model_dir,
        max_documents_per_request=20,
        max_documents_per_rerank=20,
        max_pairs_per_job=200,
        max_document_chars=2000,
        max_query_chars=500,
        max_requests_per_job=10,
    )
    with serve(small) as url:
        yield url


def no_server_error(ctx: CheckContext, response, case) -> bool:  # type: ignore[no-untyped-def]
    """No 5xx, except the 504 a caller asks for with a `timeout` too short for the work."""
    if response.status_code < 500:
        return True
    body = case.body if isinstance(case.body, dict) else {}
    if response.status_code == 504 and body.get("timeout") is not None:
        return True
    raise AssertionError(
        f"{response.status_code} for {case.method} {case.path}: {response.text[:500]}"
        f"\nrequest body: {json.dumps(case.body, default=str)[:500]}"
    )


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_answers_5xx_and_matches_its_schema(case, fuzzed_api) -> None:
    case.call_and_validate(
        base_url=fuzzed_api,
        checks=[no_server_error, status_code_conformance, content_type_conformance, response_schema_conformance],
        timeout=60,
    )
