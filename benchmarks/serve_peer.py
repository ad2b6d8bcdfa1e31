"""The benchmark's peer: the same bundle behind a plain per-request FastAPI handler (no batching).

Speaks the same protocol subset as ``trainfer serve`` (``/v2/health/ready``, ``POST
/v2/models/{name}/infer`` with JSON or binary tensors, decoded by the same code) and calls
``Predictor.predict`` once per request in FastAPI's thread pool, as a hand-written server would.
With ``--workers N``, N uvicorn processes share the port, each loading the bundle: uvicorn imports
the app by name in each (:func:`app_from_environment`), so the bundle and the model name reach
them in the environment variable ``SERVE_PEER_SETTINGS`` (the same path serves one process).

    .venv/bin/python benchmarks/serve_peer.py BUNDLE --port 8001 [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from trainfer import Predictor
from trainfer.errors import TrainferError, one_line
from trainfer.server.protocol import HEADER_LENGTH, decode_request, encode_response

#: How ``main`` hands the bundle and the model name to the app of each server process.
SETTINGS_VARIABLE = "SERVE_PEER_SETTINGS"


def peer_app(bundle: str, name: str) -> FastAPI:
    predictor = Predictor.load(bundle)
    app = FastAPI()

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v2/models/{model}/infer")
    async def infer(model: str, request: Request) -> Response:
        body = await request.body()

        def answer() -> tuple[bytes, dict[str, str]]:
            decoded = decode_request(body, request.headers.get(HEADER_LENGTH))
            results = predictor.predict(decoded.inputs["input"], top_k=1)
            labels = np.array([r.label.encode() for r in results], dtype=object)
            return encode_response(name, decoded, {"label": labels})

        try:
            content, headers = await run_in_threadpool(answer)
        except TrainferError as error:
            return JSONResponse({"error": one_line(error)}, 400)
        return Response(content, headers=headers)

    return app


def app_from_environment() -> FastAPI:
    """The app of one server process, from the JSON ``{"bundle": ..., "name": ...}`` in ``SERVE_PEER_SETTINGS``."""
    settings = json.loads(os.environ[SETTINGS_VARIABLE])
    return peer_app(settings["bundle"], settings["name"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--name", default="model")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=1, help="server processes sharing the port")
    args = parser.parse_args()
    os.environ[SETTINGS_VARIABLE] = json.dumps({"bundle": args.bundle, "name": args.name})
    uvicorn.run(
        "serve_peer:app_from_environment",  # this file's directory is sys.path[0], in workers too
        factory=True,
        workers=args.workers,
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
