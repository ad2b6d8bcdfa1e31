"""The benchmark's floor: the least a Python ASGI server costs a request on ``trainfer serve``'s stack.

uvicorn with uvloop and httptools (what ``trainfer serve`` runs on), one process, serving a raw
ASGI app: no framework, no model, no decoding. ``GET`` answers ``{"ready": true}`` (the benchmark
waits for ``/v2/health/ready``); any other request has its body read whole and gets one fixed
Open Inference Protocol response, built at start-up, of the shape ``trainfer serve`` gives a
one-sample request that asks for the ``label`` output. What a real server adds on top (routing,
decoding, the model, encoding, metrics) is beyond this floor.

    .venv/bin/python benchmarks/floor_peer.py --name digits_net --port 8003
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

Message = dict[str, Any]


def inference_response(name: str) -> bytes:
    """The JSON ``trainfer serve`` answers a one-sample request for ``label`` with (a fixed label)."""
    outputs = [{"name": "label", "datatype": "BYTES", "shape": [1], "data": ["0"]}]
    return json.dumps({"model_name": name, "model_version": "1", "outputs": outputs}).encode()


def floor_app(name: str) -> Callable[..., Awaitable[None]]:
    """The raw ASGI app (HTTP scopes only: run it with ``lifespan="off"``)."""
    answers = {"GET": _start_and_body(b'{"ready": true}')}
    other = _start_and_body(inference_response(name))

    async def app(
        scope: Message, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
    ) -> None:
        more = True
        while more:  # the request body, read whole (a disconnect has no more_body)
            more = (await receive()).get("more_body", False)
        start, body = answers.get(scope["method"], other)
        await send(start)
        await send(body)

    return app


def _start_and_body(content: bytes) -> tuple[Message, Message]:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
    return {"type": "http.response.start", "status": 200, "headers": headers}, {
        "type": "http.response.body",
        "body": content,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="model", help="the model name the response carries")
    parser.add_argument("--port", type=int, default=8003)
    args = parser.parse_args()
    uvicorn.run(
        floor_app(args.name),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
