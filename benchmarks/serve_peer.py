"""The benchmark's peer: the same bundle behind a plain per-request FastAPI handler (no batching).

Speaks the same protocol subset as ``trainfer serve`` (``/v2/health/ready``, ``POST
/v2/models/{name}/infer`` with JSON or binary tensors, decoded by the same code) and calls
``Predictor.predict`` once per request in FastAPI's thread pool, as a hand-written server would.

    .venv/bin/python benchmarks/serve_peer.py BUNDLE --port 8001
"""

from __future__ import annotations

import argparse

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from trainfer import Predictor
from trainfer.errors import TrainferError, one_line
from trainfer.server.protocol import HEADER_LENGTH, decode_request, encode_response


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--name", default="model")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(peer_app(args.bundle, args.name), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
