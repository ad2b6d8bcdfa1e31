"""Errors as HTTP answers: one JSON line ``{"error": "..."}`` with its status, never a traceback."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from trainfer.errors import MissingExtraError, TrainferError, one_line
from trainfer.server.state import HTTPError


def answer_errors(app: FastAPI) -> None:
    """Every error as ``{"error": one line}``: no traceback ever reaches a client."""

    def answer(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status, headers=headers)

    @app.exception_handler(HTTPError)
    async def http_error(request: Request, error: HTTPError) -> JSONResponse:
        return answer(error.status, str(error), error.headers)

    @app.exception_handler(MissingExtraError)
    async def missing_extra(request: Request, error: MissingExtraError) -> JSONResponse:
        return answer(501, one_line(error))

    @app.exception_handler(TrainferError)
    async def user_error(request: Request, error: TrainferError) -> JSONResponse:
        return answer(400, one_line(error))

    @app.exception_handler(HTTPException)
    async def routing_error(request: Request, error: HTTPException) -> JSONResponse:
        """Starlette's own answers (404 no such route, 405 wrong method) in the same form."""
        return answer(error.status_code, " ".join(str(error.detail).split()), dict(error.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def bad_parameters(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return answer(400, f"bad request parameters: {problems}")
