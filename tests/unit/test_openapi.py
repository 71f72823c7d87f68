"""The daemon's OpenAPI document: valid, complete, served at ``/openapi.json``.

(tests/integration/test_fuzz.py checks it against a running daemon's answers.)
"""

from __future__ import annotations

import re

import pytest
from idle_pool import FakePool
from openapi_spec_validator import validate
from starlette.routing import Route
from starlette.testclient import TestClient

from llamaproc.serve import Upstream, create_app
from llamaproc.serve._app import _App
from llamaproc.serve._openapi import openapi_bytes, openapi_document


def _app() -> _App:
    app = create_app(FakePool(), client=Upstream())  # type: ignore[arg-type]
    assert isinstance(app, _App)
    return app


def test_the_document_is_valid_openapi_3_1() -> None:
    document = openapi_document()
    assert document["openapi"].startswith("3.1.")
    validate(document)  # raises on an invalid document: schemas, references, path parameters


def test_the_validator_catches_a_broken_document() -> None:
    # The check above can fail: an undeclared path parameter and a dangling reference are refused.
    document = openapi_document()
    del document["paths"]["/v1/models/{name}"]["get"]["parameters"]
    with pytest.raises(Exception, match="name"):
        validate(document)
    document = openapi_document()
    document["paths"]["/health"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] = {
        "$ref": "#/components/schemas/Nowhere"
    }
    with pytest.raises(Exception, match="Nowhere"):
        validate(document)


def test_every_route_is_documented_and_nothing_else() -> None:
    app = _app()
    routes = {("POST", path) for path in app.hot}
    for route in app.starlette.routes:
        assert isinstance(route, Route) and route.methods is not None
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)  # {name:path} -> {name}
        routes |= {(method, path) for method in route.methods if method != "HEAD"}
    documented = {(method.upper(), path) for path, item in openapi_document()["paths"].items() for method in item}
    assert documented == routes


def test_every_error_answer_has_the_error_shape() -> None:
    document = openapi_document()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400 and path != "/health":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)
    error = document["components"]["schemas"]["Error"]["properties"]["error"]
    assert error["required"] == ["message", "type", "param", "code"]


def test_request_bodies_name_the_fields_the_daemon_checks() -> None:
    schemas = openapi_document()["components"]["schemas"]
    for name, field in (
        ("ChatCompletionRequest", "messages"),
        ("CompletionRequest", "prompt"),
        ("EmbeddingRequest", "input"),
    ):
        schema = schemas[name]
        assert schema["required"] == ["model", field]
        assert schema["additionalProperties"] is True  # the rest passes through to llama-server
        assert schema["properties"]["model"] == {"type": "string", "description": "The name of a configured model."}
        assert schema["properties"]["stream"]["type"] == ["boolean", "null"]
    assert schemas["ChatCompletionRequest"]["properties"]["messages"]["type"] == "array"


def test_the_route_serves_the_document() -> None:
    with TestClient(_app(), base_url="http://127.0.0.1") as client:
        answer = client.get("/openapi.json")
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/json"
        assert answer.json() == openapi_document()
        assert answer.content == openapi_bytes()
        assert client.post("/openapi.json").status_code == 405


def test_the_document_is_built_once_and_copies_are_the_callers() -> None:
    assert openapi_bytes() is openapi_bytes()
    copy = openapi_document()
    copy["paths"].clear()
    assert openapi_document()["paths"]
