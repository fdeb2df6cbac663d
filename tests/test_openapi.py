"""/openapi.json and /docs: one schema from the route table, valid, held to the live server by schemathesis."""

from __future__ import annotations

import json

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate
from schemathesis import checks

from serve_app.api_table import endpoints
from serve_app.config import AppArgs
from serve_app.openapi import openapi_document, reference_document
from tests.conftest import REPO_ROOT, REQUEST_TIMEOUT_S

COMMITTED = REPO_ROOT / "docs" / "openapi.json"


def test_the_committed_schema_is_the_one_the_code_generates() -> None:
    # Regenerate with: .venv/bin/python -m serve_app.openapi > docs/openapi.json (and review the diff).
    assert json.loads(COMMITTED.read_text()) == json.loads(json.dumps(reference_document(), sort_keys=True))


def test_the_reference_schema_is_valid_openapi() -> None:
    validate(reference_document())


def test_the_served_schema_is_valid_and_carries_the_running_limits(serve_base_url: str, app_args: AppArgs) -> None:
    served = requests.get(f"{serve_base_url}/openapi.json", timeout=REQUEST_TIMEOUT_S).json()
    validate(served)
    (k,) = [p for p in served["paths"]["/search"]["post"]["parameters"] if p["name"] == "k"]
    assert k["schema"]["maximum"] == app_args.limits.max_k
    files = served["paths"]["/search"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert files["properties"]["files"]["maxItems"] == app_args.limits.max_files


def test_every_route_of_the_table_is_served_and_described(serve_base_url: str, app_args: AppArgs) -> None:
    served = requests.get(f"{serve_base_url}/openapi.json", timeout=REQUEST_TIMEOUT_S).json()
    dim = requests.get(f"{serve_base_url}/info", timeout=REQUEST_TIMEOUT_S).json()["embedding_dim"]
    table = endpoints(app_args, dim)
    assert {(e.path, e.method.lower()) for e in table} == {
        (path, method) for path, methods in served["paths"].items() for method in methods
    }
    assert served == json.loads(
        json.dumps(
            openapi_document(table, served["info"]["title"], served["info"]["version"], served["info"]["description"])
        )
    )


def test_docs_page_loads_swagger_ui_from_the_service_itself(serve_base_url: str) -> None:
    page = requests.get(f"{serve_base_url}/docs", timeout=REQUEST_TIMEOUT_S)
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    assert "https://" not in page.text and "http://" not in page.text  # no CDN
    for asset in ("docs/assets/swagger-ui-bundle.js", "docs/assets/swagger-ui.css"):
        response = requests.get(f"{serve_base_url}/{asset}", timeout=REQUEST_TIMEOUT_S)
        assert response.status_code == 200 and len(response.content) > 1000


@pytest.fixture(scope="module")
def live_schema(serve_base_url: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{serve_base_url}/openapi.json")


# What the schema promises: no 5xx for anything a client sends, only documented statuses, content
# types and bodies as described. (Schemathesis's positive_data_acceptance is left out: a body the
# schema allows, such as random bytes for `files`, may still be a photo that does not decode, and a
# 400 `not_an_image` is the documented answer to that.)
SCHEMA_CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]
REFERENCE_PATHS = json.loads(COMMITTED.read_text())["paths"]
POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
# Negative cases exist only where there is something to break: parameters or a body.
CASES = sorted(
    (method.upper(), path, mode)
    for path, methods in REFERENCE_PATHS.items()
    for method, operation in methods.items()
    for mode in (POSITIVE, NEGATIVE)
    if mode is POSITIVE or "parameters" in operation or "requestBody" in operation
)


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {mode.value}" for m, p, mode in CASES])
def test_the_server_keeps_to_its_schema(
    live_schema: schemathesis.BaseSchema, method: str, path: str, mode: schemathesis.GenerationMode
) -> None:
    # Generated requests we did not write (valid ones, and ones that break the schema on purpose):
    # no 5xx, only documented statuses, bodies as described.
    operation = live_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(timeout=REQUEST_TIMEOUT_S * 2, checks=SCHEMA_CHECKS)

    check()
