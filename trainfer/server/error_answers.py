"""Errors as HTTP answers: one JSON line ``{"error": "..."}`` with its status, never a traceback."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from trainfer.errors import MissingExtraError, TrainferError, one_line
from trainfer.server.state import HTTPError

#: The status logged and counted for a request whose client left before sending its whole body
#: (nginx's "client closed request"; never seen by the client).
CLIENT_GONE = 499
#: The answer to an exception that is a bug (its traceback goes to the server's log only).
INTERNAL_ERROR = "internal error in trainfer (a bug): logged on the server"


def answer(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """``{"error": message}`` with ``status`` (and ``headers``)."""
    return JSONResponse({"error": message}, status, headers=headers)


def error_answer(error: Exception) -> JSONResponse | None:
    """The answer to ``error`` when it is a request's mistake or a limit; None for a bug.

    :class:`~trainfer.server.state.HTTPError` its own status; a client that left mid-body
    :data:`CLIENT_GONE`; a missing optional extra 501; any
    other trainfer error (bad input) 400 with the CLI's one-line message; Starlette's routing
    answers (404, 405) and FastAPI's parameter errors in the same form.
    """
    if isinstance(error, HTTPError):
        return answer(error.status, str(error), error.headers)
    if isinstance(error, ClientDisconnect):  # nobody reads this answer: it gives the log and metrics a status
        return answer(CLIENT_GONE, "the client closed the connection before its request was read")
    if isinstance(error, MissingExtraError):
        return answer(501, one_line(error))
    if isinstance(error, TrainferError):
        return answer(400, one_line(error))
    if isinstance(error, HTTPException):
        return answer(error.status_code, " ".join(str(error.detail).split()), dict(error.headers or {}))
    if isinstance(error, RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return answer(400, f"bad request parameters: {problems}")
    return None


def answer_errors(app: FastAPI) -> None:
    """Every error of ``app``'s routes answered by :func:`error_answer`, a bug by a one-line 500."""

    async def known(request: Request, error: Exception) -> JSONResponse:
        found = error_answer(error)
        assert found is not None, f"{type(error).__name__} registered but not answered"
        return found

    async def bug(request: Request, error: Exception) -> JSONResponse:
        """Starlette answers with this, then raises ``error`` on: the access middleware logs its traceback."""
        return answer(500, INTERNAL_ERROR)

    for kind in (HTTPError, ClientDisconnect, MissingExtraError, TrainferError, HTTPException, RequestValidationError):
        app.add_exception_handler(kind, known)
    app.add_exception_handler(Exception, bug)
