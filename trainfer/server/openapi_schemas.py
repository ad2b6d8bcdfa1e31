"""The OpenAPI entries FastAPI cannot derive from signatures: the Open Inference Protocol's JSON
tensors (its inference route is a plain Starlette route, documented here) and the file endpoints' raw bytes."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

INFER_PATH = "/v2/models/{name}/infer"
INFER_OPERATION: dict[str, Any] = {
    "summary": "Inference (Open Inference Protocol)",
    "operationId": "infer",
    "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
    "responses": {
        "200": {"description": "the outputs asked for: JSON tensors, or binary tensor data after a JSON header"},
        "400": {"description": 'bad input: {"error": one line}'},
    },
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name", "shape", "datatype"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                    "datatype": {"type": "string"},
                                    "data": {"type": "array"},
                                    "parameters": {"type": "object"},
                                },
                            },
                        },
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                }
            }
        },
    },
}
FILE_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "text/csv": {"schema": {"type": "string"}},
        },
    }
}


def document_infer(app: FastAPI) -> None:
    """Add :data:`INFER_OPERATION` at :data:`INFER_PATH` to ``app``'s OpenAPI schema (built once, on first use)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema["paths"][INFER_PATH] = {"post": INFER_OPERATION}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
